"""`bridgectl sweep SPEC.yaml`: an Optuna study over `bridgectl run` configs (Optuna driven directly:
hydra-optuna-sweeper does not work with Optuna 5). Each trial composes its config with Hydra's compose API, exactly
as `bridgectl run` would, runs every seed of the spec as an ordinary run directory under the sweep directory
(tagged with the study and trial number, so `compare` reads them), and scores the trial by the mean over seeds.

Storage: an Optuna journal file in the sweep directory by default (`--storage URL` for any Optuna RDB URL, e.g.
PostgreSQL shared by workers on many machines). Re-running the same command resumes: completed trials are kept
and only the missing ones run; trials whose process died (heartbeats) run again. `--workers N` runs N worker
processes on the same storage, or N cluster jobs through submitit (`--launcher slurm`); any number of
`bridgectl sweep` processes, on any machines, may join one study.

Which worker runs which trial is decided through the storage alone (no two workers of any process run the same
thing; the protocol is described in bridgectl/sweep/claims.py); the spec is read and checked by
bridgectl/sweep/spec.py. The spec format, resume rules and multi-node use are documented in sweeps/README.md.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bridgectl.config.compose import compose
from bridgectl.core.ui import console
from bridgectl.errors import StopRun, UserError
from bridgectl.launch.cluster import make_executor
from bridgectl.sweep.claims import (
    claim_queued,
    claim_sampled,
    describe_dead,
    fail_dead,
    free_points,
    heartbeat,
    is_complete,
    is_dead,
    is_disposed,
    is_sampled,
    make_sampler,
    point_of,
    queue_missing,
    remaining_trials,
    run_every,
    trial_seed,
    worker_name,
)
from bridgectl.sweep.spec import SweepSpec, load_spec, space_points, suggest_params, trial_overrides

if TYPE_CHECKING:  # compare (and its numpy) loads only when a sweep compares its trials
    from bridgectl.analysis.rows import GroupRow


class DeadWorkers(RuntimeError):
    """Worker processes died and trials they held were not retried to completion (the CLI exits 1)."""


def storage_url(url: str, workers: int) -> str:
    """`--storage URL` as SQLAlchemy 2 opens it: a bare postgresql:// URL names psycopg2, which is rarely
    installed where psycopg 3 is, so it becomes postgresql+psycopg:// when only psycopg 3 is there. A URL whose
    driver is missing, and SQLite with several workers (its file locks let concurrent writers lose or repeat
    trials, Optuna's own warning), are refused with the reason."""
    import importlib.util

    from bridgectl.errors import UserError

    def installed(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "postgresql" and not installed("psycopg2") and installed("psycopg"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
        scheme = "postgresql+psycopg"
    drivers = {
        "postgresql": "psycopg2",
        "postgresql+psycopg2": "psycopg2",
        "postgresql+psycopg": "psycopg",
        "mysql": "MySQLdb",
        "mysql+pymysql": "pymysql",
    }
    if scheme in drivers and not installed(drivers[scheme]):
        raise UserError(
            f"--storage {scheme}:// needs the {drivers[scheme]} package, which is not installed",
            "pip install 'psycopg[binary]' for postgresql:// (psycopg 3), or pymysql for "
            "mysql+pymysql://; or leave --storage out (a journal file in the sweep directory)",
        )
    if scheme.startswith("sqlite") and workers > 1:
        raise UserError(
            "--storage sqlite:// with --workers > 1: SQLite's file locks let concurrent workers lose "
            "trials or run one twice",
            "leave --storage out (the journal file handles concurrent workers), use PostgreSQL, or --workers 1",
        )
    return url


def make_study(spec: SweepSpec, sweep_dir: Path, storage_url: str | None):
    """Opens (or creates) the spec's study in the journal file of `sweep_dir`, or in `storage_url`."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage_url:
        storage = open_database(storage_url)
    else:
        storage = JournalStorage(JournalFileBackend(str(sweep_dir / "optuna-journal.log")))
    pruners = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
    }
    # the sampler is replaced per sampled trial (claim_sampled) by one seeded from that trial's number
    return optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=make_sampler(spec.sampler, trial_seed(spec.name, -1)),
        pruner=pruners[spec.pruner](),
        direction=spec.direction,
        load_if_exists=True,
    )


def open_database(url: str, tries: int = 8):
    """Optuna's RDB storage of `url`. Commands started together on a new database each create Optuna's tables;
    PostgreSQL lets only one create them (the others fail with a duplicate type or table), after which opening
    succeeds: so a failed creation is retried a few times, a fraction of a second apart."""
    import random

    import optuna
    from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, ProgrammingError

    for attempt in range(tries):
        try:
            return optuna.storages.RDBStorage(url)
        except (IntegrityError, ProgrammingError):
            if attempt == tries - 1:
                raise
            time.sleep(0.2 + random.random() * 0.5)
        except (OperationalError, ArgumentError) as error:  # no server there, a bad login, a malformed URL
            shown = url
            if "@" in url:  # the user, never the password
                scheme, rest = url.split("://", 1)
                login, place = rest.rsplit("@", 1)
                shown = f"{scheme}://{login.split(':', 1)[0]}@{place}"
            reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
            raise UserError(
                f"cannot open the study storage {shown}: {reason}",
                "check that the database server runs and accepts this user from here (host, port, "
                "database name, password in the URL or ~/.pgpass)",
            ) from None


def objective(trial, spec: SweepSpec, sweep_dir: Path) -> float:
    """Runs every seed of one trial; its value is the mean of the objective metric over seeds. Pruning watches
    the first seed's periodic evaluations. While it runs, the trial's heartbeat says which process runs it."""
    params = suggest_params(trial, spec)
    with heartbeat(trial.storage, trial._trial_id):
        return _run_seeds(trial, spec, sweep_dir, params)


def _run_seeds(trial, spec: SweepSpec, sweep_dir: Path, params: dict) -> float:
    import optuna

    from bridgectl.rundir.wandb_sink import redact
    from bridgectl.rundir.writer import atomic_write_text
    from bridgectl.training.runner import run

    values = []
    tags = {"study": spec.name, "trial": trial.number, "params": params}
    split = spec.metric.split("/")[1]
    for index, seed in enumerate(spec.seeds):
        overrides = trial_overrides(spec, params, seed)
        run_path = sweep_dir / f"trial-{trial.number:03d}-seed{seed}"
        attempt = 1
        while run_path.exists():  # never reuse a directory left by an earlier attempt: runs are not overwritten
            attempt += 1
            run_path = sweep_dir / f"trial-{trial.number:03d}-seed{seed}-attempt{attempt}"
        # a retry of a trial whose process died takes over that trial's run of this seed: a finished run counts
        # as it is, a stopped one resumes from its newest checkpoint (an exact continuation, tests/test_resume.py)
        earlier = _continuable_run(sweep_dir, trial.user_attrs.get("retry_of"), seed)
        if earlier is not None:
            os.rename(earlier, run_path)
            summary = json.loads((run_path / "summary.json").read_text())
            if summary["status"] == "completed":
                summary.update(tags)
                atomic_write_text(run_path / "summary.json", json.dumps(redact(summary), indent=2))
                values.append(summary["eval"][split]["accuracy"])
                continue

        def report(step: int, metrics: dict) -> None:  # called during this seed's run, with its index
            if index == 0 and metrics.get(spec.metric) is not None:  # noqa: B023 (called within the iteration)
                trial.report(metrics[spec.metric], step)
                if trial.should_prune():
                    raise StopRun("pruned")

        try:
            if spec.run_jobs is not None:
                summary = _run_as_job(spec, overrides, run_path, tags, report, resume=earlier is not None)
            elif spec.nproc > 1:
                summary = _run_under_torchrun(spec.nproc, overrides, run_path, tags, report, resume=earlier is not None)
            else:
                summary = run(
                    compose(overrides),
                    run_path,
                    show_progress=False,
                    on_eval=report,
                    tags=tags,
                    resume=earlier is not None,
                )
        except StopRun:
            raise optuna.TrialPruned() from None
        values.append(summary["eval"][split]["accuracy"])
    return sum(values) / len(values)


def _run_under_torchrun(
    nproc: int, overrides: list[str], run_path: Path, tags: dict, on_eval, resume: bool, poll_seconds: float = 0.5
) -> dict:
    """One seed of a trial as `bridgectl run --nproc N` (torchrun, its own process group) and its summary. Rank 0
    reports through its metrics.jsonl: each periodic evaluation it logs goes to `on_eval` as it appears, and when
    that raises StopRun (pruned) the run is stopped with SIGTERM (its processes checkpoint and end interrupted)
    and the StopRun raised here. Its output goes to <run_path>.log beside the run directory; a run that fails
    raises with that log's last lines."""
    import subprocess
    import tempfile

    from bridgectl.launch.torchrun import EXIT_DIR, RUN_TAGS, torchrun_command, workers_status

    command = torchrun_command(nproc, overrides, run_path, run_path if resume else None, [])
    log_path = run_path.with_name(run_path.name + ".log")
    seen = 0
    with tempfile.TemporaryDirectory(prefix="bridgectl-exit-") as statuses, open(log_path, "a") as log:
        # the tags reach the run's summary (a resumed one's too) and W&B from its start (launch.run_tags)
        env = {**os.environ, RUN_TAGS: json.dumps(tags), EXIT_DIR: statuses}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while process.poll() is None:
                time.sleep(poll_seconds)
                seen = _pass_new_evaluations(run_path / "metrics.jsonl", seen, on_eval)
            _pass_new_evaluations(run_path / "metrics.jsonl", seen, on_eval)
        except BaseException:  # pruned (StopRun), Ctrl-C or the worker's own end: torchrun passes SIGTERM on to
            process.terminate()  # its workers, which checkpoint and stop
            process.wait()
            raise
        status = workers_status(Path(statuses), process.returncode)
    if status != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"the torchrun run {run_path.name} exited with status {status}; its log {log_path}:\n{tail}")
    return json.loads((run_path / "summary.json").read_text())


def _run_as_job(
    spec: SweepSpec, overrides: list[str], run_path: Path, tags: dict, on_eval, resume: bool, poll_seconds: float = 1.0
) -> dict:
    """One seed of a trial as a cluster job of spec.nnodes torchrun nodes (bridgectl/launch/cluster.py, as `bridgectl run
    --launcher slurm --nnodes N` submits it) and its summary; rank 0's evaluations reach `on_eval` from its
    metrics.jsonl as they are logged, and a pruned run's job is cancelled (its processes get SIGTERM and
    checkpoint)."""
    from bridgectl.launch.cluster import job_status, submit_run
    from bridgectl.launch.torchrun import RUN_TAGS

    launcher, options = spec.run_jobs
    job = submit_run(
        launcher, options, spec.nproc, spec.nnodes, overrides, run_path, resume, [], env={RUN_TAGS: json.dumps(tags)}
    )
    seen = 0
    try:
        while not job.done():
            time.sleep(poll_seconds)
            seen = _pass_new_evaluations(run_path / "metrics.jsonl", seen, on_eval)
        _pass_new_evaluations(run_path / "metrics.jsonl", seen, on_eval)
    except BaseException:  # pruned, or Ctrl-C: the job stops with the trial
        with contextlib.suppress(Exception):
            job.cancel()
        raise
    status = job_status(job)
    if status != 0:
        raise RuntimeError(
            f"the job {job.job_id} of run {run_path.name} exited with status {status}; its log {job.paths.stdout}"
        )
    return json.loads((run_path / "summary.json").read_text())


def _pass_new_evaluations(metrics_path: Path, seen: int, on_eval) -> int:
    """Calls on_eval(step, metrics) for each complete line of metrics.jsonl past the first `seen` that holds an
    evaluation; returns how many lines are read now (a line still being written waits for the next call)."""
    try:
        text = metrics_path.read_text()
    except OSError:  # not written yet
        return seen
    lines = text.splitlines(keepends=True)
    complete = [line for line in lines if line.endswith("\n")]
    for line in complete[seen:]:
        try:
            metrics = json.loads(line)
        except ValueError:
            continue
        if any(key.startswith("eval/") for key in metrics):
            on_eval(metrics["step"], metrics)
    return len(complete)


def _continuable_run(sweep_dir: Path, trial_number: int | None, seed: int) -> Path | None:
    """The newest run directory of trial `trial_number` for `seed`, if a retry can take it over: completed, or
    stopped (status running, its process having died, or interrupted) with a complete checkpoint. None otherwise:
    a run that failed on its own starts again from the beginning."""
    from bridgectl.core.checkpoint import list_checkpoints

    if trial_number is None:
        return None
    name = f"trial-{trial_number:03d}-seed{seed}"
    attempts = sorted(sweep_dir.glob(f"{name}-attempt*"), key=lambda path: int(path.name.rpartition("attempt")[2]))
    newest = ([path for path in [sweep_dir / name, *attempts] if path.exists()] or [None])[-1]
    if newest is None or not (newest / "summary.json").exists():
        return None
    status = json.loads((newest / "summary.json").read_text()).get("status")
    if status == "completed" or (status in ("running", "interrupted") and list_checkpoints(newest / "checkpoints")):
        return newest
    return None


@dataclass
class Progress:
    """What the live view shows, read from the study's storage (so it covers every worker process)."""

    done: int = 0
    running: int = 0
    pruned: int = 0
    failed: int = 0
    best: float | None = None


def read_progress(study) -> Progress:
    """The study's counts now; trials disposed in a claim race never ran and are not counted as failed."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if not is_disposed(t)]
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    progress = Progress(
        counts[TrialState.COMPLETE], counts[TrialState.RUNNING], counts[TrialState.PRUNED], counts[TrialState.FAIL]
    )
    if progress.done:
        progress.best = study.best_value
    return progress


def failed_trials(study) -> list:
    """Failed trials that count as failures: not disposed in a claim race, and not since retried (a retry takes
    over their run directories)."""
    from optuna.trial import TrialState

    retried = {t.user_attrs.get("retry_of") for t in study.trials}
    return [t for t in study.trials if t.state == TrialState.FAIL and not is_disposed(t) and t.number not in retried]


@contextlib.contextmanager
def watching(spec: SweepSpec, sweep_dir: Path, storage_url: str | None, on_progress, every: float = 1.0):
    """Calls on_progress(Progress) every `every` seconds from a thread reading its own handle on the storage,
    and once more at the end."""
    if on_progress is None:
        yield
        return
    study = make_study(spec, sweep_dir, storage_url)
    on_progress(read_progress(study))
    with run_every(every, lambda: on_progress(read_progress(study)), "bridgectl-sweep-view"):  # a torn read: skipped
        yield
    on_progress(read_progress(study))


def progress_view(progress, task):
    """An on_progress for run_sweep that shows the study's counts (read from the storage: every worker's trials)
    on `task` of a rich progress bar (bridgectl.core.ui.progress_bar): the trials done or pruned, and the best
    value so far."""

    def show(state: Progress) -> None:
        best = f"{state.best:.3f}" if state.best is not None else "-"
        progress.update(
            task,
            completed=state.done + state.pruned,
            info=f"done {state.done} running {state.running} pruned {state.pruned} failed {state.failed} best {best}",
        )

    return show


def run_trial(study, trial, spec: SweepSpec, sweep_dir: Path) -> None:
    """Runs a claimed trial and records how it ended, as study.optimize(catch=(Exception,)) would: its value,
    PRUNED, or FAIL with the error printed (its run directory's summary holds it too). Ctrl-C fails it and stops."""
    import optuna
    from optuna.trial import TrialState

    try:
        value = objective(trial, spec, sweep_dir)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
    except (Exception, KeyboardInterrupt) as error:
        study._storage.set_trial_system_attr(trial._trial_id, "fail_reason", repr(error))
        study.tell(trial, state=TrialState.FAIL)
        if isinstance(error, KeyboardInterrupt):
            raise
        console.print(f"trial {trial.number} {trial.params} failed: {error}", markup=False)
    else:
        study.tell(trial, value)


def work(study, spec: SweepSpec, sweep_dir: Path, worker: str) -> int:
    """Claims and runs trials until none is left: queued ones first (lowest number first), then, for random and
    tpe, new sampled trials while n_trials lasts. The storage is read at every claim, so work that other
    processes queue meanwhile is taken too. Returns how many trials this worker ran."""
    ran = 0
    while True:
        trial = claim_queued(study, worker)
        if trial is None and spec.sampler != "grid":
            trial = claim_sampled(study, spec, worker)
        if trial is None:
            return ran
        run_trial(study, trial, spec, sweep_dir)
        ran += 1


def _worker(
    spec_path: str, sweep_dir: str, storage_url: str | None, index: int, placement: tuple = (None, None, None)
) -> None:
    """A worker process or cluster job: its own handle on the study, working until nothing is left.
    `placement`: the command's (nproc, nnodes, run_jobs), which replace the spec's."""
    nproc, nnodes, run_jobs = placement
    spec = replace(load_spec(Path(spec_path), nproc, nnodes), run_jobs=run_jobs)
    study = make_study(spec, Path(sweep_dir), storage_url)
    work(study, spec, Path(sweep_dir), worker_name(index))


@dataclass
class Death:
    """A worker process that ended with a non-zero exit code."""

    index: int
    pid: int
    exitcode: int

    def how(self) -> str:
        """How it ended, in words: the signal that killed it, or its exit status."""
        if self.exitcode < 0:
            return f"was killed by {signal.Signals(-self.exitcode).name}"
        return f"exited with status {self.exitcode}"


def _run_local(
    spec_path: Path, sweep_dir: Path, storage_url: str | None, study, spec: SweepSpec, workers: int
) -> list[Death]:
    """Runs what is left with up to `workers` workers: in this process when one is enough, else as spawned
    processes (fresh interpreters: no forked torch thread pools). Returns the worker processes that died."""
    count = min(workers, remaining_trials(study, spec))
    if count == 0:
        return []
    if count == 1:
        work(study, spec, sweep_dir, worker_name(0))
        return []
    context = multiprocessing.get_context("spawn")
    placement = (spec.nproc, spec.nnodes, spec.run_jobs)
    processes = [
        context.Process(
            target=_worker,
            args=(str(spec_path), str(sweep_dir), storage_url, index, placement),
            name=f"bridgectl-sweep-worker-{index}",
        )
        for index in range(count)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()  # reaped: a dead worker's pid is gone, so is_dead sees its trial at once
    return [
        Death(index, process.pid, process.exitcode) for index, process in enumerate(processes) if process.exitcode != 0
    ]


def _report_deaths(study, deaths: list[Death]) -> list:
    """Prints each dead worker with the trials it held, marks those (and any other dead trial) failed, and
    returns them."""
    lost = fail_dead(study)
    for death in deaths:
        held = [t for t in lost if (t.system_attrs.get("heartbeat") or {}).get("pid") == death.pid]
        names = ", ".join(f"trial {t.number} {point_of(t)}" for t in held) or "no trial"
        console.print(f"worker {death.index} (pid {death.pid}) {death.how()} while running {names}", markup=False)
    pids = {death.pid for death in deaths}
    for trial in lost:
        if (trial.system_attrs.get("heartbeat") or {}).get("pid") not in pids:
            console.print(f"{describe_dead(trial)}: marked failed", markup=False)
    return lost


def unretried(study, spec: SweepSpec, dead: list) -> list:
    """The dead trials whose point no trial has since completed (or pruned), nor is running in a live process."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if not is_disposed(t)]

    def covers(trial, gone) -> bool:
        finished = trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
        live = trial.state == TrialState.RUNNING and not is_dead(trial)
        return trial.number != gone.number and point_of(trial) == point_of(gone) and (finished or live)

    def retried(gone) -> bool:
        return is_complete(point_of(gone), spec) and any(covers(trial, gone) for trial in trials)

    return [gone for gone in dead if not retried(gone)]


def run_sweep(
    spec_path: Path,
    out: Path,
    workers: int,
    storage_url: str | None,
    on_progress=None,
    launcher: str = "local",
    launcher_options: dict | None = None,
    poll_seconds: float = 1.0,
    nproc: int | None = None,
    nnodes: int | None = None,
):
    """Runs the trials still missing; returns the study. Crashing trials are marked failed (with their error in
    their run directory) and the sweep goes on. `launcher`: local (this process, or up to `workers` spawned
    processes) or a submitit executor (slurm, or submitit-local: the same path on this machine) running `workers`
    jobs. Dead workers: trials left running by a process that is gone (found at the start, or a local worker
    process that died) are reported and run again once (a local worker's in one more pass of workers); raises
    DeadWorkers when one was not retried to completion, or a worker of that last pass died too. `nproc` and
    `nnodes` replace the spec's: each seed of a trial then runs under torchrun in nproc processes, or, with
    nnodes > 1, as a job of the launcher (slurm or submitit-local) whose nnodes tasks are torchrun nodes,
    submitted by workers that run here."""
    spec = load_spec(spec_path, nproc, nnodes)
    if spec.nnodes > 1:
        if launcher == "local":
            raise UserError(
                f"trials over {spec.nnodes} nodes are cluster jobs",
                "add --launcher slurm (or submitit-local to try it on this machine)",
            )
        spec = replace(spec, run_jobs=(launcher, launcher_options or {}))
        launcher = "local"  # the workers run here and submit each run as a job
    sweep_dir = out / spec.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study = make_study(spec, sweep_dir, storage_url)
    dead = fail_dead(study)
    for trial in dead:
        console.print(f"{describe_dead(trial)}: marked failed; it runs again", markup=False)
    queue_missing(study, spec)
    final_deaths: list[Death] = []
    with watching(spec, sweep_dir, storage_url, on_progress, every=poll_seconds):
        if launcher != "local":
            count = min(workers, remaining_trials(study, spec))
            if count:
                _submit_workers(
                    launcher,
                    launcher_options or {},
                    spec_path,
                    sweep_dir,
                    storage_url,
                    count,
                    (spec.nproc, spec.nnodes, None),
                )
        else:
            deaths = _run_local(spec_path, sweep_dir, storage_url, study, spec, workers)
            if deaths:  # one more pass: the dead workers' trials run again, with whatever else is left
                lost = _report_deaths(study, deaths)
                dead += lost
                queue_missing(study, spec, only=[point_of(t) for t in lost if is_complete(point_of(t), spec)])
                final_deaths = _run_local(spec_path, sweep_dir, storage_url, study, spec, workers)
                dead += _report_deaths(study, final_deaths) if final_deaths else []
    study = make_study(spec, sweep_dir, storage_url)
    problems = [f"trial {t.number} {point_of(t)}" for t in unretried(study, spec, dead)]
    problems += [f"worker {d.index} (pid {d.pid}) of the retry pass {d.how()}" for d in final_deaths]
    if problems:
        raise DeadWorkers("dead workers' trials were not retried to completion: " + "; ".join(problems))
    _note_exhausted(study, spec)
    return study


def _note_exhausted(study, spec: SweepSpec) -> None:
    """Says so when a finite search space ran out of untried points before n_trials sampled trials."""
    if spec.sampler == "grid":
        return
    trials = study.get_trials(deepcopy=False)
    sampled = sum(is_sampled(t) for t in trials)
    if sampled < spec.n_trials and free_points(trials, spec) == []:
        console.print(
            f"the search space has {len(space_points(spec))} points and every one has a trial: the "
            f"sweep stops at {sampled} sampled trials of n_trials {spec.n_trials}",
            markup=False,
        )


def trial_comparison(spec: SweepSpec, sweep_dir: Path) -> tuple[list[GroupRow], list[str]] | None:
    """The `bridgectl compare` rows and footnotes of the sweep's completed runs, grouped by the spec's params (by
    trial when it has none); None when no run has completed."""
    from bridgectl.analysis import compare as comparison
    from bridgectl.analysis import tables

    if not comparison.run_dirs_under(sweep_dir):
        return None
    loaded = comparison.load_runs([str(sweep_dir)])
    if not loaded.runs:
        return None
    # the trial's seeds share the spec's config; whatever else differs is pooled and stated, not a failed sweep
    rows = comparison.compare(loaded, list(spec.params) or ["trial"], spec.metric, None, pool=None)
    return rows, tables.footnotes(loaded, rows)


def print_outcome(study, spec: SweepSpec) -> None:
    """Prints how many trials failed (not since retried, nor disposed in a claim race: those never ran) and the
    best trial with its params."""
    from optuna.trial import TrialState
    from rich.markup import escape

    failed = failed_trials(study)
    if failed:
        console.print(f"{len(failed)} trial(s) failed; their run directories hold the error in summary.json")
    if any(t.state == TrialState.COMPLETE for t in study.trials):
        console.print(
            f"best trial {study.best_trial.number}: {spec.metric} = {study.best_value:.3f} with "
            f"{escape(str(study.best_params))}"
        )


def _submit_workers(
    launcher: str,
    options: dict,
    spec_path: Path,
    sweep_dir: Path,
    storage_url: str | None,
    count: int,
    placement: tuple = (None, None, None),
) -> None:
    """One submitit job per worker, each joining the shared study; waits for them all. Ctrl-C cancels the jobs
    (the study stays resumable). A job that dies is reported; its trial is retried on the next resume."""
    executor = make_executor(launcher, sweep_dir / "submitit", options, name="bridgectl-sweep")
    try:
        jobs = [
            executor.submit(
                _worker, str(Path(spec_path).resolve()), str(sweep_dir.resolve()), storage_url, index, placement
            )
            for index in range(count)
        ]
    except Exception as error:  # sbatch refused the job (partition, account, limits): the user's settings
        raise UserError(
            f"submitting the sweep's worker jobs failed: {error}",
            "check --launcher-opt (partition, account, time) against `sinfo`",
        ) from None
    try:
        while not all(job.done() for job in jobs):
            time.sleep(1.0)
    except KeyboardInterrupt:
        for job in jobs:
            with contextlib.suppress(Exception):
                job.cancel()
        raise
    errors = [f"job {job.job_id}: {job.exception()}" for job in jobs if job.exception() is not None]
    if errors:
        raise RuntimeError(f"sweep worker job(s) failed; logs in {sweep_dir / 'submitit'}\n" + "\n".join(errors))
