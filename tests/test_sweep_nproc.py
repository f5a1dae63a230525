"""Multi-process trials: a sweep whose spec says `nproc: 2` (or `bridgectl sweep --nproc 2`) runs each seed of a
trial under torchrun, as `bridgectl run --nproc 2` would; the trial's metrics equal that run launched alone, rank
0's periodic evaluations reach the study as the trial's reports, and the run carries the study's tags. A batch
that does not split over nproc exits 2 before anything is written."""

from __future__ import annotations

import json

import pytest
from optuna.trial import TrialState
from test_distributed import rows, weights
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.sweep import spec as sweep_spec
from bridgectl.sweep import study as sweep

pytestmark = pytest.mark.slow  # processes, runs and studies: make test-fast leaves these out

SETTINGS = [
    "recipe=rl",
    "train.threads=1",
    "train.max_steps=2",
    "train.eval_every=1",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "eval.n=8",
    "train.checkpoint_every=0",
    "seed=0",
]


def test_a_trial_of_nproc_2_equals_the_same_run_launched_alone(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        f"name: np\nbase: [{', '.join(SETTINGS[:-1])}]\nsampler: grid\nnproc: 2\n"
        "params:\n  rl.lr: {type: float, values: [2.0e-4]}\n"
    )
    swept = CliRunner().invoke(app, ["sweep", str(spec_path), "--out", str(tmp_path / "out")])
    assert swept.exit_code == 0, swept.output
    assert "in 2 processes each" in swept.output
    alone = CliRunner().invoke(
        app, ["run", *SETTINGS, "rl.lr=2.0e-4", "--nproc", "2", "--out", str(tmp_path), "--name", "alone"]
    )
    assert alone.exit_code == 0, alone.output

    trial_dir = tmp_path / "out" / "np" / "trial-000-seed0"
    summary = json.loads((trial_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert (tmp_path / "out" / "np" / "trial-000-seed0.log").exists()  # torchrun's output, beside the run
    assert (summary["study"], summary["trial"], summary["params"]) == ("np", 0, {"rl.lr": 2.0e-4})
    one, two = rows(tmp_path / "alone"), rows(trial_dir)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in a.keys() - {"wall_s", "wall_time"}:
            if key.startswith(("train/", "eval/", "rollout/")):
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    w1, w2 = weights(tmp_path / "alone"), weights(trial_dir)
    assert w1.keys() == w2.keys() and all((w1[k] == w2[k]).all() for k in w1)

    study = sweep.make_study(sweep_spec.load_spec(spec_path), tmp_path / "out" / "np", None)
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE and trial.value == summary["eval"]["test"]["accuracy"]
    reported = {r["step"]: r["eval/test/accuracy"] for r in two if "eval/test/accuracy" in r}
    assert trial.intermediate_values == reported and len(reported) >= 2  # rank 0's evaluations, as they came

    # the same trial over two "nodes": a job of two torchrun tasks (submitit's local executor plays SLURM)
    spec_path.write_text(spec_path.read_text().replace("name: np", "name: nn").replace("nproc: 2", "nnodes: 2"))
    jobs = CliRunner().invoke(
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
    assert jobs.exit_code == 0, jobs.output
    assert "as submitit-local jobs of 2 nodes x 1 processes" in " ".join(jobs.output.split())
    job_dir = tmp_path / "out" / "nn" / "trial-000-seed0"
    assert list((tmp_path / "out" / "nn" / ".submitit" / job_dir.name).glob("*_1_log.out"))  # two tasks
    summary = json.loads((job_dir / "summary.json").read_text())
    assert (summary["status"], summary["study"], summary["trial"]) == ("completed", "nn", 0)
    for a, b in zip(one, rows(job_dir)):  # two nodes of one process add up as one node of two, to rounding
        for key in ("train/rl_loss", "train/reward_mean", "train/grad_norm", "eval/test/accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    (trial,) = sweep.make_study(sweep_spec.load_spec(spec_path), tmp_path / "out" / "nn", None).trials
    assert trial.value == summary["eval"]["test"]["accuracy"] and len(trial.intermediate_values) >= 2


def test_a_batch_that_does_not_split_over_nproc_exits_2_and_writes_nothing(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        f"name: np\nbase: [{', '.join(SETTINGS[:-1])}]\nsampler: grid\n"
        "params:\n  rl.lr: {type: float, values: [2.0e-4]}\n"
    )
    result = CliRunner().invoke(app, ["sweep", str(spec_path), "--out", str(tmp_path / "out"), "--nproc", "3"])
    assert result.exit_code == 2, result.output
    assert "rl.prompts_per_step=2 does not split evenly over 3 processes" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["sweep", str(spec_path), "--out", str(tmp_path / "out"), "--nnodes", "2"])
    assert result.exit_code == 2 and "add --launcher slurm" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
    spec_path.write_text(spec_path.read_text() + "nproc: 0\n")
    result = CliRunner().invoke(app, ["sweep", str(spec_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "nproc must be at least 1" in result.output


def test_a_pruned_torchrun_trial_is_stopped_and_its_run_ends_interrupted(tmp_path):
    """The study prunes on rank 0's first evaluation: the torchrun run gets SIGTERM, its processes checkpoint
    and stop, its summary says interrupted, and StopRun reaches the trial (which Optuna then records PRUNED)."""
    from bridgectl.errors import StopRun

    seen = []

    def prune(step, metrics):
        seen.append(step)
        raise StopRun("pruned")

    run_path = tmp_path / "trial-000-seed0"
    settings = [s.replace("train.max_steps=2", "train.max_steps=40") for s in SETTINGS]
    with pytest.raises(StopRun):
        sweep._run_under_torchrun(
            2, settings, run_path, {"study": "p", "trial": 0}, prune, resume=False, poll_seconds=0.1
        )
    summary = json.loads((run_path / "summary.json").read_text())
    assert seen == [0] and summary["status"] == "interrupted" and summary["study"] == "p"
    assert max(r["step"] for r in rows(run_path)) < 40
