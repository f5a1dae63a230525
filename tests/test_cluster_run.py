"""`bridgectl run --launcher submitit-local`: the SLURM path of one run on this machine (submitit's local executor,
its tasks playing the nodes). Two tasks as two torchrun nodes equal the single-process run; a job preempted
(submitit's signal to its first task) after a checkpoint is requeued and continues the run as --resume, one
history from step 0; bad launcher settings exit 2 before anything is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_distributed import SMALL, rows, weights
from typer.testing import CliRunner

from bridgectl.cli.app import app

pytestmark = pytest.mark.slow  # processes, runs and studies: make test-fast leaves these out


def test_two_tasks_of_one_job_train_as_one_process(tmp_path):
    settings = ["recipe=rl", *SMALL]
    single = CliRunner().invoke(app, ["run", *settings, "--out", str(tmp_path), "--name", "one"])
    assert single.exit_code == 0, single.output
    job = CliRunner().invoke(
        app,
        [
            "run",
            *settings,
            "--launcher",
            "submitit-local",
            "--nnodes",
            "2",
            "--nproc",
            "1",
            "--launcher-opt",
            "timeout_min=10",
            "--out",
            str(tmp_path),
            "--name",
            "job",
        ],
    )
    assert job.exit_code == 0, job.output
    assert "submitted job" in job.output and "2 node(s) x 1 process(es)" in job.output
    assert list((tmp_path / ".submitit" / "job").glob("*_0_log.out"))  # it ran as a submitit job's tasks
    one, two = rows(tmp_path / "one"), rows(tmp_path / "job")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("train/rl_loss", "train/reward_mean", "train/grad_norm", "eval/test/accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "job")
    assert w1.keys() == w2.keys() and w1
    for key in w1:  # as tests/test_multinode.py: gloo's reductions round differently from one process's sums
        torch.testing.assert_close(w2[key], w1[key], atol=1e-4, rtol=1e-4)


def task_processes(folder: Path) -> list[int]:
    """The pids of the job's submitit task processes (python -m submitit.core._submit FOLDER)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in command and str(folder).encode() in command:
            found.append(int(entry.name))
    return found


def test_a_preempted_job_is_requeued_and_continues_the_run(tmp_path):
    settings = [
        "recipe=rl",
        *[s for s in SMALL if not s.startswith(("train.max_steps", "train.checkpoint_every"))],
        "train.max_steps=6",
        "train.checkpoint_every=2",
    ]
    command = [
        sys.executable,
        "-m",
        "bridgectl",
        "run",
        *settings,
        "--launcher",
        "submitit-local",
        "--launcher-opt",
        "timeout_min=10",
        "--out",
        str(tmp_path),
        "--name",
        "pre",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    run_path, folder = tmp_path / "pre", tmp_path / ".submitit" / "pre"
    try:
        deadline = time.monotonic() + 180
        while not list((run_path / "checkpoints").glob("step-*")):
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.1)
        (task,) = task_processes(folder)
        os.kill(task, signal.SIGUSR2)  # what SLURM sends (--signal) before preempting or at the time limit
        output = process.communicate(timeout=240)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, output
    summary = json.loads((run_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] >= 2
    steps = [r["step"] for r in rows(run_path)]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 6 and steps.count(1) == 1
    log = "".join(path.read_text() for path in folder.glob("*_log.*"))
    assert "this job is preempted" in log or "Requeued" in log, log


@pytest.mark.parametrize(
    "args, message",
    [
        (["--launcher", "pbs"], "unknown launcher 'pbs'"),
        (["--launcher", "submitit-local", "--launcher-opt", "colour=blue"], "submitit rejected"),
        (["--launcher-opt", "timeout_min=5"], "applies to --launcher slurm"),
        (["--launcher", "submitit-local", "--rdzv-endpoint", "h:1"], "set by the job"),
        (["--launcher", "slurm"], "srun"),  # this machine has no Slurm
    ],
)
def test_bad_launcher_settings_exit_2_and_write_nothing(tmp_path, args, message):
    result = CliRunner().invoke(app, ["run", "recipe=rl", "train.max_steps=1", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and "Error:" in result.output and message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
