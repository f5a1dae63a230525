"""`bridgectl sweep SPEC.yaml`: an Optuna study over `bridgectl run` configs (Optuna driven directly:
hydra-optuna-sweeper does not work with Optuna 5). Each trial composes its config with Hydra's compose API, exactly
as `bridgectl run` would, runs every seed of the spec as an ordinary run directory under the sweep directory
(tagged with the study and trial number, so `compare` reads them), and scores the trial by the mean over seeds.

Storage: an Optuna journal file in the sweep directory by default (`--storage URL` for any Optuna RDB URL, e.g.
PostgreSQL shared by workers on many machines). Re-running the same command resumes: completed trials are kept
and only the missing ones run; trials whose process died (heartbeats) run again. `--workers N` runs N trials at once
as separate processes on the same storage, or as N cluster jobs through submitit (`--launcher slurm`). The spec
format, resume rules and multi-node use are documented in sweeps/README.md.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from bridgectl.config import compose
from bridgectl.errors import StopRun, UserError

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "hyperband")
LAUNCHERS = ("local", "slurm", "submitit-local")
HEARTBEAT_SECONDS = 15.0
"""How often a running trial records that its process is alive (a system attribute in the study)."""
STALE_AFTER_SECONDS = 120.0
"""A running trial of another machine whose heartbeat is older than this is taken for dead on resume."""
PARAM_TYPES = ("float", "int", "categorical")


@dataclass
class SweepSpec:
    name: str
    base: list[str]
    seeds: list[int]
    metric: str
    direction: str
    sampler: str
    n_trials: int
    pruner: str
    params: dict[str, dict]

    def grid(self) -> list[dict]:
        """Every combination of the params' `choices` (grid search; floats and ints need `values`)."""
        keys = list(self.params)
        values = [self.params[k].get("choices") or self.params[k].get("values") for k in keys]
        return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def load_spec(path: Path) -> SweepSpec:
    if not path.is_file():
        raise UserError(f"sweep spec {path} does not exist", "give a YAML file like sweeps/quick.yaml")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as error:  # yaml's own errors: any unreadable file is bad input
        raise UserError(f"sweep spec {path} is not valid YAML: {str(error).splitlines()[0]}", "check its indentation") from None
    if not isinstance(raw, dict):
        raise UserError(f"sweep spec {path} is not a mapping", "see sweeps/README.md for the format")
    known = {"name", "base", "seeds", "objective", "sampler", "n_trials", "pruner", "params"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"unknown key(s) in sweep spec: {', '.join(unknown)}", f"keys are: {', '.join(sorted(known))}")
    objective = raw.get("objective") or {}
    spec = SweepSpec(
        name=str(raw.get("name") or path.stem), base=[str(b) for b in raw.get("base") or []],
        seeds=[int(s) for s in raw.get("seeds") or [0]], metric=objective.get("metric", "eval/test/accuracy"),
        direction=objective.get("direction", "maximize"), sampler=raw.get("sampler", "tpe"),
        n_trials=int(raw.get("n_trials", 10)), pruner=raw.get("pruner", "none"), params=raw.get("params") or {})
    checks = [
        (spec.sampler in SAMPLERS, f"unknown sampler '{spec.sampler}'", f"choose one of: {', '.join(SAMPLERS)}"),
        (spec.pruner in PRUNERS, f"unknown pruner '{spec.pruner}'", f"choose one of: {', '.join(PRUNERS)}"),
        (spec.direction in ("maximize", "minimize"), f"unknown direction '{spec.direction}'", "maximize or minimize"),
        (spec.n_trials > 0, f"n_trials must be positive, got {spec.n_trials}", "e.g. n_trials: 12"),
        (spec.metric.startswith("eval/") and spec.metric.endswith("/accuracy"), f"unsupported objective metric "
         f"'{spec.metric}'", "use a final eval metric, e.g. eval/test/accuracy or eval/ood/accuracy"),
    ]
    for ok, message, hint in checks:
        if not ok:
            raise UserError(message, hint)
    if not spec.params and spec.sampler != "grid":
        raise UserError(f"sampler {spec.sampler} has no params to search", "add params, or use sampler: grid to run "
                        "the base config over seeds")
    for key, param in spec.params.items():
        kind = param.get("type") if isinstance(param, dict) else None
        if kind not in PARAM_TYPES:
            raise UserError(f"param '{key}' needs a type", f"type is one of: {', '.join(PARAM_TYPES)}")
        if kind == "categorical" and not param.get("choices"):
            raise UserError(f"categorical param '{key}' has no choices", "e.g. choices: [4, 8, 16]")
        if kind != "categorical" and not ({"low", "high"} <= set(param) or param.get("values")):
            raise UserError(f"param '{key}' needs low and high (or values for a grid)", "e.g. {type: float, low: 0.1, high: 0.9}")
        if {"low", "high"} <= set(param) and not param["low"] < param["high"]:
            raise UserError(f"param '{key}': low {param['low']} is not below high {param['high']}", "swap them")
        if param.get("log") and {"low", "high"} <= set(param) and param["low"] <= 0:
            raise UserError(f"param '{key}': a log scale needs low > 0, got {param['low']}", "e.g. low: 1.0e-5")
        if spec.sampler == "grid" and kind != "categorical" and not param.get("values"):
            raise UserError(f"grid sampler: param '{key}' needs a list of values", "e.g. values: [0.3, 0.5, 0.7]")
    # Every key and value must compose exactly as `bridgectl run` would: check one example of each param.
    example = {k: (p.get("choices") or p.get("values") or [p["low"]])[0] for k, p in spec.params.items()}
    cfg = compose(trial_overrides(spec, example, spec.seeds[0]))
    from bridgectl.tasks import task_eval_splits

    splits = task_eval_splits(cfg.task)
    if spec.metric.split("/")[1] not in splits:
        raise UserError(f"objective metric {spec.metric} is never logged by task {cfg.task.name}",
                        f"its eval splits are: {', '.join(splits)} (e.g. eval/{splits[0]}/accuracy)")
    return spec


