"""`bridgectl run` in a subprocess, for the tests that are about processes (signals, a live run): start one, wait
for a phase it records in its heartbeat, read its files. Every wait has a deadline, so nothing can hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

TINY = [
    "recipe=sft",
    "train.threads=1",
    "train.max_steps=2",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "sft.batch_size=4",
    "eval.n=8",
]
"""The cheapest real run: SFT on the tiny built-in model, two steps, eight problems per evaluation split."""


def start_run(args: list[str]) -> subprocess.Popen:
    """`bridgectl run ARGS` in a new process (its output in .stdout, stderr merged)."""
    return subprocess.Popen(
        [sys.executable, "-m", "bridgectl.cli.app", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
    )


def read_json(path: Path) -> dict | None:
    """A JSON file written atomically by the run, or None while it is not there yet."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Polls `condition()` until it holds; fails when the process ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{process.stdout.read().decode()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.02)


def wait_for_phase(run: Path, phase: str, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until the run's heartbeat says it is in `phase` (runner.py records each phase as it enters it)."""
    wait_for(
        lambda: (read_json(run / "heartbeat.json") or {}).get("phase") == phase, process, f"phase {phase!r}", timeout
    )


def finish(process: subprocess.Popen, timeout: float = 120) -> str:
    """The process's whole output once it has ended (killed if it has not within `timeout` seconds)."""
    try:
        return process.communicate(timeout=timeout)[0].decode()
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
