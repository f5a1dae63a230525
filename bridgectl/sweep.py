"""`bridgectl sweep SPEC.yaml`: an Optuna study over `bridgectl run` configs (Optuna driven directly:
hydra-optuna-sweeper does not work with Optuna 5). Each trial composes its config with Hydra's compose API, exactly
as `bridgectl run` would, runs every seed of the spec as an ordinary run directory under the sweep directory
(tagged with the study and trial number, so `compare` reads them), and scores the trial by the mean over seeds.

Storage: an Optuna journal file in the sweep directory by default (`--storage URL` for any Optuna RDB URL, e.g.
PostgreSQL shared by workers on many machines). Re-running the same command resumes: completed trials are kept
and only the missing ones run; trials whose process died (heartbeats) run again. `--workers N` runs N worker
processes on the same storage, or N cluster jobs through submitit (`--launcher slurm`); any number of
`bridgectl sweep` processes, on any machines, may join one study.

Claims: every worker takes work through the storage alone, so no two workers of any process run the same thing.
The storage numbers trials atomically in one order every process agrees on, and a process that has created trial
n sees every trial numbered below n: so "the lowest-numbered trial wins" decides every race without a lock.
- Queued trials (grid points, retries): enqueued WAITING with a claim key (params and how many times the point had
  failed); the lowest-numbered trial with a key is its only runnable copy (a copy enqueued in a race is disposed),
  taken by Optuna's compare-and-set WAITING -> RUNNING, which exactly one worker wins.
- Sampled trials (random, tpe): the i-th sampled trial of the study runs only if i < n_trials; its sampler is
  seeded from the study name and its trial number; a draw that repeats a lower-numbered trial's params is
  replaced. Trials that lose a race end FAIL with the system attribute `bridgectl:disposed` saying why.
The spec format, resume rules and multi-node use are documented in sweeps/README.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import random
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from bridgectl.config import compose
from bridgectl.core.ui import console
from bridgectl.errors import StopRun, UserError

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "hyperband")
LAUNCHERS = ("local", "slurm", "submitit-local")
HEARTBEAT_SECONDS = 15.0
"""How often a running trial records that its process is alive (a system attribute in the study)."""
STALE_AFTER_SECONDS = 120.0
"""A running trial of another machine whose heartbeat is older than this is taken for dead on resume."""
PARAM_TYPES = ("float", "int", "categorical")
PARAM_KEYS = ("type", "low", "high", "log", "choices", "values")
SPEC_KEYS = ("name", "base", "seeds", "objective", "sampler", "n_trials", "pruner", "params")
DISPOSED = "bridgectl:disposed"
"""System attribute of a trial that never ran because it lost a claim (duplicate, surplus): why."""
ENUMERABLE_POINTS = 10_000
"""A finite search space up to this many points is enumerated, so a duplicate draw is replaced by an untried point."""


class DeadWorkers(RuntimeError):
    """Worker processes died and trials they held were not retried to completion (the CLI exits 1)."""


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


def _is_int(value) -> bool:
    """An integer, and not a boolean."""
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true is an int to Python


def _is_number(value) -> bool:
    """An integer or a float, and not a boolean."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value) -> str:
    """A YAML reader's name for a value's type, for error messages."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "empty"}
    return names.get(type(value), type(value).__name__)


def check_types(raw: dict) -> None:
    """Every field of a sweep spec has the YAML type the format says (sweeps/README.md); a wrong one is bad input
    named with its field, before any value is read."""
    def need(ok: bool, field: str, wanted: str, example: str) -> None:
        """Raises the error for `field` (dotted for nested ones) unless `ok`."""
        if not ok:
            value = raw_value(field)
            raise UserError(f"sweep spec field '{field}' must be {wanted}, got {_kind(value)} ({value!r})",
                            f"e.g. {example}")

    def raw_value(field: str):
        """The raw value of a dotted field, or None."""
        value = raw
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    fields = {"name": (str, "a string", "name: my_sweep"), "sampler": (str, "a string", "sampler: tpe"),
              "pruner": (str, "a string", "pruner: median")}
    for field, (kind, wanted, example) in fields.items():
        need(raw.get(field) is None or isinstance(raw[field], kind), field, wanted, example)
    need(raw.get("base") is None or (isinstance(raw["base"], list) and all(isinstance(b, str) for b in raw["base"])),
         "base", "a list of overrides", "base: [recipe=bridge, task=arith]")
    need(raw.get("seeds") is None or (isinstance(raw["seeds"], list) and all(_is_int(s) for s in raw["seeds"])),
         "seeds", "a list of integers", "seeds: [0, 1, 2]")
    need(raw.get("n_trials") is None or _is_int(raw["n_trials"]), "n_trials", "an integer", "n_trials: 12")
    objective = raw.get("objective")
    need(objective is None or isinstance(objective, dict), "objective", "a mapping",
         "objective: {metric: eval/test/accuracy, direction: maximize}")
    if isinstance(objective, dict):
        unknown = sorted(set(objective) - {"metric", "direction"})
        if unknown:
            raise UserError(f"unknown key(s) in objective: {', '.join(map(str, unknown))}",
                            "keys are: direction, metric")
        for field in ("metric", "direction"):
            need(objective.get(field) is None or isinstance(objective[field], str), f"objective.{field}", "a string",
                 "objective: {metric: eval/test/accuracy, direction: maximize}")
    params = raw.get("params")
    need(params is None or isinstance(params, dict), "params", "a mapping of config keys",
         "params: {bridge.lam: {type: float, low: 0.1, high: 0.9}}")
    for key, param in (params or {}).items():
        if not isinstance(param, dict):
            raise UserError(f"param '{key}' must be a mapping, got {_kind(param)} ({param!r})",
                            "e.g. {type: float, low: 0.1, high: 0.9} or {type: categorical, choices: [4, 8]}")
        unknown = sorted(set(param) - set(PARAM_KEYS))
        if unknown:
            raise UserError(f"param '{key}' has unknown key(s): {', '.join(map(str, unknown))}",
                            f"keys are: {', '.join(PARAM_KEYS)}")
        for field in ("choices", "values"):
            if field in param and not (isinstance(param[field], list) and param[field]):
                raise UserError(f"param '{key}': {field} must be a non-empty list, got {_kind(param[field])} "
                                f"({param[field]!r})", f"e.g. {field}: [4, 8, 16]")
        integer = param.get("type") == "int"
        for field in ("low", "high"):
            if field in param and not (_is_int if integer else _is_number)(param[field]):
                raise UserError(f"param '{key}': {field} must be {'an integer' if integer else 'a number'}, got "
                                f"{_kind(param[field])} ({param[field]!r})", "e.g. {type: float, low: 0.1, high: 0.9}")
        if "log" in param and not isinstance(param["log"], bool):
            raise UserError(f"param '{key}': log must be true or false, got {_kind(param['log'])}", "e.g. log: true")


def load_spec(path: Path) -> SweepSpec:
    """Reads and checks a sweep spec: types first, then values, then one composed example config."""
    if not path.is_file():
        raise UserError(f"sweep spec {path} does not exist", "give a YAML file like sweeps/quick.yaml")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as error:  # yaml's own errors: any unreadable file is bad input
        raise UserError(f"sweep spec {path} is not valid YAML: {str(error).splitlines()[0]}", "check its indentation") from None
    if not isinstance(raw, dict):
        raise UserError(f"sweep spec {path} is not a mapping", "see sweeps/README.md for the format")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise UserError(f"unknown key(s) in sweep spec: {', '.join(map(str, unknown))}",
                        f"keys are: {', '.join(sorted(SPEC_KEYS))}")
    check_types(raw)
    objective = raw.get("objective") or {}
    spec = SweepSpec(
        name=str(raw.get("name") or path.stem), base=list(raw.get("base") or []),
        seeds=list(raw.get("seeds") or [0]), metric=objective.get("metric", "eval/test/accuracy"),
        direction=objective.get("direction", "maximize"), sampler=raw.get("sampler", "tpe"),
        n_trials=raw.get("n_trials", 10), pruner=raw.get("pruner", "none"), params=raw.get("params") or {})
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
    """The `bridgectl run` overrides of one seed of one trial."""
    return [*spec.base, *(f"{key}={value}" for key, value in params.items()), f"seed={seed}"]


def _suggest(trial, spec: SweepSpec) -> dict:
    """The trial's params: its fixed ones (a queued point) or the study sampler's draw."""
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


def space_points(spec: SweepSpec, limit: int = ENUMERABLE_POINTS) -> list[dict] | None:
    """Every point of a finite search space (categorical and int params only), or None when a float param makes
    it infinite or it has more than `limit` points (a repeated draw is then improbable, and resampled)."""
    axes = []
    for key, param in spec.params.items():
        if param["type"] == "categorical" or spec.sampler == "grid":
            axes.append(param.get("choices") or param.get("values"))
        elif param["type"] == "int":
            axes.append(range(int(param["low"]), int(param["high"]) + 1))
        else:
            return None
    if math.prod(len(axis) for axis in axes) > limit:
        return None
    return [dict(zip(spec.params, combo)) for combo in itertools.product(*axes)]


def trial_seed(study_name: str, trial_number: int) -> int:
    """The sampler seed of one trial: a hash of the study name and the trial's number. The storage hands out
    trial numbers atomically, so no two trials of any worker, process or machine draw with the same seed, and a
    study re-run from scratch draws the same params in the same trial order."""
    digest = hashlib.sha256(f"{study_name}/{trial_number}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def make_sampler(kind: str, seed: int):
    """A fresh sampler of the spec's kind (grid points are queued with fixed params, so grid never samples)."""
    import optuna

    if kind == "tpe":  # constant_liar (Optuna 5's default): running trials of other workers count as bad draws
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)


