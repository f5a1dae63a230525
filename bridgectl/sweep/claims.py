"""Claims of a sweep (`bridgectl sweep`): which trial runs where, decided through the Optuna storage alone.

Every worker takes work through the storage alone, so no two workers of any process run the same thing.
The storage numbers trials atomically in one order every process agrees on, and a process that has created trial
n sees every trial numbered below n: so "the lowest-numbered trial wins" decides every race without a lock.
- Queued trials (grid points, retries): enqueued WAITING with a claim key (params and how many times the point had
  failed); the lowest-numbered trial with a key is its only runnable copy (a copy enqueued in a race is disposed),
  taken by Optuna's compare-and-set WAITING -> RUNNING, which exactly one worker wins.
- Sampled trials (random, tpe): the i-th sampled trial of the study runs only if i < n_trials; its sampler is
  seeded from the study name and its trial number; a draw that repeats a lower-numbered trial's params is
  replaced. Trials that lose a race end FAIL with the system attribute `bridgectl:disposed` saying why.
- Dead workers: a running trial records a heartbeat (host, pid, time) in its system attributes; a trial whose
  process is gone (its pid, on this machine; a stale heartbeat, from another) is marked failed, and its point is
  queued again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import socket
import threading
import time

from bridgectl.sweep.spec import SweepSpec, space_points, suggest_params

HEARTBEAT_SECONDS = 15.0
"""How often a running trial records that its process is alive (a system attribute in the study)."""
STALE_AFTER_SECONDS = 120.0
"""A running trial of another machine whose heartbeat is older than this is taken for dead on resume."""
DISPOSED = "bridgectl:disposed"
"""System attribute of a trial that never ran because it lost a claim (duplicate, surplus): why."""


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


def point_of(trial) -> dict:
    """The params a trial runs with: its fixed params when it was queued, else what its sampler drew so far."""
    fixed = trial.system_attrs.get("fixed_params")
    return dict(fixed) if fixed is not None else dict(trial.params)


def is_complete(point: dict, spec: SweepSpec) -> bool:
    """Whether a point has a value for every param (a sampled trial has none until it has drawn)."""
    return set(point) == set(spec.params)


def is_disposed(trial) -> bool:
    """Whether a trial lost a claim and never ran (a queue copy, a trial past n_trials, a repeated draw)."""
    return DISPOSED in trial.system_attrs


def is_sampled(trial) -> bool:
    """Created to be drawn by the sampler (not a queued point, not the replacement of a duplicate draw): each such
    trial takes one of the spec's n_trials."""
    return (
        "fixed_params" not in trial.system_attrs
        and "claim" not in trial.user_attrs
        and "replaces" not in trial.user_attrs
    )


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

    return [
        t
        for t in sorted(trials, key=lambda t: t.number)
        if t.state == TrialState.WAITING and first[t.user_attrs.get("claim", f"#{t.number}")] == t.number
    ]


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
        wanted = [point_of(t) for t in trials if t.state == TrialState.FAIL and is_complete(point_of(t), spec)]
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
        drawing = [
            t for t in lower if t.state == TrialState.RUNNING and not is_complete(point_of(t), spec) and not is_dead(t)
        ]
        if holder is not None or not drawing or time.monotonic() > deadline:
            return holder
        time.sleep(0.05)


def _new_trial(study, user_attrs: dict, system_attrs: dict) -> int:
    """Creates a RUNNING trial owned by this process, its heartbeat and attributes written with it (one storage
    operation, so no reader ever sees it without them)."""
    from optuna.trial import TrialState, create_trial

    template = create_trial(
        state=TrialState.RUNNING, user_attrs=user_attrs, system_attrs={**system_attrs, "heartbeat": _beat()}
    )
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
    if sum(is_sampled(t) for t in trials) >= spec.n_trials or free == []:
        return None
    trial_id, replaces = _new_trial(study, {"worker": worker}, {}), None
    while True:
        number = study._storage.get_trial_number_from_id(trial_id)
        if replaces is None:
            lower = [t for t in study.get_trials(deepcopy=False) if t.number < number and is_sampled(t)]
            if len(lower) >= spec.n_trials:
                dispose(study, trial_id, f"surplus: {len(lower)} lower-numbered sampled trials fill n_trials")
                return None
        seed = trial_seed(spec.name, number)
        study._storage.set_trial_user_attr(trial_id, "sampler_seed", seed)
        study.sampler = make_sampler(spec.sampler, seed)  # read by Trial() and every suggest below
        trial = optuna.Trial(study, trial_id)
        point = suggest_params(trial, spec)
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
        started = [
            point_of(t) for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        ]
        return sum(point not in started for point in spec.grid())
    waiting = len(_canonical_waiting(trials))
    left = max(0, spec.n_trials - sum(is_sampled(t) for t in trials))
    free = free_points(trials, spec)
    return waiting + (left if free is None else min(left, len(free)))


@contextlib.contextmanager
def heartbeat(storage, trial_id: int, interval: float = HEARTBEAT_SECONDS):
    """Records {host, pid, time} in the trial's system attributes now and every `interval` seconds until the
    block ends, from a daemon thread (Optuna's own heartbeat exists for RDB storage only; this one works with
    the journal file too)."""

    def beat() -> None:
        storage.set_trial_system_attr(
            trial_id, "heartbeat", {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        )

    beat()
    with run_every(interval, beat, "bridgectl-heartbeat"):  # a missed beat only makes the trial look older
        yield


@contextlib.contextmanager
def run_every(seconds: float, action, name: str):
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
