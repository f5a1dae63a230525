"""Two runs started at once with the same --name: the directory is claimed by one atomic mkdir before anything is
written, so one run trains undisturbed and the other exits 2 without touching it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.rundir.writer import RunDir

pytestmark = pytest.mark.slow  # processes, runs and studies: make test-fast leaves these out

RUN = [
    "recipe=rl",
    "train.max_steps=3",
    "train.threads=1",
    "train.eval_every=0",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "eval.n=10",
]


def rows_without_clock(run: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("wall_s", "perf/step_s", "perf/gen_tokens_per_s")}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def test_two_runs_with_one_name_one_trains_the_other_exits_2(tmp_path):
    # the pre-flight check of the CLI passes for both (neither directory exists yet); the claim decides
    command = [sys.executable, "-m", "bridgectl.cli.app", "run", *RUN, "--out", str(tmp_path), "--name", "same"]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
        for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.stdout.read()) for p in processes]
    codes = sorted(code for code, _ in results)
    outputs = " ".join(" ".join(output.split()) for _, output in results)
    assert codes == [0, 2], outputs  # one trains, the other is refused (by the CLI's check or by the claim)
    assert "already exists" in outputs and "training failed" not in outputs
    # the winner's directory holds exactly what an undisturbed run writes
    alone = CliRunner().invoke(app, ["run", *RUN, "--out", str(tmp_path), "--name", "alone"])
    assert alone.exit_code == 0, alone.output
    assert rows_without_clock(tmp_path / "same") == rows_without_clock(tmp_path / "alone")
    assert json.loads((tmp_path / "same" / "summary.json").read_text())["status"] == "completed"


def test_a_claimed_directory_is_refused_and_left_alone(tmp_path):
    """The race made certain: the directory appears between the CLI's check and the claim."""
    claimed = tmp_path / "run"
    RunDir(claimed).close()
    (claimed / "marker").write_text("the other run's")
    before = sorted(p.name for p in claimed.iterdir())
    try:
        RunDir(claimed)
    except Exception as error:
        assert type(error).__name__ == "UserError" and "already exists" in error.message
    else:
        raise AssertionError("a second claim of the same directory succeeded")
    assert sorted(p.name for p in claimed.iterdir()) == before and (claimed / "marker").read_text() == "the other run's"