def make_study(spec: SweepSpec, sweep_dir: Path, storage_url: str | None):
    """Opens (or creates) the spec's study in the journal file of `sweep_dir`, or in `storage_url`."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage_url or JournalStorage(JournalFileBackend(str(sweep_dir / "optuna-journal.log")))
    pruners = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
               "hyperband": optuna.pruners.HyperbandPruner}
    # the sampler is replaced per sampled trial (claim_sampled) by one seeded from that trial's number
    return optuna.create_study(study_name=spec.name, storage=storage,
                               sampler=make_sampler(spec.sampler, trial_seed(spec.name, -1)),
                               pruner=pruners[spec.pruner](), direction=spec.direction, load_if_exists=True)


# ---- claims: which trial runs where, decided through the storage alone -------------------------------------------


def point_of(trial) -> dict:
    """The params a trial runs with: its fixed params when it was queued, else what its sampler drew so far."""
    fixed = trial.system_attrs.get("fixed_params")
    return dict(fixed) if fixed is not None else dict(trial.params)


def _complete(point: dict, spec: SweepSpec) -> bool:
    """Whether a point has a value for every param (a sampled trial has none until it has drawn)."""
    return set(point) == set(spec.params)


def is_disposed(trial) -> bool:
    """Whether a trial lost a claim and never ran (a queue copy, a trial past n_trials, a repeated draw)."""
    return DISPOSED in trial.system_attrs


def _is_sampled(trial) -> bool:
    """Created to be drawn by the sampler (not a queued point, not the replacement of a duplicate draw): each such
    trial takes one of the spec's n_trials."""
    return ("fixed_params" not in trial.system_attrs and "claim" not in trial.user_attrs
            and "replaces" not in trial.user_attrs)


