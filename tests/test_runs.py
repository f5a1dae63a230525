"""`bridgectl runs`: each run's status read honestly from its files. Real runs that completed, failed (a NaN), were
interrupted (SIGINT), are running (checked while their process trains) and were SIGKILLed (reported "died", not
"running", with their last step); heartbeats from other hosts, reused pids and zombies; the table shows what the
JSON says."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import bridgectl.core.grpo as grpo
from bridgectl.analysis import runs
from bridgectl.cli.app import app
from bridgectl.rundir import liveness

TINY = [
    "recipe=rl",
    "train.threads=1",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "eval.n=4",
    "train.eval_every=0",
]


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def metric_lines(run: Path) -> list[dict]:
    """The whole metrics.jsonl, parsed line by line (what the tail read must agree with)."""
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # cut by a kill
            pass
    return rows


def by_name(directory: Path) -> dict[str, dict]:
    return {run["name"]: run for run in runs.list_runs(directory)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A completed run and, one directory down, a run whose third step's loss is NaN."""
    root = tmp_path_factory.mktemp("runs")
    done = CliRunner().invoke(app, ["run", *TINY, "train.max_steps=2", "--out", str(root), "--name", "done"])
    assert done.exit_code == 0, done.output
    real, calls = grpo.rl_loss, []

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls.append(1)
        return (loss * math.nan if len(calls) == 2 else loss), stats

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grpo, "rl_loss", poisoned)
        # every step runs its passes, also one without signal (core/grpo.skips_backward): the NaN is step 2's
        patch.setattr(grpo, "skips_backward", lambda *args: False)
        nan = CliRunner().invoke(app, ["run", *TINY, "train.max_steps=3", "--out", str(root / "sub"), "--name", "nan"])
    assert nan.exit_code == 1, nan.output
    return root


def test_completed_and_failed_runs_report_their_summaries(finished):
    found = by_name(finished)
    assert list(found) == ["done", "sub/nan"]  # names relative to the directory, nested ones found too
    done, nan = found["done"], found["sub/nan"]
    expected = summary_of(finished / "done")
    assert done["status"] == "completed" and done["error"] is None
    assert (done["steps_done"], done["steps_total"], done["last_step"]) == (2, 2, 2)
    assert done["eval"] == {split: result["accuracy"] for split, result in expected["eval"].items()} != {}
    assert done["wall_s"] == expected["wall_s"] and (done["recipe"], done["seed"]) == ("rl", 0)
    assert done["pid"] is None  # a finished run's process is nobody's business

    assert nan["status"] == "failed" and "step 2" in nan["error"] and "nan" in nan["error"]
    assert nan["error"] == summary_of(finished / "sub" / "nan")["error"]  # whole in the JSON
    assert (nan["steps_done"], nan["steps_total"]) == (1, 3) and nan["eval"] == {}
    cell = runs.status_cell(nan)
    assert cell.startswith("failed: NonFiniteError: step 2 (rl): ") and len(cell) == len("failed: ") + 60


