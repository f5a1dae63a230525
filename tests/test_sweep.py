"""`bridgectl sweep`: trials become ordinary tagged run directories, re-running resumes, crashing trials are marked
failed while the sweep goes on, bad specs exit 2, workers share one study."""

from __future__ import annotations

import contextlib
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

from bridgectl.cli.app import app
from bridgectl.config.compose import compose
from bridgectl.errors import StopRun
from bridgectl.sweep import claims as sweep_claims
from bridgectl.sweep import spec as sweep_spec
from bridgectl.sweep import study as sweep
from bridgectl.training.runner import run

pytestmark = pytest.mark.slow  # processes, runs and studies: make test-fast leaves these out

TINY = (
    "[recipe=bridge, train.max_steps=2, rl.prompts_per_step=2, rl.num_generations=2, sft.batch_size=4, "
    "eval.n=10, train.threads=1]"
)


def write_spec(tmp_path: Path, body: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def summaries(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.rglob("summary.json"))]


def test_grid_sweep_runs_tagged_trials_and_resumes(tmp_path):
    spec = write_spec(
        tmp_path,
        f"name: lam\nbase: {TINY}\nseeds: [0, 1]\nsampler: grid\n"
        "params:\n  bridge.lam: {type: float, values: [0.3, 0.7]}\n",
    )
    result = CliRunner().invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    runs = summaries(tmp_path / "out" / "lam")
    assert len(runs) == 4 and all(r["status"] == "completed" and r["study"] == "lam" for r in runs)
    assert sorted((r["params"]["bridge.lam"], r["seed"]) for r in runs) == [(0.3, 0), (0.3, 1), (0.7, 0), (0.7, 1)]
    assert "best trial" in result.output and "bridge.lam" in result.output
    # the trial's value is the mean over its seeds
    study = sweep.make_study(sweep_spec.load_spec(spec), tmp_path / "out" / "lam", None)
    for trial in study.trials:
        accuracies = [r["eval"]["test"]["accuracy"] for r in runs if r["trial"] == trial.number]
        assert trial.value == pytest.approx(sum(accuracies) / 2)
    # re-running the same command resumes: nothing new runs
    again = CliRunner().invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "out")])
    assert again.exit_code == 0 and len(summaries(tmp_path / "out" / "lam")) == 4


def test_a_crashing_trial_is_failed_and_the_sweep_goes_on(tmp_path):
    # test_ops=[1,1] holds fewer than 30 distinct held-out problems: that trial raises at run time
    spec = write_spec(
        tmp_path,
        f"name: crash\nbase: {TINY}\nsampler: grid\n"
        "params:\n  task.test_ops: {type: categorical, choices: ['[3,4]', '[1,1]']}\n",
    )
    spec.write_text(spec.read_text().replace("eval.n=10", "eval.n=30"))
    study = sweep.run_sweep(spec, tmp_path / "out", workers=1, storage_url=None)
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "FAIL"]
    failed = [r for r in summaries(tmp_path / "out" / "crash") if r["status"] == "failed"]
    assert len(failed) == 1 and "held-out" in failed[0]["error"]


def test_two_worker_processes_draw_distinct_params_with_their_own_seeds(tmp_path, capsys):
    """--workers 2, random sampler, a 2-point space and n_trials 3: the two worker processes run the two points
    once each (never one twice), each trial's sampler seed is recorded and its own, and the sweep says it stopped
    because the space ran out."""
    spec = write_spec(
        tmp_path,
        f"name: par\nbase: {TINY}\nsampler: random\nn_trials: 3\n"
        "params:\n  bridge.lam: {type: categorical, choices: [0.3, 0.7]}\n",
    )
    study = sweep.run_sweep(spec, tmp_path / "out", workers=2, storage_url=None)
    ran = [t for t in study.trials if not sweep_claims.is_disposed(t)]
    assert sorted(t.params["bridge.lam"] for t in ran) == [0.3, 0.7] and all(
        t.state == TrialState.COMPLETE for t in ran
    )
    assert sorted(r["params"]["bridge.lam"] for r in summaries(tmp_path / "out" / "par")) == [0.3, 0.7]
    sampled = [t for t in ran if "replaces" not in t.user_attrs]  # a duplicate draw's replacement has no draw
    assert all(t.user_attrs["sampler_seed"] == sweep_claims.trial_seed("par", t.number) for t in sampled)
    assert len({t.user_attrs["sampler_seed"] for t in ran}) == len(ran)
    assert "the search space has 2 points and every one has a trial" in capsys.readouterr().out