def _point_key(point: dict) -> str:
    """A point as a hashable, order-independent key."""
    return json.dumps(point, sort_keys=True)


def claim_key(point: dict, failures: int) -> str:
    """What a queued trial claims: a point, for the how-many-th time (each failure opens one more try)."""
    return f"{_point_key(point)}#{failures}"


def _canonical_waiting(trials) -> list:
    """The WAITING trials that are the lowest-numbered trial of their claim key: the only ones a worker takes.
    Every process agrees on them: a copy enqueued in a race has a higher number, and the lower one is visible to
    whoever created the higher."""
    first: dict[str, int] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        first.setdefault(trial.user_attrs.get("claim", f"#{trial.number}"), trial.number)
    from optuna.trial import TrialState

    return [t for t in sorted(trials, key=lambda t: t.number) if t.state == TrialState.WAITING
            and first[t.user_attrs.get("claim", f"#{t.number}")] == t.number]


def dispose(study, trial_id: int, reason: str) -> None:
    """Ends a trial that must not run (WAITING or RUNNING, never started by anyone) as FAIL, saying why."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    # Another process of a claim race may dispose the same copy first (mark, then fail): a finished trial here
    # was disposed already, mark included, so both steps are skipped once it is.
    with contextlib.suppress(UpdateFinishedTrialError):
        study._storage.set_trial_system_attr(trial_id, DISPOSED, reason)  # first: no reader sees it failed unmarked
        study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL)


def _beat() -> dict:
    """A heartbeat: this process, now."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}


