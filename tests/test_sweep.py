"""`bridgectl sweep`: trials become ordinary tagged run directories, re-running resumes, crashing trials are marked
failed while the sweep goes on, bad specs exit 2, workers share one study."""

from __future__ import annotations

import json
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


def test_resume_after_a_kill_retries_the_dead_trial_and_reruns_no_completed_one(tmp_path):
    spec_path = write_spec(tmp_path, f"name: kill\nbase: {TINY}\nsampler: grid\n"
                                     "params:\n  bridge.lam: {type: float, values: [0.2, 0.5, 0.8]}\n")
    spec = sweep.load_spec(spec_path)
    sweep_dir = tmp_path / "out" / "kill"
    sweep_dir.mkdir(parents=True)
    study = sweep.make_study(spec, sweep_dir, None)
    completed = study.ask()  # one trial that finished before the kill ...
    study.tell(completed, sweep.objective(completed, spec, sweep_dir))
    dead = study.ask()  # ... and one whose process was killed while it ran (left RUNNING, no result)
    dead_lam = dead.suggest_categorical("bridge.lam", [0.2, 0.5, 0.8])
    before = {p.name for p in sweep_dir.iterdir() if p.is_dir()}

    resumed = sweep.run_sweep(spec_path, tmp_path / "out", workers=1, storage_url=None)
    done = [t for t in resumed.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["bridge.lam"] for t in done) == [0.2, 0.5, 0.8]  # every point once, the dead one retried
    assert dead_lam in [t.params["bridge.lam"] for t in done if t.number != completed.number]
    new_dirs = {p.name for p in sweep_dir.iterdir() if p.is_dir()} - before
    assert len(new_dirs) == 2  # the completed trial was not run again
    assert len(sweep.run_sweep(spec_path, tmp_path / "out", workers=1, storage_url=None).trials) == len(resumed.trials)