def trial_overrides(spec: SweepSpec, params: dict, seed: int) -> list[str]:
    return [*spec.base, *(f"{key}={value}" for key, value in params.items()), f"seed={seed}"]


def _suggest(trial, spec: SweepSpec) -> dict:
    params = {}
    for key, param in spec.params.items():
        kind = param["type"]
        if kind == "categorical" or spec.sampler == "grid":
            params[key] = trial.suggest_categorical(key, param.get("choices") or param.get("values"))
        elif kind == "float":
            params[key] = trial.suggest_float(key, param["low"], param["high"], log=bool(param.get("log")))
        else:
            params[key] = trial.suggest_int(key, int(param["low"]), int(param["high"]), log=bool(param.get("log")))
    return params


def make_study(spec: SweepSpec, sweep_dir: Path, storage_url: str | None):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage_url or JournalStorage(JournalFileBackend(str(sweep_dir / "optuna-journal.log")))
    # grid: every point is queued with fixed params by queue_missing (a failed or killed point is queued again,
    # which Optuna's GridSampler would count as visited), so the sampler itself never chooses
    samplers = {"grid": lambda: optuna.samplers.RandomSampler(seed=0),
                "random": lambda: optuna.samplers.RandomSampler(seed=0),
                "tpe": lambda: optuna.samplers.TPESampler(seed=0)}
    pruners = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
               "hyperband": optuna.pruners.HyperbandPruner}
    return optuna.create_study(study_name=spec.name, storage=storage, sampler=samplers[spec.sampler](),
                               pruner=pruners[spec.pruner](), direction=spec.direction, load_if_exists=True)


def objective(trial, spec: SweepSpec, sweep_dir: Path) -> float:
    """Runs every seed of one trial; its value is the mean of the objective metric over seeds. Pruning watches
    the first seed's periodic evaluations. While it runs, the trial's heartbeat says which process runs it."""
    params = _suggest(trial, spec)
    with heartbeat(trial.storage, trial._trial_id):
        return _run_seeds(trial, spec, sweep_dir, params)


