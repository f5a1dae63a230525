"""`bridgectl sweep`: trials become ordinary tagged run directories, re-running resumes, crashing trials are marked
failed while the sweep goes on, bad specs exit 2, workers share one study."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from bridgectl import sweep
from bridgectl.cli import app
from bridgectl.config import compose
from bridgectl.errors import StopRun
from bridgectl.runner import run

TINY = ("[recipe=bridge, train.max_steps=2, rl.prompts_per_step=2, rl.num_generations=2, sft.batch_size=4, "
        "eval.n=10, train.threads=1]")


def write_spec(tmp_path: Path, body: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def summaries(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.rglob("summary.json"))]


def test_grid_sweep_runs_tagged_trials_and_resumes(tmp_path):
    spec = write_spec(tmp_path, f"name: lam\nbase: {TINY}\nseeds: [0, 1]\nsampler: grid\n"
                                "params:\n  bridge.lam: {type: float, values: [0.3, 0.7]}\n")
    result = CliRunner().invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    runs = summaries(tmp_path / "out" / "lam")
    assert len(runs) == 4 and all(r["status"] == "completed" and r["study"] == "lam" for r in runs)
    assert sorted((r["params"]["bridge.lam"], r["seed"]) for r in runs) == [(0.3, 0), (0.3, 1), (0.7, 0), (0.7, 1)]
    assert "best trial" in result.output and "bridge.lam" in result.output
    # the trial's value is the mean over its seeds
    study = sweep.make_study(sweep.load_spec(spec), tmp_path / "out" / "lam", None)
    for trial in study.trials:
        accuracies = [r["eval"]["test"]["accuracy"] for r in runs if r["trial"] == trial.number]
        assert trial.value == pytest.approx(sum(accuracies) / 2)
    # re-running the same command resumes: nothing new runs
    again = CliRunner().invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "out")])
    assert again.exit_code == 0 and len(summaries(tmp_path / "out" / "lam")) == 4


def test_a_crashing_trial_is_failed_and_the_sweep_goes_on(tmp_path):
    # test_ops=[1,1] holds fewer than 30 distinct held-out problems: that trial raises at run time
    spec = write_spec(tmp_path, f"name: crash\nbase: {TINY}\nsampler: grid\n"
                                "params:\n  task.test_ops: {type: categorical, choices: ['[3,4]', '[1,1]']}\n")
    spec.write_text(spec.read_text().replace("eval.n=10", "eval.n=30"))
    study = sweep.run_sweep(spec, tmp_path / "out", workers=1, storage_url=None)
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "FAIL"]
    failed = [r for r in summaries(tmp_path / "out" / "crash") if r["status"] == "failed"]
    assert len(failed) == 1 and "held-out" in failed[0]["error"]


def test_two_workers_share_one_study(tmp_path):
    spec = write_spec(tmp_path, f"name: par\nbase: {TINY}\nsampler: random\nn_trials: 2\n"
                                "params:\n  bridge.lam: {type: float, low: 0.2, high: 0.8}\n")
    study = sweep.run_sweep(spec, tmp_path / "out", workers=2, storage_url=None)
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 2
    assert len(summaries(tmp_path / "out" / "par")) == 2


def test_stop_run_from_an_eval_callback_ends_the_run_with_its_status(tmp_path):
    cfg = compose(["recipe=rl", "train.max_steps=4", "train.eval_every=2", "rl.prompts_per_step=2",
                   "rl.num_generations=2", "eval.n=10", "train.threads=1"])
    seen = []

    def prune(step, metrics):
        seen.append((step, "eval/test/accuracy" in metrics))
        raise StopRun("pruned")

    with pytest.raises(StopRun):
        run(cfg, tmp_path / "run", show_progress=False, on_eval=prune)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert seen == [(2, True)] and summary["status"] == "pruned" and summary["steps"] == 2


@pytest.mark.parametrize("body,message", [
    ("sampler: annealing\nparams: {seed: {type: int, low: 0, high: 1}}\n", "unknown sampler"),
    ("pruner: wise\nparams: {seed: {type: int, low: 0, high: 1}}\n", "unknown pruner"),
    ("params: {bridge.lamda: {type: float, low: 0.1, high: 0.9}}\n", "unknown key 'bridge.lamda'"),
    ("params: {bridge.lam: {low: 0.1, high: 0.9}}\n", "needs a type"),
    ("sampler: grid\nparams: {bridge.lam: {type: float, low: 0.1, high: 0.9}}\n", "needs a list of values"),
    ("n_trials: 0\n", "n_trials must be positive"),
    ("objective: {metric: train/reward_mean}\n", "unsupported objective metric"),
    ("colour: blue\n", "unknown key(s) in sweep spec"),
    ("params: [1, 2\n", "not valid YAML"),
    ("sampler: tpe\n", "has no params to search"),
    ("params: {bridge.lam: {type: float, low: 0.9, high: 0.1}}\n", "is not below high"),
    ("params: {bridge.beta: {type: float, low: 0, high: 0.1, log: true}}\n", "log scale needs low > 0"),
    ("objective: {metric: eval/valid/accuracy}\nparams: {seed: {type: int, low: 0, high: 1}}\n", "never logged"),
])
def test_bad_specs_exit_2_and_run_nothing(tmp_path, body, message):
    spec = write_spec(tmp_path, body)
    result = CliRunner().invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Error:" in result.output and message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_missing_spec_and_dry_run(tmp_path):
    result = CliRunner().invoke(app, ["sweep", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "does not exist" in " ".join(result.output.split())
    root = Path(__file__).resolve().parent.parent
    for shipped in sorted((root / "sweeps").glob("*.yaml")):  # every shipped spec is valid
        dry = CliRunner().invoke(app, ["sweep", str(shipped), "--dry-run", "--out", str(tmp_path / "out")])
        assert dry.exit_code == 0, (shipped.name, dry.output)
    assert not (tmp_path / "out").exists()


def test_a_sweep_killed_midway_resumes_without_rerunning_completed_trials(tmp_path):
    """SIGKILL the real `bridgectl sweep` process while its second trial runs (after that run's first checkpoint),
    then re-run the same command: the retry of the killed trial continues its run from the checkpoint."""
    base = TINY.replace("train.max_steps=2", "train.max_steps=6, train.checkpoint_every=2")
    spec_path = write_spec(tmp_path, f"name: kill\nbase: {base}\nsampler: grid\n"
                                     "params:\n  bridge.lam: {type: float, values: [0.2, 0.5, 0.8]}\n")
    sweep_dir = tmp_path / "out" / "kill"
    command = [sys.executable, "-m", "bridgectl.cli", "sweep", str(spec_path), "--out", str(tmp_path / "out")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 300
    # trial 0 is done, trial 1 has written its first checkpoint
    while not list((sweep_dir / "trial-001-seed0" / "checkpoints").glob("step-*")):
        assert process.poll() is None and time.monotonic() < deadline, "the sweep ended before the kill"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    spec = sweep.load_spec(spec_path)
    killed = sweep.make_study(spec, sweep_dir, None)
    # every grid point was queued at the start: one done, one killed while running, one never started
    assert [t.state for t in killed.trials] == [TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING]
    dead_lam = killed.trials[1].params["bridge.lam"]
    assert sweep.is_dead(killed.trials[1])  # its recorded pid is gone

    resumed = CliRunner().invoke(app, ["sweep", str(spec_path), "--out", str(tmp_path / "out")])
    assert resumed.exit_code == 0, resumed.output
    study = sweep.make_study(spec, sweep_dir, None)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["bridge.lam"] for t in done) == [0.2, 0.5, 0.8]  # every point once
    assert dead_lam in [t.params["bridge.lam"] for t in done if t.number >= 2]  # the killed one ran again
    runs = summaries(sweep_dir)
    assert sorted(r["trial"] for r in runs if r["status"] == "completed") == [0, 2, 3]  # trial 0 never re-ran
    assert len(list(sweep_dir.glob("trial-000-*"))) == 1
    retry = next(t for t in done if t.params["bridge.lam"] == dead_lam)
    assert retry.user_attrs["retry_of"] == 1
    assert not (sweep_dir / "trial-001-seed0").exists()  # taken over by the retry, not started again
    retried = json.loads((sweep_dir / f"trial-{retry.number:03d}-seed0" / "summary.json").read_text())
    assert retried["resumed_from_step"] >= 2 and retried["trial"] == retry.number
    steps = [json.loads(line)["step"] for line in
             (sweep_dir / f"trial-{retry.number:03d}-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 6  # one history from step 0, no repeats
    assert len([s for s in steps if s == 1]) == 1


def test_resume_leaves_trials_of_live_workers_alone(tmp_path):
    """A RUNNING trial whose process is alive (here, or on another machine with a fresh heartbeat) is neither
    failed nor queued again, so a second worker can join a running sweep."""
    spec_path = write_spec(tmp_path, f"name: live\nbase: {TINY}\nsampler: grid\n"
                                     "params:\n  bridge.lam: {type: float, values: [0.2, 0.8]}\n")
    spec = sweep.load_spec(spec_path)
    sweep_dir = tmp_path / "out" / "live"
    sweep_dir.mkdir(parents=True)
    study = sweep.make_study(spec, sweep_dir, None)
    sweep.queue_missing(study, spec)
    alive = study.ask()  # taken by a worker that is still running
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        study._storage.set_trial_system_attr(alive._trial_id, "heartbeat",
                                             {"host": socket.gethostname(), "pid": helper.pid, "time": time.time()})
        assert not sweep.is_dead(study.trials[alive.number])
        sweep.queue_missing(study, spec)
        assert study.trials[alive.number].state == TrialState.RUNNING
        assert sweep.remaining_trials(study, spec) == 1  # only the other grid point is left to start
    finally:
        helper.kill()
        helper.wait()
    assert sweep.is_dead(study.trials[alive.number])  # its process is gone now


@pytest.mark.parametrize("host_is_here, beat_age, dead", [(False, 10, False), (False, 1000, True)])
def test_heartbeats_from_other_machines_go_stale(host_is_here, beat_age, dead):
    class Frozen:  # what is_dead reads of a FrozenTrial
        system_attrs = {"heartbeat": {"host": "node-17", "pid": 1, "time": 5000.0 - beat_age}}
        datetime_start = None

    assert sweep.is_dead(Frozen(), now=5000.0, stale_after=120) is dead


def test_heartbeat_records_the_process_while_the_trial_runs(tmp_path):
    spec_path = write_spec(tmp_path, f"name: beat\nbase: {TINY}\nsampler: grid\n"
                                     "params:\n  bridge.lam: {type: float, values: [0.5]}\n")
    study = sweep.make_study(sweep.load_spec(spec_path), tmp_path, None)
    trial = study.ask()
    with sweep.heartbeat(study._storage, trial._trial_id, interval=0.05):
        first = study.trials[0].system_attrs["heartbeat"]
        time.sleep(0.3)
        later = study.trials[0].system_attrs["heartbeat"]
    assert first["pid"] == os.getpid() and first["host"] == socket.gethostname()
    assert later["time"] > first["time"]


def test_live_view_counts_running_trials_of_every_worker(tmp_path):
    spec_path = write_spec(tmp_path, f"name: view\nbase: {TINY}\nsampler: random\nn_trials: 2\n"
                                     "params:\n  bridge.lam: {type: float, low: 0.2, high: 0.8}\n")
    seen = []
    study = sweep.run_sweep(spec_path, tmp_path / "out", workers=2, storage_url=None, on_progress=seen.append,
                            poll_seconds=0.1)
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 2
    assert max(p.running for p in seen) >= 1  # trials running in the worker processes were seen live
    assert seen[-1].done == 2 and seen[-1].running == 0 and seen[-1].best == study.best_value


def test_submitit_local_launcher_completes_a_trial(tmp_path):
    spec_path = write_spec(tmp_path, f"name: jobs\nbase: {TINY}\nsampler: grid\n"
                                     "params:\n  bridge.lam: {type: float, values: [0.4]}\n")
    result = CliRunner().invoke(app, ["sweep", str(spec_path), "--out", str(tmp_path / "out"), "--launcher",
                                      "submitit-local", "--launcher-opt", "timeout_min=10"])
    assert result.exit_code == 0, result.output
    runs = summaries(tmp_path / "out" / "jobs")
    assert [(r["status"], r["params"]) for r in runs] == [("completed", {"bridge.lam": 0.4})]
    assert any((tmp_path / "out" / "jobs" / "submitit").glob("*_result.pkl"))  # it ran as a submitit job


@pytest.mark.parametrize("args, message", [
    (["--launcher", "pbs"], "unknown launcher 'pbs'"),
    (["--launcher", "submitit-local", "--launcher-opt", "colour=blue"], "submitit rejected"),
    (["--launcher", "submitit-local", "--launcher-opt", "timeout_min"], "expects KEY=VALUE"),
    (["--launcher-opt", "timeout_min=5"], "applies to --launcher slurm"),
    (["--launcher", "slurm"], "srun"),  # this machine has no Slurm
])
def test_bad_launcher_settings_exit_2_and_write_nothing(tmp_path, args, message):
    spec = write_spec(tmp_path, f"name: l\nbase: {TINY}\nsampler: grid\nparams:\n  bridge.lam: {{type: float, values: [0.5]}}\n")
    result = CliRunner().invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and "Error:" in result.output and message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("status, checkpoint, taken", [
    ("completed", False, True), ("running", True, True), ("interrupted", True, True),
    ("running", False, False), ("failed", True, False),
])
def test_a_retry_takes_over_finished_or_checkpointed_runs_only(tmp_path, status, checkpoint, taken):
    """What a retried trial continues (sweep._continuable_run): the newest attempt of the dead trial's run of that
    seed, when it completed or stopped with a checkpoint; a run that failed on its own starts again."""
    for name, run_status in (("trial-004-seed1", "running"), ("trial-004-seed1-attempt2", status),
                             ("trial-004-seed11", "completed")):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "summary.json").write_text(json.dumps({"status": run_status}))
    if checkpoint:
        (tmp_path / "trial-004-seed1-attempt2" / "checkpoints" / "step-000002").mkdir()
    expected = tmp_path / "trial-004-seed1-attempt2" if taken else None
    assert sweep._continuable_run(tmp_path, 4, 1) == expected
    assert sweep._continuable_run(tmp_path, None, 1) is None and sweep._continuable_run(tmp_path, 5, 1) is None
