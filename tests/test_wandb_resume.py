"""W&B across resumes (offline here): a run SIGKILLed after its checkpoint and resumed with `bridgectl run --resume`
continues the same W&B run id, and the histories under that id hold every step of metrics.jsonl once, with its
values; a sweep's trial runs are grouped under the study."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
from test_resume import start_run, wait_for_step
from test_tensorboard import metric_points, tensorboard_points
from test_tracking import items, wandb_records
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.config.compose import compose
from bridgectl.errors import StopRun
from bridgectl.rundir.wandb_sink import _history_steps
from bridgectl.training.runner import run as train

pytestmark = pytest.mark.slow  # processes, runs and studies: make test-fast leaves these out

SMALL = [
    "recipe=rl",
    "train.threads=1",
    "train.max_steps=6",
    "train.eval_every=3",
    "train.checkpoint_every=2",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "eval.n=10",
    "tracker.wandb.mode=offline",
]
DETERMINISTIC = ("train/rl_loss", "train/reward_mean", "eval/test/accuracy")  # not the clock's wall_s, perf/*


def offline_runs(run: Path) -> list[tuple[str, list]]:
    """(run id, records) of each offline W&B run in the run directory, oldest first; the id read from the
    directory's name, `offline-run-<time>-<id>` (a `-N` suffix when two start in the same second)."""
    found = []
    for directory in sorted((run / "wandb").glob("offline-run-*")):
        run_id = re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)(-\d+)?", directory.name).group(1)
        found.append((run_id, wandb_records(directory / f"run-{run_id}.wandb")))
    return found


def wait_for_log(run: Path, timeout: float = 60) -> None:
    """W&B's service (wandb-core, its own process) writes the log after `finish()` returns: waits until the newest
    offline log of `run` ends with its exit record."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in offline_runs(run)[-1][1]):
                return
        except Exception:  # not there yet, or its last record half written
            pass
        assert time.monotonic() < deadline, f"no complete W&B log in {run}"
        time.sleep(0.1)


def wait_for_service_of(pid: int, timeout: float = 60) -> None:
    """Waits until the W&B service of process `pid` (`wandb-core ... --pid PID`) has exited: it writes the log of
    a killed process until then."""
    marker, deadline = f"--pid\0{pid}\0".encode(), time.monotonic() + timeout
    while any(marker in command for command in _command_lines()):
        assert time.monotonic() < deadline, f"the W&B service of {pid} is still running"
        time.sleep(0.1)


def _command_lines() -> list[bytes]:
    lines = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(path.read_bytes())
        except OSError:  # a process that ended meanwhile
            pass
    return lines


def history(records: list) -> list[dict]:
    return [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]


def test_a_killed_and_resumed_run_is_one_wandb_run_with_each_step_once(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    # its own W&B service, as a run started from a shell has: a W&B session started earlier in this test process
    # (test_compare's) is inherited through WANDB_SERVICE, and the killed run's id would stay in use there
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    process = start_run(SMALL, tmp_path, "killed")
    run = tmp_path / "killed"
    wait_for_step(run, 5, process)  # past the checkpoint of step 4
    process.send_signal(signal.SIGKILL)
    process.wait()
    wait_for_service_of(process.pid)
    first_id = json.loads((run / "wandb_run.json").read_text())["id"]
    held_before = _history_steps(next((run / "wandb").glob(f"offline-run-*/run-{first_id}.wandb")))

    resumed = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 4
    wait_for_log(run)
    logs = offline_runs(run)
    assert [run_id for run_id, _ in logs] == [first_id, first_id]  # one W&B run, logged by two processes
    header = next(r.run for r in logs[1][1] if r.WhichOneof("record_type") == "run")
    assert header.resume and header.display_name == "killed"  # `wandb sync` appends it to the first

    rows = [row for _, records in logs for row in history(records)]
    steps = [row["_step"] for row in rows]
    assert sorted(steps) == list(range(7)) and len(set(steps)) == len(steps)  # every step, once
    assert [row["_step"] for row in history(logs[0][1])] == held_before  # the killed process's rows stay
    expected = metric_points(run)
    for key in DETERMINISTIC:  # the values metrics.jsonl has, whichever process sent them
        assert [(row["_step"], row[key]) for row in sorted(rows, key=lambda r: r["_step"]) if key in row] == expected[
            key
        ]
    summary = {}
    for record in logs[1][1]:
        if record.WhichOneof("record_type") == "summary":
            summary.update(items(record.summary.update))
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 4


def test_steps_the_wandb_run_holds_past_the_checkpoint_are_not_sent_again(tmp_path, monkeypatch):
    """The case a kill leaves when W&B had written steps after the checkpoint (online, the server has them): here
    a run stopped at its step-3 evaluation (W&B finishes, holding steps 0-3) whose last checkpoint is step 2."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))

    def stop(step, metrics):
        raise StopRun("stopped")

    run = tmp_path / "stopped"
    with pytest.raises(StopRun):
        train(compose(SMALL), run, show_progress=False, on_eval=stop)
    wait_for_log(run)
    assert [row["_step"] for _, records in offline_runs(run) for row in history(records)] == [0, 1, 2, 3]

    resumed = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 2
    wait_for_log(run)
    (first_id, first), (second_id, second) = offline_runs(run)
    assert first_id == second_id
    assert [row["_step"] for row in history(second)] == [4, 5, 6]  # 3 is the first process's; 4-6 new
    rows = sorted(history(first) + history(second), key=lambda row: row["_step"])
    expected = metric_points(run)
    for key in DETERMINISTIC:
        assert [(row["_step"], row[key]) for row in rows if key in row] == expected[key]


def test_reading_a_log_cut_by_a_kill_stops_at_the_last_whole_record(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    result = CliRunner().invoke(app, ["run", *SMALL, "train.max_steps=3", "--out", str(tmp_path), "--name", "w"])
    assert result.exit_code == 0, result.output
    wait_for_log(tmp_path / "w")
    ((run_id, records),) = offline_runs(tmp_path / "w")
    log = next((tmp_path / "w" / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))
    whole = [r.history.step.num for r in records if r.WhichOneof("record_type") == "history"]
    assert _history_steps(log) == whole == [0, 1, 2, 3]
    data = log.read_bytes()
    cut = tmp_path / "cut.wandb"
    for size in range(7, len(data), 97):  # cut anywhere: a prefix of the steps, never an error
        cut.write_bytes(data[:size])
        steps = _history_steps(cut)
        assert steps == whole[: len(steps)]


def test_a_sweeps_runs_are_grouped_under_the_study_with_tensorboard_events_per_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: grouped\nbase: [recipe=rl, train.max_steps=2, rl.prompts_per_step=2, rl.num_generations=2,"
        " eval.n=10, train.threads=1, tracker.wandb.mode=offline, tracker.tensorboard=true]\n"
        "seeds: [0, 1]\nsampler: grid\nparams:\n  rl.lr: {type: float, values: [0.0001]}\n"
    )
    result = CliRunner().invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    runs = sorted(path.parent for path in (tmp_path / "out" / "grouped").rglob("summary.json"))
    assert [run.name for run in runs] == ["trial-000-seed0", "trial-000-seed1"]
    for run in runs:
        wait_for_log(run)
        ((_, records),) = offline_runs(run)
        header = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert header.run_group == "grouped" and header.display_name == run.name
        assert tensorboard_points(run) == metric_points(run)  # `tensorboard --logdir out/grouped`: one per seed