def test_stop_run_from_an_eval_callback_ends_the_run_with_its_status(tmp_path):
    cfg = compose(
        [
            "recipe=rl",
            "train.max_steps=4",
            "train.eval_every=2",
            "rl.prompts_per_step=2",
            "rl.num_generations=2",
            "eval.n=10",
            "train.threads=1",
        ]
    )
    seen = []

    def prune(step, metrics):
        seen.append((step, "eval/test/accuracy" in metrics))
        raise StopRun("pruned")

    with pytest.raises(StopRun):
        run(cfg, tmp_path / "run", show_progress=False, on_eval=prune)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert seen == [(2, True)] and summary["status"] == "pruned" and summary["steps"] == 2


@pytest.mark.parametrize(
    "body,message",
    [
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
        # fields of the wrong YAML type: named, with an example, before any value is used
        ('seeds: "abc"\n', "field 'seeds' must be a list of integers, got a string ('abc')"),
        ("seeds: 3\n", "field 'seeds' must be a list of integers, got an integer"),
        ("seeds: [0, 1.5]\n", "field 'seeds' must be a list of integers"),
        ('n_trials: "x"\n', "field 'n_trials' must be an integer, got a string ('x')"),
        ("n_trials: true\n", "field 'n_trials' must be an integer, got a boolean"),
        ("params: [1, 2]\n", "field 'params' must be a mapping of config keys, got a list"),
        ("objective: 3\n", "field 'objective' must be a mapping, got an integer (3)"),
        ("objective: {metric: 3}\n", "field 'objective.metric' must be a string"),
        ("objective: {metrc: eval/test/accuracy}\n", "unknown key(s) in objective: metrc"),
        ('base: "recipe=bridge"\n', "field 'base' must be a list of overrides, got a string"),
        ("name: [a, b]\n", "field 'name' must be a string, got a list"),
        ("sampler: 3\n", "field 'sampler' must be a string"),
        ("params: {bridge.lam: 0.5}\n", "param 'bridge.lam' must be a mapping, got a number (0.5)"),
        ("params: {bridge.lam: {type: float, low: a, high: 0.9}}\n", "param 'bridge.lam': low must be a number"),
        ("params: {rl.num_generations: {type: int, low: 2.5, high: 4}}\n", "low must be an integer"),
        ("params: {bridge.lam: {type: float, low: 0.1, high: 0.9, log: yes please}}\n", "log must be true or false"),
        ("params: {lora.rank: {type: categorical, choices: 4}}\n", "choices must be a non-empty list"),
        ("params: {bridge.lam: {type: float, low: 0.1, high: 0.9, step: 0.1}}\n", "unknown key(s): step"),
    ],
)
def test_bad_specs_exit_2_and_run_nothing(tmp_path, body, message):
    spec = write_spec(tmp_path, body)
    result = CliRunner().invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Error:" in result.output and "Hint:" in result.output, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
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
    spec_path = write_spec(
        tmp_path,
        f"name: kill\nbase: {base}\nsampler: grid\nparams:\n  bridge.lam: {{type: float, values: [0.2, 0.5, 0.8]}}\n",
    )
    sweep_dir = tmp_path / "out" / "kill"
    command = [sys.executable, "-m", "bridgectl.cli.app", "sweep", str(spec_path), "--out", str(tmp_path / "out")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 300
    # trial 0 is done, trial 1 has written its first checkpoint
    while not list((sweep_dir / "trial-001-seed0" / "checkpoints").glob("step-*")):
        assert process.poll() is None and time.monotonic() < deadline, "the sweep ended before the kill"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    spec = sweep_spec.load_spec(spec_path)
    killed = sweep.make_study(spec, sweep_dir, None)
    # every grid point was queued at the start: one done, one killed while running, one never started
    assert [t.state for t in killed.trials] == [TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING]
    dead_lam = killed.trials[1].params["bridge.lam"]
    assert sweep_claims.is_dead(killed.trials[1])  # its recorded pid is gone

    resumed = CliRunner().invoke(app, ["sweep", str(spec_path), "--out", str(tmp_path / "out")])
    assert resumed.exit_code == 0, resumed.output  # retried to completion: the death is reported, not an error
    said = " ".join(resumed.output.split())
    assert f"trial 1 {{'bridge.lam': {dead_lam}}} was left running by pid {process.pid}" in said
    assert "marked failed; it runs again" in said
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
    steps = [
        json.loads(line)["step"]
        for line in (sweep_dir / f"trial-{retry.number:03d}-seed0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 6  # one history from step 0, no repeats
    assert len([s for s in steps if s == 1]) == 1


def test_resume_leaves_trials_of_live_workers_alone(tmp_path):
    """A RUNNING trial whose process is alive (here, or on another machine with a fresh heartbeat) is neither
    failed nor queued again, so a second worker can join a running sweep."""
    spec_path = write_spec(
        tmp_path,
        f"name: live\nbase: {TINY}\nsampler: grid\nparams:\n  bridge.lam: {{type: float, values: [0.2, 0.8]}}\n",
    )
    spec = sweep_spec.load_spec(spec_path)
    sweep_dir = tmp_path / "out" / "live"
    sweep_dir.mkdir(parents=True)
    study = sweep.make_study(spec, sweep_dir, None)
    sweep_claims.queue_missing(study, spec)
    alive = study.ask()  # taken by a worker that is still running
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        study._storage.set_trial_system_attr(
            alive._trial_id, "heartbeat", {"host": socket.gethostname(), "pid": helper.pid, "time": time.time()}
        )
        assert not sweep_claims.is_dead(study.trials[alive.number])
        assert sweep_claims.fail_dead(study) == []
        sweep_claims.queue_missing(study, spec)
        assert study.trials[alive.number].state == TrialState.RUNNING
        assert sweep_claims.remaining_trials(study, spec) == 1  # only the other grid point is left to start
    finally:
        helper.kill()
        helper.wait()
    assert sweep_claims.is_dead(study.trials[alive.number])  # its process is gone now


@pytest.mark.parametrize("host_is_here, beat_age, dead", [(False, 10, False), (False, 1000, True)])
def test_heartbeats_from_other_machines_go_stale(host_is_here, beat_age, dead):
    class Frozen:  # what is_dead reads of a FrozenTrial
        system_attrs = {"heartbeat": {"host": "node-17", "pid": 1, "time": 5000.0 - beat_age}}
        datetime_start = None

    assert sweep_claims.is_dead(Frozen(), now=5000.0, stale_after=120) is dead


def test_heartbeat_records_the_process_while_the_trial_runs(tmp_path):
    spec_path = write_spec(
        tmp_path, f"name: beat\nbase: {TINY}\nsampler: grid\nparams:\n  bridge.lam: {{type: float, values: [0.5]}}\n"
    )
    study = sweep.make_study(sweep_spec.load_spec(spec_path), tmp_path, None)
    trial = study.ask()
    with sweep_claims.heartbeat(study._storage, trial._trial_id, interval=0.05):
        first = study.trials[0].system_attrs["heartbeat"]
        time.sleep(0.3)
        later = study.trials[0].system_attrs["heartbeat"]
    assert first["pid"] == os.getpid() and first["host"] == socket.gethostname()
    assert later["time"] > first["time"]


def test_live_view_counts_running_trials_of_every_worker(tmp_path):
    spec_path = write_spec(
        tmp_path,
        f"name: view\nbase: {TINY}\nsampler: random\nn_trials: 2\n"
        "params:\n  bridge.lam: {type: float, low: 0.2, high: 0.8}\n",
    )
    seen = []
    study = sweep.run_sweep(
        spec_path, tmp_path / "out", workers=2, storage_url=None, on_progress=seen.append, poll_seconds=0.1
    )
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 2
    assert len({t.params["bridge.lam"] for t in study.trials}) == 2  # each worker's trial drew with its own seed
    assert max(p.running for p in seen) >= 1  # trials running in the worker processes were seen live
    assert seen[-1].done == 2 and seen[-1].running == 0 and seen[-1].best == study.best_value


def test_submitit_local_launcher_completes_a_trial(tmp_path):
    spec_path = write_spec(
        tmp_path, f"name: jobs\nbase: {TINY}\nsampler: grid\nparams:\n  bridge.lam: {{type: float, values: [0.4]}}\n"
    )
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            str(spec_path),
            "--out",
            str(tmp_path / "out"),
            "--launcher",
            "submitit-local",
            "--launcher-opt",
            "timeout_min=10",
        ],
    )
    assert result.exit_code == 0, result.output
    runs = summaries(tmp_path / "out" / "jobs")
    assert [(r["status"], r["params"]) for r in runs] == [("completed", {"bridge.lam": 0.4})]
    assert any((tmp_path / "out" / "jobs" / "submitit").glob("*_result.pkl"))  # it ran as a submitit job


@pytest.mark.parametrize(
    "args, message",
    [
        (["--launcher", "pbs"], "unknown launcher 'pbs'"),
        (["--launcher", "submitit-local", "--launcher-opt", "colour=blue"], "submitit rejected"),
        (["--launcher", "submitit-local", "--launcher-opt", "timeout_min"], "expects KEY=VALUE"),
        (["--launcher-opt", "timeout_min=5"], "applies to --launcher slurm"),
        (["--launcher", "slurm"], "srun"),  # this machine has no Slurm
    ],
)
def test_bad_launcher_settings_exit_2_and_write_nothing(tmp_path, args, message):
    spec = write_spec(
        tmp_path, f"name: l\nbase: {TINY}\nsampler: grid\nparams:\n  bridge.lam: {{type: float, values: [0.5]}}\n"
    )
    result = CliRunner().invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and "Error:" in result.output and message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "status, checkpoint, taken",
    [
        ("completed", False, True),
        ("running", True, True),
        ("interrupted", True, True),
        ("running", False, False),
        ("failed", True, False),
    ],
)
def test_a_retry_takes_over_finished_or_checkpointed_runs_only(tmp_path, status, checkpoint, taken):
    """What a retried trial continues (sweep._continuable_run): the newest attempt of the dead trial's run of that
    seed, when it completed or stopped with a checkpoint; a run that failed on its own starts again."""
    for name, run_status in (
        ("trial-004-seed1", "running"),
        ("trial-004-seed1-attempt2", status),
        ("trial-004-seed11", "completed"),
    ):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "summary.json").write_text(json.dumps({"status": run_status}))
    if checkpoint:
        (tmp_path / "trial-004-seed1-attempt2" / "checkpoints" / "step-000002").mkdir()
    expected = tmp_path / "trial-004-seed1-attempt2" if taken else None
    assert sweep._continuable_run(tmp_path, 4, 1) == expected
    assert sweep._continuable_run(tmp_path, None, 1) is None and sweep._continuable_run(tmp_path, 5, 1) is None