def _run_seeds(trial, spec: SweepSpec, sweep_dir: Path, params: dict) -> float:
    import optuna

    from bridgectl.core.tracking import atomic_write_text
    from bridgectl.core.wandb_sink import redact
    from bridgectl.runner import run

    values = []
    tags = {"study": spec.name, "trial": trial.number, "params": params}
    split = spec.metric.split("/")[1]
    for index, seed in enumerate(spec.seeds):
        cfg = compose(trial_overrides(spec, params, seed))
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

        def report(step: int, metrics: dict) -> None:
            if index == 0 and metrics.get(spec.metric) is not None:
                trial.report(metrics[spec.metric], step)
                if trial.should_prune():
                    raise StopRun("pruned")

        try:
            summary = run(cfg, run_path, show_progress=False, on_eval=report, tags=tags, resume=earlier is not None)
        except StopRun:
            raise optuna.TrialPruned() from None
        values.append(summary["eval"][split]["accuracy"])
    return sum(values) / len(values)


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


@contextlib.contextmanager
def heartbeat(storage, trial_id: int, interval: float = HEARTBEAT_SECONDS):
    """Records {host, pid, time} in the trial's system attributes now and every `interval` seconds until the
    block ends, from a daemon thread (Optuna's own heartbeat exists for RDB storage only; this one works with
    the journal file too)."""
    def beat() -> None:
        storage.set_trial_system_attr(trial_id, "heartbeat",
                                      {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})

    beat()
    with _every(interval, beat, "bridgectl-heartbeat"):  # a missed beat only makes the trial look older
        yield


@contextlib.contextmanager
def _every(seconds: float, action, name: str):
    """Runs `action` every `seconds` in a daemon thread while the block runs; an action that raises is skipped
    until its next turn."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(seconds):
            with contextlib.suppress(Exception):
                action()

    thread = threading.Thread(target=loop, daemon=True, name=name)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_dead(trial, now: float | None = None, stale_after: float = STALE_AFTER_SECONDS) -> bool:
    """Whether a RUNNING trial's process is gone: on this machine, its recorded pid no longer exists; on another
    machine (shared storage), its last heartbeat is older than `stale_after`."""
    now = time.time() if now is None else now
    beat = trial.system_attrs.get("heartbeat")
    if beat is None:  # died before its first beat (or written by an older version)
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return now - started > stale_after
    if beat["host"] == socket.gethostname():
        return beat["pid"] != os.getpid() and not _process_alive(beat["pid"])
    return now - beat["time"] > stale_after


def queue_missing(study, spec: SweepSpec) -> int:
    """Resume: trials left RUNNING by a dead process (is_dead) are marked failed; then every grid point, or every
    failed trial's params, not yet covered by a finished or running trial is queued (once) to run next. Safe while
    other workers of the sweep run: their trials are alive. Returns the number of trials waiting to run."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if is_dead(trial):
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    covered = [t.params for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)]
    waiting = [t.system_attrs.get("fixed_params", {}) for t in trials if t.state == TrialState.WAITING]
    failed = {json.dumps(t.params, sort_keys=True): t.number for t in trials if t.state == TrialState.FAIL}
    wanted = spec.grid() if spec.sampler == "grid" else [t.params for t in trials if t.state == TrialState.FAIL]
    for params in wanted:
        if params and params not in covered and params not in waiting:
            retry_of = failed.get(json.dumps(params, sort_keys=True))  # the newest failed trial with these params
            study.enqueue_trial(params, skip_if_exists=False,
                                user_attrs={} if retry_of is None else {"retry_of": retry_of})
            waiting.append(params)
    return len(waiting)


def remaining_trials(study, spec: SweepSpec) -> int:
    """Trials still to start: the total minus those finished or running (other workers' included)."""
    from optuna.trial import TrialState

    started = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    total = len(spec.grid()) if spec.sampler == "grid" else spec.n_trials
    return max(0, total - len(started))


@dataclass
class Progress:
    """What the live view shows, read from the study's storage (so it covers every worker process)."""
    done: int = 0
    running: int = 0
    pruned: int = 0
    failed: int = 0
    best: float | None = None


def read_progress(study) -> Progress:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    progress = Progress(counts[TrialState.COMPLETE], counts[TrialState.RUNNING], counts[TrialState.PRUNED],
                        counts[TrialState.FAIL])
    if progress.done:
        progress.best = study.best_value
    return progress


