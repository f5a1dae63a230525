"""A reward model in task.reward_funcs (tasks/reward_model.py): a tiny sequence-classification model built and saved
here scores each rollout's prompt + completion in the reward worker, and the logged rewards are exactly its
scores, computed here independently with transformers, added to the verifier's; a directory without such a model
is refused before the run starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_fixtures import build_hf_model
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.tasks.arith import reward as arith_verdict

SMALL = [
    "train.threads=1",
    "train.max_steps=2",
    "train.eval_every=0",
    "eval.n=4",
    "rl.prompts_per_step=1",
    "rl.num_generations=4",
    "rl.max_completion_length=16",
    "train.log_completions_every=1",
]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with a one-label score head (random weights: distinct scores per text), and its tokenizer."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    base = build_hf_model(tmp_path_factory.mktemp("reward-base"))
    directory = tmp_path_factory.mktemp("models") / "tiny-rm"
    torch.manual_seed(3)
    model = LlamaForSequenceClassification.from_pretrained(base, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(base).save_pretrained(directory)
    return directory


def scores_by_hand(directory: Path, texts: list[str]) -> list[float]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    values = []
    for text in texts:  # one row at a time: no padding at all
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            values.append(model(**ids).logits[0, 0].item())
    return values


@pytest.mark.slow
def test_a_reward_model_scores_prompt_and_completion_and_adds_to_the_verifier(tmp_path, reward_model_dir):
    result = CliRunner().invoke(
        app,
        [
            "run",
            "recipe=rl",
            *SMALL,
            f"task.reward_funcs=[verifier,{reward_model_dir}]",
            "task.reward_weights=[1.0,0.5]",
            "--out",
            str(tmp_path),
            "--name",
            "r",
        ],
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "r"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in steps if row.get("stage") == "rl"]
    samples = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    samples = [row for row in samples if row["split"] == "train"]
    assert len(steps) == 2 and len(samples) == 8
    for step in steps:
        mine = [row for row in samples if row["step"] == step["step"]]
        scores = scores_by_hand(reward_model_dir, [row["prompt"] + row["completion"] for row in mine])
        assert len(set(round(s, 5) for s in scores)) > 1  # the model tells the completions apart
        verdicts = [arith_verdict(row["completion"], row["gold"]) for row in mine]
        assert [row["reward"] for row in mine] == pytest.approx(
            [v + 0.5 * s for v, s in zip(verdicts, scores)], abs=1e-4
        )
        assert step["train/rewards/tiny-rm"] == pytest.approx(sum(scores) / 4, abs=1e-4)  # TRL's name: the dir's


def test_a_directory_without_a_sequence_classification_model_is_refused(tmp_path):
    causal = build_hf_model(tmp_path / "causal")
    for spec, said in [
        (str(causal), "is not a sequence-classification model"),
        (str(tmp_path / "missing"), "neither a path.py:function nor a model directory"),
    ]:
        result = CliRunner().invoke(
            app,
            ["run", "recipe=rl", *SMALL, f"task.reward_funcs=[{spec}]", "--out", str(tmp_path / "runs"), "--name", "r"],
        )
        assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
        assert not (tmp_path / "runs" / "r").exists()


def test_conversational_prompts_are_scored_through_the_reward_tokenizers_chat_template(reward_model_dir):
    from bridgectl.tasks.reward_model import RewardModel

    model = RewardModel(str(reward_model_dir))
    model.prepare()
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    completion = [{"role": "assistant", "content": "4"}]
    text = model.texts([prompt], [completion])[0]
    assert text == "<s><|user|>What is 2+2?\n<|assistant|>4\n"  # tests/hf_fixtures.CHAT_TEMPLATE
    assert model([prompt], [completion]) == pytest.approx(scores_by_hand(reward_model_dir, [text]), abs=1e-5)