def start_sweep(spec: Path, out: Path, *options: str) -> subprocess.Popen:
    """A real `bridgectl sweep` process in its own process group (so end_group can take its workers too), its
    output captured."""
    command = [sys.executable, "-m", "bridgectl.cli.app", "sweep", str(spec), "--out", str(out), *options]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def described(processes: list[subprocess.Popen], outputs: list[str]) -> str:
    """Each ended process's exit status and output, as one string (an assertion shows it whole, not cut)."""
    return "\n".join(
        f"--- process {index} (exit {process.returncode}):\n{output}"
        for index, (process, output) in enumerate(zip(processes, outputs))
    )


def end_group(process: subprocess.Popen) -> None:
    """SIGKILLs what is left of a sweep started by start_sweep (nothing, when it ended on its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_two_sweep_processes_on_one_grid_run_every_point_exactly_once(tmp_path):
    """Two `bridgectl sweep` processes started together on one 2-point grid (one journal): every point runs
    once, in one of them; a queue copy either enqueued in the race is disposed, never run."""
    spec_path = write_spec(
        tmp_path,
        f"name: race\nbase: {TINY}\nsampler: grid\nparams:\n  bridge.lam: {{type: float, values: [0.2, 0.8]}}\n",
    )
    processes = [start_sweep(spec_path, tmp_path / "out") for _ in range(2)]
    try:
        outputs = [process.communicate(timeout=240)[0] for process in processes]
    finally:
        for process in processes:
            end_group(process)
    said = described(processes, outputs)
    assert [process.returncode for process in processes] == [0, 0], said  # a string: shown whole, not cut
    sweep_dir = tmp_path / "out" / "race"
    study = sweep.make_study(sweep_spec.load_spec(spec_path), sweep_dir, None)
    ran = [t for t in study.trials if not sweep_claims.is_disposed(t)]
    assert sorted(t.params["bridge.lam"] for t in ran) == [0.2, 0.8]
    assert all(t.state == TrialState.COMPLETE for t in ran)
    assert sorted(p.name for p in sweep_dir.glob("trial-*")) == [f"trial-{t.number:03d}-seed0" for t in ran]
    assert all(t.state == TrialState.FAIL and not t.params for t in study.trials if sweep_claims.is_disposed(t))


def test_a_killed_worker_process_is_reported_and_its_trial_retried(tmp_path):
    """SIGKILL one of the two worker processes of `bridgectl sweep --workers 2` mid-trial (after a checkpoint):
    the sweep names the worker and its trial, runs the trial again (continuing its checkpoint) and exits 0,
    every grid point completed once. (The sweep command runs in a thread of this process, which saves starting
    one more interpreter; its workers are real processes.)"""
    import threading

    base = TINY.replace("train.max_steps=2", "train.max_steps=6, train.checkpoint_every=2")
    spec_path = write_spec(
        tmp_path, f"name: wk\nbase: {base}\nsampler: grid\nparams:\n  bridge.lam: {{type: float, values: [0.3, 0.7]}}\n"
    )
    sweep_dir, spec = tmp_path / "out" / "wk", sweep_spec.load_spec(spec_path)
    ended = {}
    command = ["sweep", str(spec_path), "--out", str(tmp_path / "out"), "--workers", "2"]
    runner = threading.Thread(target=lambda: ended.update(result=CliRunner().invoke(app, command)), daemon=True)
    runner.start()
    deadline = time.monotonic() + 240
    while not (checkpointed := list(sweep_dir.glob("trial-*-seed0/checkpoints/step-*"))):
        assert runner.is_alive() and time.monotonic() < deadline, ended.get("result") and ended["result"].output
        time.sleep(0.05)
    number = int(checkpointed[0].parent.parent.name.split("-")[1])
    victim = sweep.make_study(spec, sweep_dir, None).trials[number]
    pid = victim.system_attrs["heartbeat"]["pid"]
    assert pid != os.getpid()  # a worker process, not the sweep itself
    os.kill(pid, signal.SIGKILL)
    runner.join(timeout=240)
    assert not runner.is_alive(), "the sweep did not end"
    result = ended["result"]
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"(pid {pid}) was killed by SIGKILL while running trial {number} {victim.params}" in said
    study = sweep.make_study(spec, sweep_dir, None)
    assert study.trials[number].state == TrialState.FAIL
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["bridge.lam"] for t in done) == [0.3, 0.7]
    retry = next(t for t in done if t.params == victim.params)
    assert retry.user_attrs["retry_of"] == number
    resumed = json.loads((sweep_dir / f"trial-{retry.number:03d}-seed0" / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumed_from_step"] >= 2


def test_a_dead_trial_whose_retry_fails_makes_the_sweep_exit_1(tmp_path):
    """A trial left running by a process that is gone is reported and retried; when the retry does not complete
    (here it fails: fewer than 30 held-out problems) the sweep exits 1 naming the trial."""
    spec_path = write_spec(
        tmp_path,
        f"name: lost\nbase: {TINY}\nsampler: grid\n"
        "params:\n  task.test_ops: {type: categorical, choices: ['[1,1]']}\n",
    )
    spec_path.write_text(spec_path.read_text().replace("eval.n=10", "eval.n=30"))
    spec, sweep_dir = sweep_spec.load_spec(spec_path), tmp_path / "out" / "lost"
    sweep_dir.mkdir(parents=True)
    study = sweep.make_study(spec, sweep_dir, None)
    sweep_claims.queue_missing(study, spec)
    held = sweep_claims.claim_queued(study, "elsewhere")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer exists
    study._storage.set_trial_system_attr(
        held._trial_id, "heartbeat", {"host": socket.gethostname(), "pid": gone.pid, "time": time.time()}
    )
    result = CliRunner().invoke(app, ["sweep", str(spec_path), "--out", str(tmp_path / "out")])
    said = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert f"trial 0 {{'task.test_ops': '[1,1]'}} was left running by pid {gone.pid}" in said
    assert "Error: dead workers' trials were not retried to completion: trial 0" in said
    states = [t.state for t in sweep.make_study(spec, sweep_dir, None).trials]
    assert states == [TrialState.FAIL, TrialState.FAIL]  # the dead trial and its one retry


def bare_spec(sampler: str, params: dict, n_trials: int = 2) -> sweep_spec.SweepSpec:
    """A spec for claim tests that run nothing (no config is composed)."""
    return sweep_spec.SweepSpec(
        name="claims",
        base=[],
        seeds=[0],
        metric="eval/test/accuracy",
        direction="maximize",
        sampler=sampler,
        n_trials=n_trials,
        pruner="none",
        params=params,
    )


STORAGES = [None, "sqlite"]
"""The claim tests run on the default journal file and on an RDB storage (SQLite standing in for PostgreSQL)."""


def storage_url(kind: str | None, tmp_path: Path) -> str | None:
    """None (the journal file in the sweep directory) or an SQLite URL in tmp_path."""
    return None if kind is None else f"sqlite:///{tmp_path / 'study.db'}"


@pytest.mark.parametrize("storage", STORAGES)
def test_a_queue_copy_enqueued_in_a_race_is_never_run(tmp_path, storage):
    """Two processes that both saw a point unqueued enqueue it twice: only the lower-numbered copy can be taken,
    by one of two workers, even after it started; queue_missing disposes the copy."""
    spec = bare_spec("grid", {"bridge.lam": {"type": "float", "values": [0.5]}})
    first, second = (sweep.make_study(spec, tmp_path, storage_url(storage, tmp_path)) for _ in range(2))
    for study in (first, second):
        study.enqueue_trial({"bridge.lam": 0.5}, user_attrs={"claim": sweep_claims.claim_key({"bridge.lam": 0.5}, 0)})
    taken = sweep_claims.claim_queued(first, "a")
    assert taken.number == 0 and sweep_claims.claim_queued(second, "b") is None  # not the copy, trial 1
    assert sweep_claims.remaining_trials(second, spec) == 0
    assert sweep_claims.queue_missing(second, spec) == 0
    copy = second.trials[1]
    assert copy.state == TrialState.FAIL and "second copy" in copy.system_attrs[sweep_claims.DISPOSED]
    assert sweep.read_progress(second).failed == 0 and sweep.failed_trials(second) == []


@pytest.mark.parametrize("storage", STORAGES)
def test_two_processes_disposing_one_queue_copy_both_go_on(tmp_path, storage):
    """Both processes of a claim race see the same surplus copy waiting and dispose it: the second finds it
    already disposed and goes on (it once raised UpdateFinishedTrialError from the storage, failing its sweep
    with exit 1 in CI)."""
    spec = bare_spec("grid", {"bridge.lam": {"type": "float", "values": [0.5]}})
    first, second = (sweep.make_study(spec, tmp_path, storage_url(storage, tmp_path)) for _ in range(2))
    for study in (first, second):
        study.enqueue_trial({"bridge.lam": 0.5}, user_attrs={"claim": sweep_claims.claim_key({"bridge.lam": 0.5}, 0)})
    copy_id = second.trials[1]._trial_id
    sweep_claims.dispose(first, copy_id, "a second copy (first process)")
    sweep_claims.dispose(second, copy_id, "a second copy (second process)")
    copy = second.trials[1]
    assert copy.state == TrialState.FAIL and copy.system_attrs[sweep_claims.DISPOSED] == "a second copy (first process)"
    assert sweep_claims.claim_queued(second, "b").number == 0


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # PartialFixedSampler
@pytest.mark.parametrize("storage", STORAGES)
def test_concurrent_sampled_claims_keep_n_trials_and_distinct_points(tmp_path, monkeypatch, storage):
    """Workers that pass the n_trials check together (held at a barrier just before creating their trial) and
    draw the same point: the one past n_trials is disposed as surplus, a repeated draw is replaced by the
    untried point, and when no point is left a claim returns None."""
    import threading

    import optuna

    spec = bare_spec("random", {"lora.rank": {"type": "categorical", "choices": [4, 8]}}, n_trials=2)
    barrier, create = threading.Barrier(3), sweep_claims._new_trial

    def together(study, user_attrs, system_attrs):
        """Creates a sampled trial only once all three workers are about to."""
        if "replaces" not in user_attrs:
            barrier.wait(timeout=30)
        return create(study, user_attrs, system_attrs)

    monkeypatch.setattr(sweep_claims, "_new_trial", together)
    monkeypatch.setattr(
        sweep_claims,
        "make_sampler",  # every worker's sampler draws rank 4
        lambda kind, seed: optuna.samplers.PartialFixedSampler({"lora.rank": 4}, optuna.samplers.RandomSampler(seed)),
    )
    url = storage_url(storage, tmp_path)
    sweep.make_study(spec, tmp_path, url)  # created once, before the workers open it
    claimed = {}
    threads = [
        threading.Thread(
            target=lambda i=i: claimed.update(
                {i: sweep_claims.claim_sampled(sweep.make_study(spec, tmp_path, url), spec, f"w{i}")}
            )
        )
        for i in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    study = sweep.make_study(spec, tmp_path, url)
    won = [trial for trial in claimed.values() if trial is not None]
    assert sorted(trial.params["lora.rank"] for trial in won) == [4, 8]  # two claims, distinct points
    reasons = sorted(
        t.system_attrs[sweep_claims.DISPOSED].split(":")[0].split(" ")[0]
        for t in study.trials
        if sweep_claims.is_disposed(t)
    )
    assert reasons == ["duplicate", "surplus"]
    replacement = next(t for t in study.trials if "replaces" in t.user_attrs)
    assert replacement.params == {"lora.rank": 8} and not sweep_claims.is_disposed(replacement)
    assert sweep_claims.claim_sampled(study, spec, "late") is None and sweep_claims.remaining_trials(study, spec) == 0
    seeds = [t.user_attrs["sampler_seed"] for t in study.trials if "sampler_seed" in t.user_attrs]
    assert len(set(seeds)) == len(seeds)  # every trial of every worker its own seed