def worker_name(index: int) -> str:
    """host:pid:index: recorded in the user attribute `worker` of every trial a worker runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{index}"


def fail_dead(study) -> list:
    """Trials left RUNNING by a process that is gone (is_dead) are marked failed; returns them as they were.
    Trials of live workers, here or on other machines, are left alone."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    dead = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if is_dead(trial):
            with contextlib.suppress(UpdateFinishedTrialError):  # another process marked it first
                study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            dead.append(trial)
    return dead


def describe_dead(trial) -> str:
    """One line naming a dead trial, its params and the process that held it."""
    beat = trial.system_attrs.get("heartbeat") or {}
    holder = f"pid {beat['pid']} on {beat['host']}" if beat else "a process that never reported"
    return f"trial {trial.number} {point_of(trial)} was left running by {holder}, which is gone"


def queue_missing(study, spec: SweepSpec, only: list[dict] | None = None) -> int:
    """Queues (once) every grid point, or every failed trial's params (random, tpe), or the points in `only`,
    that no finished, running or queued trial covers, each with its claim key and `retry_of` (the newest failed
    trial of the point, whose run directories the retry takes over). Queue copies enqueued by a concurrent
    process are then disposed. Returns the number of trials waiting to run."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if not is_disposed(t)]
    if only is not None:
        wanted = only
    elif spec.sampler == "grid":
        wanted = spec.grid()
    else:
        wanted = [point_of(t) for t in trials if t.state == TrialState.FAIL and _complete(point_of(t), spec)]
    queued: list[dict] = []
    for point in wanted:
        same = [t for t in trials if point_of(t) == point]
        if point in queued or any(t.state != TrialState.FAIL for t in same):
            continue
        attrs = {"claim": claim_key(point, len(same))}
        if same:
            attrs["retry_of"] = max(t.number for t in same)
        study.enqueue_trial(point, user_attrs=attrs)
        queued.append(point)
    trials = study.get_trials(deepcopy=False)
    canonical = {t.number for t in _canonical_waiting(trials)}
    for trial in trials:
        if trial.state == TrialState.WAITING and trial.number not in canonical:
            dispose(study, trial._trial_id, f"a second copy of queued claim {trial.user_attrs.get('claim')}")
    return len(canonical)


def claim_queued(study, worker: str):
    """Takes the lowest-numbered runnable queued trial (Optuna's WAITING -> RUNNING compare-and-set, which one
    worker of all wins); None when the queue is empty."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    for trial in _canonical_waiting(study.get_trials(deepcopy=False)):  # all states: a lower copy may be running
        try:
            if not study._storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                continue  # another worker took it
        except UpdateFinishedTrialError:  # disposed meanwhile
            continue
        study._storage.set_trial_system_attr(trial._trial_id, "heartbeat", _beat())
        study._storage.set_trial_user_attr(trial._trial_id, "worker", worker)
        return optuna.Trial(study, trial._trial_id)
    return None