def test_the_table_shows_what_the_json_says(finished):
    as_json = CliRunner().invoke(app, ["runs", str(finished), "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    objects = json.loads(as_json.output)
    assert objects == runs.list_runs(finished)  # one object per run
    table = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["runs", str(finished)])
    assert table.exit_code == 0, table.output
    columns = runs.table_columns(objects)
    splits = runs.eval_splits(objects)
    assert [header for header, _ in columns] == [
        "run",
        "recipe",
        "seed",
        "status",
        "steps",
        *(f"{s} acc %" for s in splits),
        "wall s",
    ]
    shown = [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in table.output.splitlines()
        if line.startswith("│") and line.split("│")[1].strip() in ("done", "sub/nan")
    ]
    done = summary_of(finished / "done")
    assert shown[0] == [
        "done",
        "rl",
        "0",
        "completed",
        "2/2",
        *(f"{100 * done['eval'][s]['accuracy']:.1f}" for s in splits),
        f"{done['wall_s']:.0f}",
    ]
    assert shown[1][:5] == ["sub/nan", "rl", "0", runs.status_cell(objects[1]), "1/3"]
    assert shown[1][5:-1] == ["-"] * len(splits)


def test_a_run_mostly_without_signal_is_marked(finished, tmp_path):
    """A run's JSON object carries its RL steps and those without a learning signal (summary.json's counts, which
    match the steps metrics.jsonl marks rollout/no_signal); the status says "no signal" when they are most of them,
    not at half, and not for a run made before the counts existed."""
    done = by_name(finished)["done"]
    summary = summary_of(finished / "done")
    marked = [row["rollout/no_signal"] for row in metric_lines(finished / "done") if row["stage"] == "rl"]
    assert (done["rl_steps"], done["no_signal_steps"]) == (summary["rl_steps"], summary["no_signal_steps"])
    assert (done["rl_steps"], done["no_signal_steps"]) == (len(marked), sum(value == 1.0 for value in marked))
    cases = {
        "all": ({"no_signal_steps": 2}, "completed (no signal 2/2)"),
        "half": ({"no_signal_steps": 1}, "completed"),
        "old": ({"rl_steps": None, "no_signal_steps": None}, "completed"),
        "interrupted": ({"no_signal_steps": 2, "status": "interrupted"}, "interrupted (no signal 2/2)"),
        "failed": (
            {"no_signal_steps": 2, "status": "failed", "error": "NonFiniteError: x"},
            "failed: NonFiniteError: x",
        ),
    }  # the error first: it needs the room
    for name, (changes, _) in cases.items():
        shutil.copytree(finished / "done", tmp_path / name)
        edited = {key: value for key, value in {**summary, **changes}.items() if value is not None}
        (tmp_path / name / "summary.json").write_text(json.dumps(edited))
    found = by_name(tmp_path)
    assert {name: runs.status_cell(found[name]) for name in cases} == {
        name: shown for name, (_, shown) in cases.items()
    }
    assert (found["old"]["rl_steps"], found["old"]["no_signal_steps"]) == (None, None)
    table = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["runs", str(tmp_path)])
    assert table.exit_code == 0 and "completed (no signal 2/2)" in table.output, table.output


def start_run(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bridgectl.cli.app", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
    )


def wait_for_step(run: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (run / "metrics.jsonl").exists() or not any(
        row["stage"] != "init" and row["step"] >= step for row in metric_lines(run)
    ):
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.slow
def test_running_interrupted_resumed_and_killed(tmp_path):
    run = tmp_path / "live"
    args = [*TINY, "train.max_steps=1000", "train.checkpoint_every=0"]
    process = start_run([*args, "--out", str(tmp_path), "--name", "live"])
    try:
        wait_for_step(run, 1, process)
        live = by_name(tmp_path)["live"]
        assert live["status"] == "running" and summary_of(run)["status"] == "running"
        assert (live["pid"], live["host"]) == (process.pid, socket.gethostname())
        assert 1 <= live["last_step"] <= metric_lines(run)[-1]["step"] and live["steps_total"] == 1000
        assert runs.status_cell(live) == f"running (step {live['last_step']})"

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130
        stopped = by_name(tmp_path)["live"]
        assert stopped["status"] == "interrupted" and "SIGINT" in stopped["error"]
        assert stopped["steps_done"] == summary_of(run)["steps"] == metric_lines(run)[-1]["step"]

        process = start_run(["--resume", str(run)])  # a new process: the heartbeat is its own
        wait_for_step(run, stopped["steps_done"] + 2, process)
        resumed = by_name(tmp_path)["live"]
        assert resumed["status"] == "running" and resumed["pid"] == process.pid
        assert resumed["steps_done"] > summary_of(run)["steps"]  # the summary's counters date from the stop

        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert summary_of(run)["status"] == "running"  # what the run itself could say: nothing
    dead = by_name(tmp_path)["live"]
    assert dead["status"] == "died" and dead["pid"] == process.pid
    assert dead["last_step"] == dead["steps_done"] == metric_lines(run)[-1]["step"] > stopped["steps_done"]
    assert runs.status_cell(dead) == f"died (last step {dead['last_step']})"
    assert dead["wall_s"] == metric_lines(run)[-1]["wall_s"]


def write_running(run: Path, beat: dict | None) -> None:
    run.mkdir(parents=True)
    (run / "summary.json").write_text(
        json.dumps({"status": "running", "recipe": "rl", "seed": 3, "stages": [{"kind": "rl", "steps": 10}]})
    )
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "stage": "rl", "wall_s": 2.0 * s}) + "\n" for s in range(5))
    )
    if beat is not None:
        (run / "heartbeat.json").write_text(json.dumps(beat))


