"""model.init_from: a run starts from another run's final weights (or a model or adapter directory), so SFT in one
run and RL in the next is one more command. Checked by what the second run sees before its first update: its
step-0 evaluation answers every problem exactly as the first run's final evaluation did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bridgectl.cli.app import app

FAST = [
    "train.threads=1",
    "eval.n=30",
    "train.eval_every=0",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "sft.batch_size=8",
]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BRIDGECTL_CACHE", str(tmp_path / "cache"))  # merged adapters land here


def train(out: Path, name: str, *overrides: str) -> Path:
    result = CliRunner().invoke(app, ["run", *overrides, *FAST, "--out", str(out), "--name", name])
    assert result.exit_code == 0, result.output
    return out / name


def answers(run: Path, step: int) -> dict:
    rows = [json.loads(line) for line in (run / "eval_problems.jsonl").open()]
    return {row["split"]: row["rewards"] for row in rows if row["step"] == step}


def final_answers(run: Path) -> dict:
    return answers(run, json.loads((run / "summary.json").read_text())["steps"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "first",
    [
        ["recipe=sft", "train.max_steps=15"],
        ["recipe=sft", "train.max_steps=15", "model.finetune=lora"],
        ["recipe=bridge", "train.max_steps=3", "model.finetune=lora"],
    ],
    ids=["full", "lora", "bridge-lora"],
)
def test_second_run_starts_where_the_first_ended(tmp_path, first):
    before = train(tmp_path, "first", *first)
    after = train(
        tmp_path, "second", "recipe=rl", "train.max_steps=2", "model.finetune=lora", f"model.init_from={before}"
    )
    assert answers(after, 0) == final_answers(before)
    assert answers(after, 0) != answers(before, 0)  # the first run changed its answers: the check can fail
    # the second run's own evaluation reloads its adapter over the same starting weights
    result = CliRunner().invoke(app, ["eval", str(after), "--output", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "e.json").read_text())["results"]
    assert {split: row["per_problem"]["rewards"] for split, row in evaluated.items()} == final_answers(after)


@pytest.mark.slow
def test_adapter_directory_and_model_directory(tmp_path):
    lora = train(tmp_path, "lora", "recipe=sft", "train.max_steps=15", "model.finetune=lora")
    from_adapter = train(
        tmp_path, "a", "recipe=rl", "train.max_steps=1", f"model.init_from={lora / 'checkpoints' / 'final'}"
    )
    assert answers(from_adapter, 0) == final_answers(lora)
    merged = next((tmp_path / "cache").glob("init-*"))  # the merge is a plain model directory, reused
    from_model = train(tmp_path, "m", "recipe=rl", "train.max_steps=1", f"model.init_from={merged}")
    assert answers(from_model, 0) == final_answers(lora)
    assert len(list((tmp_path / "cache").glob("init-*"))) == 1


def test_bad_init_from_exits_2_before_writing_anything(tmp_path):
    (tmp_path / "empty").mkdir()
    for source in (tmp_path / "missing", tmp_path / "empty"):
        result = CliRunner().invoke(
            app, ["run", f"model.init_from={source}", "--out", str(tmp_path / "runs"), "--name", "x"]
        )
        assert result.exit_code == 2 and "model.init_from" in result.output and "Hint:" in result.output
        assert not (tmp_path / "runs" / "x").exists()


def test_pickled_adapter_weights_are_refused(tmp_path):
    """An adapter directory holding only adapter_model.bin (a pickle, which can run code when loaded) is refused,
    as full models without safetensors are, before a run directory is written."""
    import shutil

    import torch
    from safetensors.torch import load_file

    lora = train(tmp_path, "lora", "recipe=sft", "train.max_steps=1", "model.finetune=lora")
    pickled = tmp_path / "pickled"
    shutil.copytree(lora / "checkpoints" / "final", pickled)
    weights = pickled / "adapter_model.safetensors"
    torch.save(load_file(weights), pickled / "adapter_model.bin")
    weights.unlink()
    result = CliRunner().invoke(
        app,
        [
            "run",
            "recipe=rl",
            "train.max_steps=1",
            f"model.init_from={pickled}",
            *FAST,
            "--out",
            str(tmp_path / "runs"),
            "--name",
            "x",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "adapter_model.bin" in result.output and "safetensors" in result.output and "Hint:" in result.output
    assert not (tmp_path / "runs" / "x").exists()