def _held(trials) -> set[str]:
    """The points (as keys) held by trials that were not disposed, in any state: a failed one holds its point
    too (a resume retries it)."""
    return {_point_key(point_of(t)) for t in trials if not is_disposed(t)}


def free_points(trials, spec: SweepSpec) -> list[dict] | None:
    """The points of a finite search space no trial holds; None for an infinite (or very large) space."""
    points = space_points(spec)
    if points is None:
        return None
    held = _held(trials)
    return [point for point in points if _point_key(point) not in held]


def _first_holder(study, spec: SweepSpec, number: int, point: dict, timeout: float = STALE_AFTER_SECONDS):
    """The lowest-numbered trial below `number` that holds `point`, or None. A lower sampled trial still drawing
    its params (alive, params incomplete) is waited for: it may be drawing the same point."""
    from optuna.trial import TrialState

    deadline = time.monotonic() + timeout
    while True:
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        lower = [t for t in trials if t.number < number and not is_disposed(t)]
        holder = next((t.number for t in lower if point_of(t) == point), None)
        drawing = [t for t in lower if t.state == TrialState.RUNNING and not _complete(point_of(t), spec)
                   and not is_dead(t)]
        if holder is not None or not drawing or time.monotonic() > deadline:
            return holder
        time.sleep(0.05)


def _new_trial(study, user_attrs: dict, system_attrs: dict) -> int:
    """Creates a RUNNING trial owned by this process, its heartbeat and attributes written with it (one storage
    operation, so no reader ever sees it without them)."""
    from optuna.trial import TrialState, create_trial

    template = create_trial(state=TrialState.RUNNING, user_attrs=user_attrs,
                            system_attrs={**system_attrs, "heartbeat": _beat()})
    return study._storage.create_new_trial(study._study_id, template_trial=template)


def claim_sampled(study, spec: SweepSpec, worker: str):
    """A new sampled trial, drawn and claimed; None when the study has its n_trials sampled trials or a finite
    space has no untried point left. The i-th sampled trial (by number) runs only if i < n_trials: one created in
    a race past that is disposed. A draw that repeats a lower-numbered trial's point is disposed and replaced by
    a trial that does not count against n_trials, with an untried point of a finite space (chosen at random), or
    a fresh draw of an infinite one."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    free = free_points(trials, spec)
    if sum(_is_sampled(t) for t in trials) >= spec.n_trials or free == []:
        return None
    trial_id, replaces = _new_trial(study, {"worker": worker}, {}), None
    while True:
        number = study._storage.get_trial_number_from_id(trial_id)
        if replaces is None:
            lower = [t for t in study.get_trials(deepcopy=False) if t.number < number and _is_sampled(t)]
            if len(lower) >= spec.n_trials:
                dispose(study, trial_id, f"surplus: {len(lower)} lower-numbered sampled trials fill n_trials")
                return None
        seed = trial_seed(spec.name, number)
        study._storage.set_trial_user_attr(trial_id, "sampler_seed", seed)
        study.sampler = make_sampler(spec.sampler, seed)  # read by Trial() and every suggest below
        trial = optuna.Trial(study, trial_id)
        point = _suggest(trial, spec)
        holder = _first_holder(study, spec, number, point)
        if holder is None:
            return trial
        dispose(study, trial_id, f"duplicate draw of trial {holder}'s params")
        free = free_points(study.get_trials(deepcopy=False), spec)
        if free == []:
            return None
        fixed = {} if free is None else {"fixed_params": random.Random(seed).choice(free)}
        trial_id = _new_trial(study, {"worker": worker, "replaces": number}, fixed)
        replaces = number


def remaining_trials(study, spec: SweepSpec) -> int:
    """Trials still to start: grid points no finished or running trial covers; or queued retries plus the sampled
    trials left of n_trials (at most the untried points of a finite space)."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if not is_disposed(t)]
    if spec.sampler == "grid":
        started = [point_of(t) for t in trials
                   if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)]
        return sum(point not in started for point in spec.grid())
    waiting = len(_canonical_waiting(trials))
    left = max(0, spec.n_trials - sum(_is_sampled(t) for t in trials))
    free = free_points(trials, spec)
    return waiting + (left if free is None else min(left, len(free)))


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
    progress = Progress(counts[TrialState.COMPLETE], counts[TrialState.RUNNING], counts[TrialState.PRUNED],
                        counts[TrialState.FAIL])
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
    with _every(every, lambda: on_progress(read_progress(study)), "bridgectl-sweep-view"):  # a torn read: skipped
        yield
    on_progress(read_progress(study))


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


