"""Sampled evaluation: the unbiased pass@k estimator, maj@k and mean@n, on hand-made samples and through a run."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.core.evaluate import majority_correct, pass_at_k, reported_ks, sample_split


@pytest.mark.parametrize("n, c, k", [(10, 3, 1), (10, 3, 5), (32, 1, 8), (20, 0, 4), (16, 16, 16), (7, 5, 3)])
def test_pass_at_k_is_the_combinatorial_formula(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


@pytest.mark.parametrize("n, c", [(4, 0), (4, 1), (4, 3), (6, 6)])
def test_pass_at_k_with_k_equal_n_is_any_of_n(n, c):
    assert pass_at_k(n, c, n) == float(c > 0)


def test_pass_at_k_averages_every_k_subset():
    """The estimator is the share of the C(n, k) subsets of the samples that hold a right one."""
    samples = [1, 0, 0, 1, 0, 0]
    for k in range(1, 7):
        subsets = list(itertools.combinations(samples, k))
        assert pass_at_k(6, 2, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_vote():
    assert majority_correct([7, 3, 7, None], [1.0, 0.0, 1.0, 0.0]) == 1.0
    assert majority_correct([3, 3, 7, None], [0.0, 0.0, 1.0, 0.0]) == 0.0  # the right answer is outvoted
    assert majority_correct([3, 7], [0.0, 1.0]) == 0.0  # a tie goes to the answer given first
    assert majority_correct([None, None], [0.0, 0.0]) == 0.0
    assert reported_ks(8) == [1, 2, 4, 8] and reported_ks(6) == [1, 2, 4, 6] and reported_ks(1) == [1]


def test_sample_split_on_scripted_answers():
    """A decoder that answers from a script: per problem, 4 samples with known answers."""
    script = {"a": ["#1", "#1", "#2", "#1"], "b": ["#5", "#6", "#6", "#x"]}  # golds: a -> 2, b -> 5
    problems = [SimpleNamespace(question="a", answer="2"), SimpleNamespace(question="b", answer="5")]
    served = {"a": 0, "b": 0}

    def decode(prompts, max_new_tokens, temperature, generator):
        completions = []
        for prompt in prompts:
            completions.append(script[prompt][served[prompt]])
            served[prompt] += 1
        return SimpleNamespace(completions=completions)

    def rewards(completions, golds):
        return [float(c == f"#{g}") for c, g in zip(completions, golds)]

    def answer_of(completion):
        return completion[1:] if completion[1:].isdigit() else None

    result = sample_split(
        decode, problems, rewards, answer_of, k=4, n_samples=4, temperature=1.0, max_new_tokens=4, batch_size=8
    )
    assert result.correct == [1, 1]
    metrics = result.metrics()
    assert metrics["pass@4"] == 1.0 and metrics["pass@1"] == pytest.approx(0.25) == metrics["mean@4"]
    assert metrics["pass@2"] == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))
    assert metrics["maj@4"] == 0.0  # a votes 1 (three times), b votes 6 (twice)
    assert metrics["maj@1"] == pytest.approx(0.5)  # b's first sample is right, a's is not


def test_training_evaluations_record_problems_and_sampled_metrics(tmp_path):
    """eval.k during training: every evaluation logs pass@j/maj@j/mean@n, and eval_problems.jsonl holds, per split
    and eval step, each problem's greedy reward and count of right samples, which add up to the logged numbers."""
    result = CliRunner().invoke(
        app,
        [
            "run",
            "recipe=rl",
            "train.max_steps=4",
            "train.eval_every=2",
            "eval.n=12",
            "eval.k=2",
            "eval.samples=3",
            "rl.prompts_per_step=2",
            "rl.num_generations=2",
            "train.threads=1",
            "--out",
            str(tmp_path),
            "--name",
            "r",
        ],
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "r"
    logged = {
        (row["step"], key.split("/")[1]): row
        for row in map(json.loads, (run / "metrics.jsonl").open())
        for key in row
        if key.endswith("/accuracy")
    }
    records = [json.loads(line) for line in (run / "eval_problems.jsonl").open()]
    assert [(r["step"], r["split"]) for r in records] == [(s, split) for s in (0, 2, 4) for split in ("test", "ood")]
    assert len({r["problems"] for r in records if r["split"] == "test"}) == 1  # the same problems every time
    for record in records:
        row = logged[(record["step"], record["split"])]
        prefix = f"eval/{record['split']}/"
        assert len(record["rewards"]) == 12 and record["samples"] == 3
        assert sum(record["rewards"]) / 12 == pytest.approx(row[prefix + "accuracy"])
        assert sum(record["correct"]) / 36 == pytest.approx(row[prefix + "mean@3"])
        assert row[prefix + "pass@2"] == pytest.approx(sum(pass_at_k(3, c, 2) for c in record["correct"]) / 12)
        assert sum(record["maj@2"]) / 12 == pytest.approx(row[prefix + "maj@2"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["test"]["pass@2"] == logged[(4, "test")]["eval/test/pass@2"]
