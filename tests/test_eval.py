"""`bridgectl eval`: a trained run's final checkpoint, reloaded, reproduces the greedy accuracy the run reported
(full weights, LoRA adapters, and BRIDGE's two adapters); sampled pass@k and mean@k are consistent; any model
directory can be evaluated; bad targets exit 2."""

from __future__ import annotations

import json

import pytest
from hf_fixtures import GSM8K_ROWS, build_hf_model, write_jsonl
from typer.testing import CliRunner

from bridgectl.cli.app import app

TINY_RUN = [
    "train.threads=1",
    "train.max_steps=3",
    "train.eval_every=0",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "sft.batch_size=4",
    "eval.n=20",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    [
        ["recipe=rl"],
        ["recipe=rl", "model.finetune=lora"],
        ["recipe=bridge", "model.finetune=lora"],
        ["recipe=bridge", "bridge.lower=full"],
    ],
)
def test_eval_of_a_run_reproduces_its_final_greedy_accuracy(tmp_path, recipe):
    trained = CliRunner().invoke(app, ["run", *recipe, *TINY_RUN, "--out", str(tmp_path), "--name", "r"])
    assert trained.exit_code == 0, trained.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "r"), "eval.k=4", "--output", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "e.json").read_text())
    for split, row in record["results"].items():
        assert row["n"] == 20
        assert row["greedy_pass@1"] == pytest.approx(summary["eval"][split]["accuracy"])
        assert 0 <= row["mean@4"] <= row["pass@4"] <= 1  # mean of samples never exceeds "any sample right"
        assert row["pass@1"] == pytest.approx(row["mean@4"])  # pass@1's estimator is the mean of the samples
        assert row["pass@1"] <= row["pass@2"] <= row["pass@4"]
        per_problem = row["per_problem"]  # which problems were right: the greedy answers and the samples' counts
        assert sum(per_problem["rewards"]) / len(per_problem["rewards"]) == pytest.approx(row["greedy_pass@1"])
        assert sum(per_problem["correct"]) / (4 * len(per_problem["correct"])) == pytest.approx(row["mean@4"])
    assert "pass@j" in result.output and "greedy pass@1" in result.output


def test_eval_of_a_model_directory_on_a_local_file(tmp_path):
    model = build_hf_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(model),
            "task=gsm8k",
            f"task.path={data}",
            f"task.eval_sets={{small:{data}}}",
            "eval.n=4",
            "eval.max_new_tokens=8",
            "train.threads=1",
            "--output",
            str(tmp_path / "e.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "e.json").read_text())
    assert list(record["results"]) == ["small"] and record["results"]["small"]["n"] == 4


@pytest.mark.parametrize(
    "target, args, message",
    [
        ("missing-dir/", [], "does not exist"),
        ("plain-dir", [], "neither a run directory"),
        ("run-without-weights", [], "has no checkpoints/final"),
        ("run-without-weights-ok", ["eval.nn=3"], "unknown key 'eval.nn'"),
    ],
)
def test_bad_eval_targets_exit_2(tmp_path, target, args, message):
    (tmp_path / "plain-dir").mkdir()
    for name in ("run-without-weights", "run-without-weights-ok"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "run-without-weights-ok" / "checkpoints" / "final").mkdir(parents=True)
    result = CliRunner().invoke(app, ["eval", str(tmp_path / target), *args])
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output and message in " ".join(result.output.split())


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [["recipe=bridge", "bridge.lower=full"], ["recipe=rl", "model.finetune=lora"]])
def test_eval_of_an_intermediate_checkpoint_reproduces_the_periodic_eval(tmp_path, recipe):
    """--checkpoint step-000002: the run's state after step 2 (BRIDGE's upper adapter w included) scores what the
    run's own evaluation at step 2 logged."""
    trained = CliRunner().invoke(
        app,
        [
            "run",
            *recipe,
            *TINY_RUN,
            "train.max_steps=4",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "--out",
            str(tmp_path),
            "--name",
            "r",
        ],
    )
    assert trained.exit_code == 0, trained.output
    logged = next(
        json.loads(line)
        for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["step"] == 2
    )
    result = CliRunner().invoke(
        app, ["eval", str(tmp_path / "r"), "--checkpoint", "step-000002", "--output", str(tmp_path / "e.json")]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["checkpoint"] == "step-000002"
    for split in ("test", "ood"):
        assert record["results"][split]["greedy_pass@1"] == pytest.approx(logged[f"eval/{split}/accuracy"])
    missing = CliRunner().invoke(app, ["eval", str(tmp_path / "r"), "--checkpoint", "step-000003"])
    assert missing.exit_code == 2 and "has no checkpoint step-000003" in " ".join(missing.output.split())