def _worker(spec_path: str, sweep_dir: str, storage_url: str | None, index: int) -> None:
    """A worker process or cluster job: its own handle on the study, working until nothing is left."""
    spec = load_spec(Path(spec_path))
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


def _run_local(spec_path: Path, sweep_dir: Path, storage_url: str | None, study, spec: SweepSpec,
               workers: int) -> list[Death]:
    """Runs what is left with up to `workers` workers: in this process when one is enough, else as spawned
    processes (fresh interpreters: no forked torch thread pools). Returns the worker processes that died."""
    count = min(workers, remaining_trials(study, spec))
    if count == 0:
        return []
    if count == 1:
        work(study, spec, sweep_dir, worker_name(0))
        return []
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker, args=(str(spec_path), str(sweep_dir), storage_url, index),
                                 name=f"bridgectl-sweep-worker-{index}") for index in range(count)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()  # reaped: a dead worker's pid is gone, so is_dead sees its trial at once
    return [Death(index, process.pid, process.exitcode) for index, process in enumerate(processes)
            if process.exitcode != 0]


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
        return _complete(point_of(gone), spec) and any(covers(trial, gone) for trial in trials)

    return [gone for gone in dead if not retried(gone)]


def run_sweep(spec_path: Path, out: Path, workers: int, storage_url: str | None, on_progress=None,
              launcher: str = "local", launcher_options: dict | None = None, poll_seconds: float = 1.0):
    """Runs the trials still missing; returns the study. Crashing trials are marked failed (with their error in
    their run directory) and the sweep goes on. `launcher`: local (this process, or up to `workers` spawned
    processes) or a submitit executor (slurm, or submitit-local: the same path on this machine) running `workers`
    jobs. Dead workers: trials left running by a process that is gone (found at the start, or a local worker
    process that died) are reported and run again once (a local worker's in one more pass of workers); raises
    DeadWorkers when one was not retried to completion, or a worker of that last pass died too."""
    spec = load_spec(spec_path)
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
                _submit_workers(launcher, launcher_options or {}, spec_path, sweep_dir, storage_url, count)
        else:
            deaths = _run_local(spec_path, sweep_dir, storage_url, study, spec, workers)
            if deaths:  # one more pass: the dead workers' trials run again, with whatever else is left
                lost = _report_deaths(study, deaths)
                dead += lost
                queue_missing(study, spec, only=[point_of(t) for t in lost if _complete(point_of(t), spec)])
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
    sampled = sum(_is_sampled(t) for t in trials)
    if sampled < spec.n_trials and free_points(trials, spec) == []:
        console.print(f"the search space has {len(space_points(spec))} points and every one has a trial: the "
                      f"sweep stops at {sampled} sampled trials of n_trials {spec.n_trials}", markup=False)


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
                    count: int) -> None:
    """One submitit job per worker, each joining the shared study; waits for them all. Ctrl-C cancels the jobs
    (the study stays resumable). A job that dies is reported; its trial is retried on the next resume."""
    executor = make_executor(launcher, sweep_dir / "submitit", options)
    try:
        jobs = [executor.submit(_worker, str(Path(spec_path).resolve()), str(sweep_dir.resolve()), storage_url,
                                index) for index in range(count)]
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
