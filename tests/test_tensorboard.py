"""TensorBoard (`tracker.tensorboard=true`): the event files in `<run>/tensorboard/`, read back with TensorBoard's
own reader, hold every numeric value of metrics.jsonl at its step, exactly; a run SIGKILLed after its checkpoint and
resumed keeps one point per step (the killed process's points after the checkpoint are gone), and so does one
resumed without a checkpoint (it starts over); without the tensorboard package the key exits 2 before anything is
written."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from test_resume import start_run, wait_for_step
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.config.compose import compose
from bridgectl.errors import StopRun
from bridgectl.training.runner import run as train

SMALL = [
    "recipe=rl",
    "train.threads=1",
    "train.max_steps=6",
    "train.eval_every=3",
    "train.checkpoint_every=2",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "eval.n=10",
    "tracker.tensorboard=true",
]


def metric_points(run: Path) -> dict[str, list]:
    """What TensorBoard should show: per key of metrics.jsonl, its (step, value) in the order logged. `stage` is
    text and null is a value that was not finite: neither is a point."""
    points = defaultdict(list)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                points[key].append((row["step"], value))
    return dict(points)


def tensorboard_points(run: Path) -> dict[str, list]:
    """The scalars TensorBoard finds in `<run>/tensorboard/`, read by the accumulator its server uses
    (plugin_event_accumulator; the older event_accumulator does not purge tensor events), every event kept."""
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.util import tensor_util

    keep_all = plugin_event_accumulator.STORE_EVERYTHING_SIZE_GUIDANCE
    events = plugin_event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance=keep_all)
    events.Reload()
    return {
        tag: [(event.step, tensor_util.make_ndarray(event.tensor_proto).item()) for event in events.Tensors(tag)]
        for tag in events.Tags()["tensors"]
    }


def raw_points(run: Path, tag: str) -> list[int]:
    """The steps of `tag` in the event files as written, without the reader's purging."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


def test_event_files_hold_every_metric_of_every_step(tmp_path):
    result = CliRunner().invoke(app, ["run", *SMALL, "--out", str(tmp_path), "--name", "tb"])
    assert result.exit_code == 0, result.output
    expected = metric_points(tmp_path / "tb")
    assert {"wall_s", "train/rl_loss", "train/reward_mean", "perf/step_s", "eval/test/accuracy"} <= expected.keys()
    assert [step for step, _ in expected["eval/test/accuracy"]] == [0, 3, 6]  # init, periodic, final
    assert tensorboard_points(tmp_path / "tb") == expected  # float64 both sides: equal, not approximately


@pytest.mark.slow
def test_a_killed_and_resumed_run_keeps_one_point_per_step(tmp_path):
    process = start_run(SMALL, tmp_path, "killed")
    wait_for_step(tmp_path / "killed", 5, process)  # past the checkpoint of step 4
    deadline = time.monotonic() + 60
    while max(raw_points(tmp_path / "killed", "train/rl_loss"), default=0) < 5:  # events after it, to be dropped
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()

    resumed = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "killed")])
    assert resumed.exit_code == 0, resumed.output
    run = tmp_path / "killed"
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 4
    expected = metric_points(run)
    assert [step for step, _ in expected["train/rl_loss"]] == [1, 2, 3, 4, 5, 6]
    assert tensorboard_points(run) == expected
    # the resumed run rewrote the events from metrics.jsonl: one file, each step once, whatever reads it
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert raw_points(run, "train/rl_loss") == [1, 2, 3, 4, 5, 6]


def test_a_run_resumed_without_a_checkpoint_starts_over_with_one_point_per_step(tmp_path):
    def stop(step, metrics):
        raise StopRun("stopped")

    run = tmp_path / "stopped"
    with pytest.raises(StopRun):  # at the step-3 evaluation, with no checkpoint written
        train(compose([*SMALL, "train.checkpoint_every=0"]), run, show_progress=False, on_eval=stop)
    resumed = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    expected = metric_points(run)
    assert [step for step, _ in expected["eval/test/accuracy"]] == [0, 3, 6]  # step 0's evaluation once
    assert tensorboard_points(run) == expected


def test_without_the_tensorboard_package_the_key_exits_2_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: importing it fails
    result = CliRunner().invoke(app, ["run", "tracker.tensorboard=true", "--out", str(tmp_path / "runs")])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Error: tracker.tensorboard=true needs the tensorboard package" in output
    assert "Hint: pip install 'bridgectl[tensorboard]'" in output
    assert not (tmp_path / "runs").exists()
