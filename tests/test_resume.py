"""Exact resume: a run SIGKILLed at a random step and resumed with `bridgectl run --resume` ends with the same
metrics and weights as a run never stopped; checkpoints survive kills in the middle of being written; SIGINT and
SIGTERM stop after the step with a checkpoint, status `interrupted` and exit 130; a NaN stops the run with status
`failed`, naming the step and the quantity, and keeps the last good checkpoint."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import bridgectl.core.grpo as grpo
from bridgectl.cli.app import app
from bridgectl.core.checkpoint import list_checkpoints, read_checkpoint, restore, save_checkpoint

SHORT = [
    "train.threads=1",
    "train.max_steps=6",
    "train.eval_every=3",
    "train.checkpoint_every=2",
    "rl.prompts_per_step=4",
    "rl.num_generations=4",
    "sft.batch_size=8",
    "eval.n=20",
    "eval.k=2",
]


def metric_rows(run: Path) -> list[dict]:
    """metrics.jsonl without what depends on the clock."""
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith("perf/") and k != "wall_s"}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted((run / "checkpoints" / "final").rglob("*.safetensors")):
        tensors.update({f"{file.parent.name}/{file.name}/{k}": v for k, v in load_file(str(file)).items()})
    assert tensors
    return tensors


def wait_for_step(run: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline
        metrics = run / "metrics.jsonl"
        if metrics.exists() and any(
            json.loads(line).get("step", 0) >= step and json.loads(line)["stage"] != "init"
            for line in metrics.read_text().splitlines()
            if line.strip()
        ):
            return
        time.sleep(0.02)


def start_run(overrides: list[str], out: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bridgectl.cli.app", "run", *overrides, "--out", str(out), "--name", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
    )


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [["recipe=rl"], ["recipe=bridge", "model.finetune=lora"]])
def test_a_run_killed_at_a_random_step_resumes_to_the_same_result(tmp_path, recipe):
    overrides = [*recipe, *SHORT]
    straight = CliRunner().invoke(app, ["run", *overrides, "--out", str(tmp_path), "--name", "straight"])
    assert straight.exit_code == 0, straight.output

    kill_at = random.randint(3, 5)
    process = start_run(overrides, tmp_path, "killed")
    wait_for_step(tmp_path / "killed", kill_at, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["status"] == "running"  # no goodbye

    resumed = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "killed"), *overrides])
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6, f"killed at step {kill_at}"
    assert summary["resumed_from_step"] in (2, 4)
    assert metric_rows(tmp_path / "killed") == metric_rows(tmp_path / "straight"), f"killed at step {kill_at}"
    problems = [(tmp_path / name / "eval_problems.jsonl").read_text() for name in ("killed", "straight")]
    assert problems[0] == problems[1]  # per-problem records: the killed run's rows after its checkpoint were cut
    expected, got = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
@pytest.mark.parametrize("signal_to_send", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_stop_after_the_step_with_a_checkpoint(tmp_path, signal_to_send):
    overrides = ["recipe=rl", *SHORT, "train.checkpoint_every=0"]  # no periodic checkpoint: the stop writes one
    process = start_run(overrides, tmp_path, "stopped")
    wait_for_step(tmp_path / "stopped", 2, process)
    process.send_signal(signal_to_send)
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode == 130, output
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and signal_to_send.name in summary["error"]
    checkpoints = list_checkpoints(tmp_path / "stopped" / "checkpoints")
    assert len(checkpoints) == 1 and read_checkpoint(checkpoints[0])[0]["step"] == summary["steps"]
    assert "bridgectl run --resume" in output
    resumed = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "stopped")])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((tmp_path / "stopped" / "summary.json").read_text())["status"] == "completed"


def _write_checkpoints_forever(directory: str) -> None:
    """Child process: checkpoints of a model whose every weight equals the step, one after another."""
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    stage = _Stage(model)
    generator = torch.Generator()
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(step)
        stage.updates = step
        save_checkpoint(Path(directory), step, model, stage, generator, {"stage_index": 0}, keep=2)


class _Stage:
    def __init__(self, model) -> None:
        self.ctx = None
        self.optimizer = torch.optim.AdamW(model.parameters())
        self.updates = 0

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]

    def step(self):
        raise NotImplementedError


@pytest.mark.slow
def test_checkpoints_survive_kills_while_being_written(tmp_path):
    context = multiprocessing.get_context("fork")
    directory = tmp_path / "checkpoints"
    rng = random.Random()
    for _ in range(25):
        writer = context.Process(target=_write_checkpoints_forever, args=(str(directory),))
        writer.start()
        time.sleep(rng.uniform(0.01, 0.25))  # somewhere inside a write, most of the time
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        found = list_checkpoints(directory)
        if not found:
            continue  # killed before its first checkpoint was complete
        meta, trainer, tensors = read_checkpoint(found[-1])
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
        stage = _Stage(model)
        restore(model, stage, torch.Generator(), trainer, tensors)
        assert stage.updates == meta["step"]  # every file of the checkpoint is from the same write
        assert all(torch.all(p == meta["step"]) for p in model.parameters())
    assert list_checkpoints(directory), "no kill landed after a complete checkpoint"
    complete = list_checkpoints(directory)
    list_checkpoints(directory, remove_partial=True)  # what --resume does first
    assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in complete)


@pytest.mark.slow
def test_a_nan_stops_the_run_naming_step_and_quantity_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real, calls = grpo.rl_loss, []  # what rl_backward computes for each micro-batch (one per step here)

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls.append(1)
        return (loss * math.nan if len(calls) == 3 else loss), stats

    monkeypatch.setattr(grpo, "rl_loss", poisoned)
    result = CliRunner().invoke(app, ["run", "recipe=rl", *SHORT, "--out", str(tmp_path), "--name", "nan"])
    assert result.exit_code == 1
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert (
        summary["status"] == "failed"
        and "step 3" in summary["error"]
        and "norm of the gradients is nan" in summary["error"]
    )
    assert [read_checkpoint(p)[0]["step"] for p in list_checkpoints(tmp_path / "nan" / "checkpoints")] == [2]

    # resuming needs the run's own config, unless a change is allowed
    monkeypatch.setattr(grpo, "rl_loss", real)
    refused = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "nan"), "rl.lr=5e-5"])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "change rl.lr" in said and "--allow-change rl.lr" in said
    allowed = CliRunner().invoke(
        app, ["run", "--resume", str(tmp_path / "nan"), "rl.lr=5e-5", "--allow-change", "rl.lr"]
    )
    assert allowed.exit_code == 0, allowed.output
    assert "lr: 5.0e-05" in (tmp_path / "nan" / "config.yaml").read_text()
    done = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "nan")])
    assert done.exit_code == 2 and "already completed" in " ".join(done.output.split())
