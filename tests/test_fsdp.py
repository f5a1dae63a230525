"""Sharded data parallelism (`--nproc 2 train.fsdp=true`, FSDP2 over 2 gloo processes on the CPU): each process
holds half of the model, and the run follows the single-process run with the same global batch (losses, rewards,
BRIDGE's shadow loss and gradient norms, eval and final weights to float rounding); checkpoints gather the shards
whole (BRIDGE's shadow included), so a sharded run SIGKILLed after a checkpoint resumes to the same result as one
never stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_distributed import SMALL, rows, weights
from test_resume import final_weights, metric_rows, wait_for_step
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.rundir.liveness import process_alive

pytestmark = pytest.mark.slow  # processes, runs and studies: make test-fast leaves these out

SHARDED = ["--nproc", "2", "train.fsdp=true"]


def run_cli(arguments: list[str]) -> subprocess.CompletedProcess:
    """`bridgectl ARGUMENTS` in a subprocess, with what its torchrun workers print (CliRunner sees the launcher's
    output only)."""
    return subprocess.run(
        [sys.executable, "-m", "bridgectl.cli.app", *arguments], capture_output=True, text=True, env=os.environ.copy()
    )


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (torchrun starts its workers in sessions of their own, so killing the
    launcher's process group would leave them running)."""
    parents = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as handle:
                    parents[int(stat)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def wait_until_gone(pids: list[int], timeout: float = 60.0) -> None:
    """Returns once none of `pids` is alive by the rule `--resume` applies (a zombie counts as gone)."""
    deadline = time.monotonic() + timeout
    while any(process_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, [pid for pid in pids if process_alive(pid)]
        time.sleep(0.05)


def held_share(output: str) -> float:
    """The share of the model's parameters the first process said it holds."""
    found = re.search(r"this process holds ([\d,]+) of the model's ([\d,]+) parameters", " ".join(output.split()))
    assert found, output
    held, total = (int(group.replace(",", "")) for group in found.groups())
    return held / total


# BRIDGE's passes hold the others': its RL pass is rl's (core/grpo.rl_backward) and its SFT pass two_stage's
# (core/losses.sft_backward), over LoRA and over full weights with the shadow
@pytest.mark.parametrize("recipe", [["recipe=bridge", "model.finetune=lora"], ["recipe=bridge", "bridge.lower=full"]])
def test_a_sharded_run_matches_one_process(tmp_path, recipe):
    settings = [*recipe, *SMALL[:-1], "train.checkpoint_every=1"]  # a checkpoint each step: gathered shards
    single = CliRunner().invoke(app, ["run", *settings, "--out", str(tmp_path), "--name", "one"])
    assert single.exit_code == 0, single.output
    sharded = run_cli(["run", *settings, *SHARDED, "--out", str(tmp_path), "--name", "sharded"])
    assert sharded.returncode == 0, sharded.stdout
    assert held_share(sharded.stdout) == pytest.approx(0.5, abs=0.01)

    one, two = rows(tmp_path / "one"), rows(tmp_path / "sharded")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    compared = 0
    for a, b in zip(one, two):
        for key in (
            "train/rl_loss",
            "train/sft_loss",
            "train/reward_mean",
            "train/grad_norm",
            "train/rl_loss_shadow",
            "bridge/coop_gain",
            "bridge/grad_norm_w",
            "bridge/grad_norm_theta_hat",
            "eval/test/accuracy",
            "eval/ood/accuracy",
        ):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
                compared += 1
    assert compared >= 6
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "sharded")
    assert w1.keys() == w2.keys() and w1
    for key in w1:  # whole tensors, saved from the gathered shards
        torch.testing.assert_close(w2[key], w1[key], atol=1e-4, rtol=1e-4)
    checkpoints = sorted((tmp_path / "sharded" / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-000001", "step-000002"]


# sharded: the checkpoint gathers the shards (BRIDGE's shadow included) and the resumed processes shard them again;
# plain data parallelism writes rank 0's whole model, the single-process format test_resume.py resumes
@pytest.mark.parametrize("recipe, processes", [(["recipe=bridge", "model.finetune=lora"], SHARDED)])
def test_a_multi_process_run_killed_after_a_checkpoint_resumes_to_the_same_result(tmp_path, recipe, processes):
    settings = [*recipe, *SMALL[:-1], "train.checkpoint_every=1", "train.eval_every=2"]  # 3 steps
    straight = CliRunner().invoke(app, ["run", *settings, *processes, "--out", str(tmp_path), "--name", "straight"])
    assert straight.exit_code == 0, straight.output

    run = tmp_path / "killed"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bridgectl.cli.app",
            "run",
            *settings,
            *processes,
            "--out",
            str(tmp_path),
            "--name",
            "killed",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
    )
    wait_for_step(run, 2, process)  # step 2 is logged after step 1's checkpoint was written
    killed = [process.pid, *descendants(process.pid)]  # the launcher, torchrun and both workers, at once
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    process.wait()
    wait_until_gone(killed)  # a SIGKILLed worker still exits for a moment; resume refuses a live run's directory
    assert not (run / "checkpoints" / "final").exists()

    resumed = CliRunner().invoke(app, ["run", "--resume", str(run), "--nproc", "2"])
    assert resumed.exit_code == 0, resumed.output
    assert metric_rows(run) == metric_rows(tmp_path / "straight")
    expected = final_weights(tmp_path / "straight")
    got = final_weights(run)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0)