@contextlib.contextmanager
def watching(spec: SweepSpec, sweep_dir: Path, storage_url: str | None, on_progress, every: float = 1.0):
    """Calls on_progress(Progress) every `every` seconds from a thread reading its own handle on the storage,
    and once more at the end."""
    if on_progress is None:
        yield
        return
    study = make_study(spec, sweep_dir, storage_url)
    on_progress(read_progress(study))
    with _every(every, lambda: on_progress(read_progress(study)), "bridgectl-sweep-view"):  # a torn read: skipped
        yield
    on_progress(read_progress(study))


def _worker(spec_path: str, sweep_dir: str, storage_url: str | None, n_trials: int) -> None:
    spec = load_spec(Path(spec_path))
    study = make_study(spec, Path(sweep_dir), storage_url)
    study.optimize(lambda t: objective(t, spec, Path(sweep_dir)), n_trials=n_trials, catch=(Exception,))


def run_sweep(spec_path: Path, out: Path, workers: int, storage_url: str | None, on_progress=None,
              launcher: str = "local", launcher_options: dict | None = None, poll_seconds: float = 1.0):
    """Runs the trials still missing; returns the study. Crashing trials are marked failed (with their error in
    their run directory) and the sweep goes on. `launcher`: local (this process, or `workers` spawned processes)
    or a submitit executor (slurm, or submitit-local: the same path on this machine) running `workers` jobs."""
    spec = load_spec(spec_path)
    sweep_dir = out / spec.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study = make_study(spec, sweep_dir, storage_url)
    queue_missing(study, spec)
    missing = remaining_trials(study, spec)
    if missing == 0:
        return study
    workers = min(workers, missing)
    shares = [missing // workers + (1 if i < missing % workers else 0) for i in range(workers)]
    with watching(spec, sweep_dir, storage_url, on_progress, every=poll_seconds):
        if launcher != "local":
            _submit_workers(launcher, launcher_options or {}, spec_path, sweep_dir, storage_url, shares)
        elif workers == 1:
            study.optimize(lambda t: objective(t, spec, sweep_dir), n_trials=missing, catch=(Exception,))
        else:
            context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
            processes = [context.Process(target=_worker, args=(str(spec_path), str(sweep_dir), storage_url, share))
                         for share in shares]
            for process in processes:
                process.start()
            for process in processes:
                process.join()
    return make_study(spec, sweep_dir, storage_url)


def make_executor(launcher: str, folder: Path, options: dict):
    """A submitit executor for `slurm` (sbatch) or `submitit-local` (subprocesses on this machine, for trying the
    cluster path without a cluster). `options` go to submitit's update_parameters (timeout_min,
    slurm_partition, gpus_per_node, cpus_per_task, mem_gb, slurm_account, ...)."""
    try:
        import submitit
    except ImportError:
        raise UserError(f"--launcher {launcher} needs submitit", "pip install 'bridgectl[slurm]'") from None
    cluster = "slurm" if launcher == "slurm" else "local"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    except RuntimeError as error:  # no srun/sbatch on this machine
        raise UserError(f"--launcher {launcher}: {error}",
                        "run the sweep from a Slurm login node, or start `bridgectl sweep SPEC --storage URL` on "
                        "each machine by hand (sweeps/README.md)") from None
    try:
        executor.update_parameters(name="bridgectl-sweep", **options)
    except (ValueError, TypeError, NameError) as error:
        raise UserError(f"submitit rejected the {launcher} launcher settings: {error}",
                        "--launcher-opt takes submitit's update_parameters names, e.g. timeout_min=120 "
                        "slurm_partition=gpu gpus_per_node=1") from None
    return executor


def _submit_workers(launcher: str, options: dict, spec_path: Path, sweep_dir: Path, storage_url: str | None,
                    shares: list[int]) -> None:
    """One submitit job per worker, each joining the shared study; waits for them all. Ctrl-C cancels the jobs
    (the study stays resumable). A job that dies is reported; its trial is retried on the next resume."""
    executor = make_executor(launcher, sweep_dir / "submitit", options)
    try:
        jobs = [executor.submit(_worker, str(Path(spec_path).resolve()), str(sweep_dir.resolve()), storage_url,
                                share) for share in shares]
    except Exception as error:  # sbatch refused the job (partition, account, limits): the user's settings
        raise UserError(f"submitting the sweep's worker jobs failed: {error}",
                        "check --launcher-opt (partition, account, time) against `sinfo`") from None
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