@pytest.mark.parametrize("age, status", [(30.0, "running"), (liveness.STALE_AFTER_SECONDS + 1, "died")])
def test_a_run_on_another_host_is_alive_while_its_heartbeat_is_fresh(tmp_path, age, status):
    write_running(tmp_path / "remote", {"host": "node-17", "pid": os.getpid(), "time": 5000.0 - age})
    found = runs.list_runs(tmp_path, now=5000.0)[0]
    assert found["status"] == status and found["host"] == "node-17"  # this pid is alive here: not what counts
    assert (found["steps_done"], found["steps_total"], found["wall_s"]) == (4, 10, 8.0)


def test_a_running_summary_without_a_heartbeat_is_unknown(tmp_path):
    write_running(tmp_path / "old", None)
    assert runs.list_runs(tmp_path)[0]["status"] == "unknown"


def test_only_the_recorded_process_counts_as_alive(tmp_path):
    ticks = liveness._proc_stat(os.getpid())[1]
    assert liveness.process_alive(os.getpid(), ticks)
    assert not liveness.process_alive(os.getpid(), ticks + 1)  # the pid, given to a later process
    assert not liveness.process_alive(0) and not liveness.process_alive(-1)  # never a process group
    child = subprocess.Popen(["true"])
    while liveness._proc_stat(child.pid)[0] != "Z":  # exited, not yet reaped: a zombie
        time.sleep(0.01)
    os.kill(child.pid, 0)  # the signal check alone would call it alive
    assert not liveness.process_alive(child.pid)
    child.wait()
    assert not liveness.process_alive(child.pid)
    write_running(
        tmp_path / "reused",
        {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": ticks + 1, "time": time.time()},
    )
    assert runs.list_runs(tmp_path)[0]["status"] == "died"


def test_the_heartbeat_is_refreshed_until_stopped(tmp_path):
    stop = liveness.start_heartbeat(tmp_path, interval=0.05)
    first = liveness.read_heartbeat(tmp_path)
    assert (first["host"], first["pid"]) == (socket.gethostname(), os.getpid())
    deadline = time.monotonic() + 10
    while liveness.read_heartbeat(tmp_path)["time"] == first["time"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stop()
    stop()  # twice is harmless
    last = liveness.read_heartbeat(tmp_path)
    time.sleep(0.2)
    assert liveness.read_heartbeat(tmp_path) == last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heartbeat.json"]  # no temporary file left behind


def test_the_last_step_is_read_from_the_end_of_the_log(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "stage": "rl", "wall_s": s / 3, "train/loss": [0.5] * (s % 40)} for s in range(2000)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 2000, "sta')  # torn by a kill
    assert runs.last_metrics_row(path, block=64) == rows[-1]  # blocks smaller than a line grow until one fits
    assert runs.last_metrics_row(path) == json.loads(path.read_text().splitlines()[-2])
    path.write_text('{"step": 0, "st')
    assert runs.last_metrics_row(path) is None and runs.last_metrics_row(tmp_path / "absent.jsonl") is None


def test_bad_directories_exit_2_with_a_hint(tmp_path):
    for args in (
        ["runs", str(tmp_path / "absent")],
        ["runs", str(tmp_path)],
        ["runs", str(tmp_path), "--format", "yaml"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "Error:" in result.output and "Hint:" in result.output, result.output
