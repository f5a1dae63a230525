"""SIGINT and SIGTERM anywhere in a run end it with status `interrupted` and exit 130 (runner.RunSignals), not only in
the training loop: during the initial evaluation, and during the final one, which follows a checkpoint of the last
step, so that `--resume` re-runs that evaluation alone and ends as an uninterrupted run does. Real processes; the
evaluations are made slow enough (more problems, smaller batches) to be hit while the heartbeat says they run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from processes import TINY, finish, read_json, start_run, wait_for_phase
from safetensors.torch import load_file
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.core.checkpoint import list_checkpoints, read_checkpoint
from bridgectl.training.runner import RunSignals

pytestmark = pytest.mark.slow  # processes, runs and studies: make test-fast leaves these out

SLOW_FINAL = [*TINY, "eval.n=30", "eval.batch_size=2"]
"""A short initial evaluation (the untrained model answers in a few tokens) and a final one of a second or more."""
SLOW_INITIAL = [*TINY, "eval.n=16", "eval.batch_size=4", "eval.k=2", "eval.samples=4"]
"""Sampled answers run to max_new_tokens: an initial evaluation of a second or more."""


def rows(run: Path, name: str) -> list[dict]:
    """A jsonl log of the run without what depends on the clock."""
    return [
        {k: v for k, v in json.loads(line).items() if k != "wall_s" and not k.startswith("perf/")}
        for line in (run / name).read_text().splitlines()
    ]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """SLOW_FINAL run to the end, never stopped: what a resumed run must equal."""
    out = tmp_path_factory.mktemp("straight")
    result = CliRunner().invoke(app, ["run", *SLOW_FINAL, "--out", str(out), "--name", "straight"])
    assert result.exit_code == 0, result.output
    return out / "straight"


def test_sigterm_during_the_initial_evaluation_ends_interrupted_with_exit_130(tmp_path):
    run = tmp_path / "r"
    process = start_run([*SLOW_INITIAL, "--out", str(tmp_path), "--name", "r"])
    wait_for_phase(run, "the initial evaluation", process)
    process.send_signal(signal.SIGTERM)
    output = finish(process)
    assert process.returncode == 130, output
    summary = read_json(run / "summary.json")
    assert summary["status"] == "interrupted", summary
    assert summary["error"] == "KeyboardInterrupt: SIGTERM during the initial evaluation"
    assert "eval_initial" not in summary and summary["steps"] == 0
    assert "bridgectl run --resume" in output


# SIGINT here, SIGTERM during the initial evaluation above: one handler takes both (runner.RunSignals)
@pytest.mark.parametrize("signal_to_send", [signal.SIGINT], ids=["SIGINT"])
def test_a_signal_during_the_final_evaluation_resumes_to_the_uninterrupted_result(tmp_path, straight, signal_to_send):
    run = tmp_path / "r"
    process = start_run([*SLOW_FINAL, "--out", str(tmp_path), "--name", "r"])
    wait_for_phase(run, "the final evaluation", process)
    process.send_signal(signal_to_send)
    output = finish(process)
    assert process.returncode == 130, output
    summary = read_json(run / "summary.json")
    assert summary["status"] == "interrupted"
    assert summary["error"] == f"KeyboardInterrupt: {signal_to_send.name} during the final evaluation"
    (last,) = list_checkpoints(run / "checkpoints")  # train.checkpoint_every=50: the last step's alone
    assert read_checkpoint(last)[0]["step"] == 2 and not (run / "checkpoints" / "final").exists()

    resumed = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    summary, expected = read_json(run / "summary.json"), read_json(straight / "summary.json")
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 2  # no step trained again
    for key in ("eval", "eval_initial", "steps", "train_tokens", "gen_tokens", "stages"):
        assert summary[key] == expected[key], key
    for name in ("metrics.jsonl", "eval_problems.jsonl", "completions.jsonl"):  # one final evaluation in each
        assert rows(run, name) == rows(straight, name), name
    weights, reference = final_weights(run), final_weights(straight)
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)
    assert list_checkpoints(run / "checkpoints") == []  # the last step's checkpoint goes once completed


def test_signals_are_held_while_a_checkpoint_is_written_and_stop_the_loop_after_its_step():
    """The modes of RunSignals with real signals to this process: held (raised once the block ends), after step
    (recorded; a second one raises), at once."""
    previous = signal.getsignal(signal.SIGTERM)
    with RunSignals() as signals:
        signals.phase = "the final checkpoint"
        with pytest.raises(KeyboardInterrupt, match="^SIGTERM during the final checkpoint$"):
            with signals.held():
                signal.raise_signal(signal.SIGTERM)
                written = True  # the block went on to its end
        assert written
    with RunSignals() as signals:
        with signals.after_step():
            signal.raise_signal(signal.SIGINT)
            assert signals.requested == "SIGINT"  # the loop stops after its step
            with pytest.raises(KeyboardInterrupt, match="^second SIGTERM$"):
                signal.raise_signal(signal.SIGTERM)
    with RunSignals() as signals:
        signals.at_once()
        signals.phase = "loading"
        with pytest.raises(KeyboardInterrupt, match="^SIGTERM during loading$"):
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is previous  # each block put the handler back
