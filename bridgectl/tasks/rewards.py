"""The training reward: the task's verifier, or a weighted sum of reward functions the user writes.

`task.reward_funcs=[verifier, my_rewards.py:format_reward]` with `task.reward_weights=[1.0, 0.5]` follows TRL's
GRPOTrainer convention (trl/trainer/grpo_trainer.py, `_calculate_rewards`), so a function written for TRL runs here:

    def format_reward(prompts, completions, **kwargs) -> list[float | None]

is called once per step with one entry per completion in each list: `prompts` (the prompt text the model saw, or
for conversational rows the list of messages, system turn included), `completions` (the text, or for
conversational rows `[{"role": "assistant", "content": text}]`), and every other field of the dataset row as a
keyword argument (the built-in arith task: question, answer, trace). TRL's `completion_ids` and `trainer_state`
are not passed. An entry without `:function` is a reward model's directory (tasks/reward_model.py, TRL's model id
in reward_funcs), scored in the same worker. None means "does not apply to this completion": it counts as 0 in the weighted sum, as TRL's
nansum does, and in that function's logged mean (`train/rewards/<name>`) too, where TRL takes a nanmean: so the
weighted sum of the logged means is always train/reward_mean, and every process of a data-parallel run logs the
same keys (a nanmean of nothing would be NaN, or a key missing on one rank). `verifier` names the task's own
check (1.0 for a right final answer); an empty list is the verifier alone, computed exactly as before reward
functions existed, with no train/rewards/ keys. Evaluation always scores with the verifier alone: accuracy is its
verdict. Stages that ask which rollouts are right (relift, hpt, srft) read the verifier's verdicts too
(ScoredRollouts.correct), not the combined reward, which a format reward would make positive.

A function that raises, returns the wrong number of values, a non-number (a string is not parsed), NaN or an
infinity stops the run at once (RewardFunctionError: status failed, the step, the function, and for a bad value the
value and its completion named; the last checkpoint intact). The functions run in a worker process of their own
(RewardWorker: a fresh interpreter started on the first call and reused every step, one message per step): a call
that overruns `task.reward_timeout_s` has the process killed, whatever it runs (a regex that holds the GIL
included), and the run fails naming the function and the limit; nothing a function does (os.chdir, globals)
reaches the trainer. The worker imports each function by the same spec, from the directory the trainer loaded it
from, so the file is imported twice: once here before the run starts (to refuse a bad one with exit 2), once in
the worker.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

from bridgectl.errors import UserError
from bridgectl.tasks.reward_model import RewardModel, is_reward_model_spec

VERIFIER = "verifier"


class RewardFunctionError(Exception):
    """A user's reward function failed during training (raised, hung, or returned the wrong values)."""


@dataclass(frozen=True)
class RewardFunction:
    name: str
    """Its __name__ (`verifier` for the task's own check): the `train/rewards/<name>` metric."""
    weight: float
    """Its weight in the step reward."""
    call: Callable | None
    """The function; None for the task's verifier."""


# ---- loading (before the run starts) --------------------------------------------------------------------------
_loaded: dict[tuple[str, str], Callable] = {}  # (directory, spec) -> function: the CLI's pre-flight and the run
# load each file once


def load_reward_functions(task_cfg) -> list[RewardFunction]:
    """The functions of task.reward_funcs with their weights ([] when none are set: the verifier alone). Raises
    UserError (exit 2) for a module or file that does not load, a missing or uncallable function, a signature that
    cannot take (prompts, completions, **kwargs), or two functions of the same name."""
    specs = list(task_cfg.reward_funcs)
    weights = list(task_cfg.reward_weights) if task_cfg.reward_weights is not None else [1.0] * len(specs)
    functions = []
    for spec, weight in zip(specs, weights):
        function = None if spec == VERIFIER else _load(spec)
        name = VERIFIER if function is None else getattr(function, "__name__", spec.rpartition(":")[2])
        if any(f.name == name for f in functions):
            raise UserError(
                f"task.reward_funcs: two reward functions are named '{name}'",
                "each function's mean is logged as train/rewards/<name>: give them distinct names",
            )
        functions.append(RewardFunction(name, float(weight), function))
    return functions


def _load(spec: str) -> Callable:
    key = (os.getcwd(), spec)  # relative paths and modules are looked up from the current directory
    if key not in _loaded and is_reward_model_spec(spec):  # a model directory: tasks/reward_model.py
        _loaded[key] = RewardModel(spec)
    if key not in _loaded:
        location, _, attribute = spec.rpartition(":")
        module = _load_file(location) if location.endswith(".py") or "/" in location else _import(location)
        function = getattr(module, attribute, None)
        if function is None:
            raise UserError(
                f"reward function '{attribute}' not found in {location}",
                f"{location} defines: {', '.join(n for n in dir(module) if not n.startswith('_'))}",
            )
        if not callable(function):
            raise UserError(
                f"reward function {spec} is a {type(function).__name__}, not a function",
                "name a function: def f(prompts, completions, **kwargs) -> list[float]",
            )
        _check_signature(spec, function)
        _loaded[key] = function
    return _loaded[key]


def _load_file(location: str) -> object:
    path = Path(location).expanduser().resolve()
    if not path.is_file():
        raise UserError(
            f"reward function file {location} does not exist",
            "give path/to/file.py:function (relative to the current directory) or pkg.module:function",
        )
    # a name of its own per file, so two files called rewards.py do not replace each other in sys.modules
    name = f"bridgectl_rewards_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling in the user's file look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise UserError(
            f"could not load reward function file {location}: {type(error).__name__}: {error}",
            "fix the file; it is imported before the run starts",
        ) from None
    return module


def _import(location: str) -> object:
    # the console script's sys.path lacks the current directory, where `python -m` would find my_rewards.py
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(location)
    except Exception as error:
        raise UserError(
            f"could not import reward function module {location}: {type(error).__name__}: {error}",
            "give an importable module (pkg.module:function) or a file (path/to/file.py:function)",
        ) from None
    finally:
        if added:
            sys.path.remove(os.getcwd())


def _check_signature(spec: str, function: Callable) -> None:
    """TRL passes every dataset column as a keyword, so the function needs **kwargs besides prompts/completions."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: let the first call tell
        return
    takes_keywords = any(p.kind is p.VAR_KEYWORD for p in parameters)
    positional_only = [p.name for p in parameters if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if not takes_keywords or positional_only:
        raise UserError(
            f"reward function {spec} cannot be called as f(prompts=..., completions=..., **columns)",
            "define it as def f(prompts, completions, **kwargs) -> list[float | None] (TRL's "
            "convention; every dataset column arrives as a keyword argument)",
        )


# ---- calling (every RL step) ----------------------------------------------------------------------------------
class StepReward:
    """The reward RL trains on: `step_reward(problems, completions)` -> (one reward per completion, each function's
    mean). Functions are loaded on the first call, so evaluation, which scores with the verifier alone, never
    imports them; the user's functions run in a RewardWorker process started on that call too."""

    def __init__(self, task, task_cfg) -> None:
        self.task, self.task_cfg = task, task_cfg
        self._functions: list[RewardFunction] | None = None
        self._worker: RewardWorker | None = None
        self.last_values: list[list[float]] = []
        """Each function's values (None as 0) of the last call, in task.reward_funcs order, weighted by weights()
        (rl.multi_objective_aggregation=normalize_then_sum reads them)."""

    def __call__(self, problems: list, completions: list[str]) -> tuple[list[float], dict[str, float], list[float]]:
        """(the step reward per completion, each function's mean, the verifier's verdict per completion)."""
        golds = [problem.answer for problem in problems]
        if not self.task_cfg.reward_funcs:  # the verifier alone, exactly as before reward functions existed
            verdicts = self.task.rewards(completions, golds)
            self.last_values = [verdicts]
            return verdicts, {}, verdicts
        user = [function for function in self.functions if function.call is not None]
        # every user function of the step in one round trip to the worker (the verifier stays in this process)
        user_values = dict(zip((f.name for f in user), self._call_user(problems, completions))) if user else {}
        total, means, verdicts = [0.0] * len(completions), {}, None
        self.last_values = []
        for function in self.functions:
            values = self.task.rewards(completions, golds) if function.call is None else user_values[function.name]
            values = [v if v is not None else 0.0 for v in values]
            verdicts = values if function.call is None else verdicts
            total = [t + function.weight * v for t, v in zip(total, values)]
            means[function.name] = sum(values) / len(values)
            self.last_values.append(values)
        if verdicts is None:  # the verifier is not among the rewards: still what "right" means
            verdicts = self.task.rewards(completions, golds)
        return total, means, verdicts

    @property
    def functions(self) -> list[RewardFunction]:
        """task.reward_funcs with their weights, loaded on first use (and the worker that will call them)."""
        if self._functions is None:
            try:
                self._functions = load_reward_functions(self.task_cfg)
            except UserError as error:  # checked before the run; changed since: the run fails, it is not bad input
                raise RewardFunctionError(f"{error.message} ({error.hint})") from None
            # the worker loads the same specs from the directory they were loaded from here (relative paths)
            user = [
                (spec, f.name) for spec, f in zip(self.task_cfg.reward_funcs, self._functions) if f.call is not None
            ]
            self._worker = RewardWorker(
                [spec for spec, _ in user], [name for _, name in user], os.getcwd(), self.task_cfg.reward_timeout_s
            )
        return self._functions

    def weights(self) -> list[float]:
        """The weight of each function of last_values, in its order (1.0 for the verifier alone)."""
        return [function.weight for function in self.functions] if self.task_cfg.reward_funcs else [1.0]

    @property
    def worker(self) -> RewardWorker | None:
        """The handle on the process the user's functions run in (None before the first call)."""
        return self._worker

    def _call_user(self, problems: list, completions: list[str]) -> list[list[float | None]]:
        """Every user function's values for the batch, in task.reward_funcs order, from one call to the worker."""
        conversational = [problem.conversation is not None for problem in problems]
        prompts = [p.conversation if chat else p.question for p, chat in zip(problems, conversational)]
        shown = [[{"role": "assistant", "content": c}] if chat else c for c, chat in zip(completions, conversational)]
        columns = {
            key: [problem.columns.get(key) for problem in problems]
            for key in dict.fromkeys(key for problem in problems for key in problem.columns)
        }
        return self._worker.call(dict(columns, prompts=prompts, completions=shown))

    def close(self) -> None:
        """Stops the worker process (a later call starts a new one)."""
        if self._worker is not None:
            self._worker.close()


_STARTUP_S = 60.0  # on top of the call limit: a fresh interpreter that imports the user's files (and what they import)


class RewardWorker:
    """The user's reward functions, run in a process of their own that a call past `limit_s` kills.

    A thread cannot be stopped, and one whose C code holds the GIL (a catastrophic regex) cannot even be abandoned:
    the trainer's own threads, its join and its signal handlers all wait on it. A process can be killed whatever it
    runs, and its os.chdir or global state cannot reach the trainer. One persistent process, started on the first
    call and reused every step (one message each way per function and step), replaced after a timeout or a crash.

    It is a fresh interpreter (`python -c`, given the trainer's sys.path), not a fork: forking the trainer would copy
    torch's thread pools and CUDA state in an unknown state. Not multiprocessing's "spawn" either, which runs the
    trainer's __main__ script again in the child (the CLI's imports, or a user's unguarded script training a second
    time). Its own session: Ctrl-C in the terminal goes to the trainer alone, which decides when to stop."""

    def __init__(self, specs: list[str], names: list[str], directory: str, limit_s: float) -> None:
        self.specs, self.names, self.directory, self.limit_s = specs, names, directory, limit_s
        self._lock = threading.Lock()  # one batch in flight: replies are matched to calls by order
        self._process: subprocess.Popen | None = None
        self._connection: Connection | None = None

    @property
    def pid(self) -> int | None:
        """The running worker's process id (None before the first call, or after a kill)."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def call(self, kwargs: dict) -> list[list[float | None]]:
        """Each function's checked values (checked_values) for one batch: f(**kwargs) for every function, in order,
        all sent in one message. A function that raises, returns bad values, overruns `limit_s` or ends the process
        raises RewardFunctionError naming it; the process is killed (and started again on the next call) unless
        it is still good to use."""
        with self._lock:
            try:
                if self.pid is None:  # the first call, or killed since
                    self._stop()
                    self._start()
                self._connection.send(kwargs)
                return [self._receive(name) for name in self.names]
            except RewardFunctionError:
                raise  # _receive has killed the process when it overran or died; a raising function leaves it ready
            except BaseException:  # a second Ctrl-C or SIGTERM mid-call, an unpicklable column: a reply would go stale
                self._stop()
                raise

    def _receive(self, name: str) -> list[float | None]:
        """The next function's values; its error, an overrun or the process's end raised naming it."""
        if not self._connection.poll(self.limit_s):
            self._stop()  # SIGKILL: no Python code of the call has to cooperate
            raise RewardFunctionError(
                f"reward function {name} did not return within task.reward_timeout_s={self.limit_s:g} s"
            )
        kind, payload = self._reply(name)
        if kind == "error":
            raise RewardFunctionError(payload)  # the worker answers nothing more for this batch
        return payload

    def _reply(self, name: str) -> tuple[str, object]:
        """One message from the worker; a worker that ended (os._exit, a crash) fails the run naming `name`."""
        try:
            return self._connection.recv()
        except (EOFError, OSError):
            try:
                code = self._process.wait(10)
            except subprocess.TimeoutExpired:  # it closed its end and lives on: killed below
                code = None
            self._stop()
            raise RewardFunctionError(
                f"reward function {name} ended the reward worker process (exit code {code})"
            ) from None

    def _start(self) -> None:
        """Starts the process and waits until it has loaded every function (not counted in the call's limit)."""
        ours, theirs = socket.socketpair()  # what multiprocessing.Pipe() is on POSIX
        code = (
            f"import sys; sys.path[:] = {sys.path!r}; from bridgectl.tasks.rewards import _serve; "
            f"_serve({theirs.fileno()}, {os.getpid()})"
        )
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", code],
                cwd=self.directory,
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            theirs.close()
        self._connection = Connection(ours.detach())
        weakref.finalize(self, _kill, self._process)  # a task dropped without close() takes its worker along
        self._connection.send((self.specs, self.names))
        if not self._connection.poll(self.limit_s + _STARTUP_S):
            self._stop()
            raise RewardFunctionError(
                f"the reward worker did not load {', '.join(self.specs)} within {self.limit_s + _STARTUP_S:g} s"
            )
        kind, payload = self._reply(self.names[0])
        if kind == "error":
            self._stop()
            raise RewardFunctionError(payload)

    def _stop(self) -> None:
        """Kills the process, if any, and forgets it."""
        if self._process is not None:
            _kill(self._process)
        if self._connection is not None:
            self._connection.close()
        self._process = self._connection = None

    def close(self) -> None:
        """Kills the process; the next call starts a new one."""
        with self._lock:
            self._stop()


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL and reap: SIGTERM could be caught, or wait behind a call holding the GIL."""
    if process.poll() is None:
        process.kill()
        process.wait(10)


def _serve(fd: int, parent_pid: int) -> None:
    """The worker process (started in the directory the trainer loaded the functions from): loads the specs it is
    sent as the trainer did, says ("ready", pid), then for every batch of keyword arguments answers ("values",
    checked values) per function in order, or one ("error", message) after which it skips the batch's remaining
    functions."""
    _die_with(parent_pid)
    connection = Connection(fd)
    specs, names = connection.recv()
    try:
        functions = [_load(spec) for spec in specs]
        for function in functions:  # a reward model's weights load now, not within the first step's limit
            if isinstance(function, RewardModel):
                function.prepare()
    except UserError as error:
        connection.send(("error", f"{error.message} ({error.hint})"))
        return
    except Exception as error:  # noqa: BLE001 (a reward model that does not load names itself)
        connection.send(
            ("error", f"could not load a reward model of {', '.join(specs)}: {type(error).__name__}: {error}")
        )
        return
    connection.send(("ready", os.getpid()))
    while True:
        try:
            kwargs = connection.recv()
        except EOFError:  # the trainer closed its end, or exited
            return
        for name, function in zip(names, functions):
            try:
                values = checked_values(name, function(**kwargs), len(kwargs["completions"]))
            except RewardFunctionError as error:
                connection.send(("error", str(error)))
                break
            except BaseException as error:  # noqa: BLE001 (whatever it raises, SystemExit too, is reported)
                connection.send(("error", f"reward function {name} raised {type(error).__name__}: {error}"))
                break
            connection.send(("values", values))


def _die_with(parent_pid: int) -> None:
    """Linux: the kernel kills this process when the trainer dies, even mid-call: a call that holds the GIL could
    never read the end of the pipe, and would spin on as an orphan."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the trainer died before the line above took effect
        os._exit(0)


def checked_values(name: str, values, expected: int) -> list[float | None]:
    """One float or None per completion. None means "does not apply" (TRL's convention). A number is a value whose
    type converts with __float__: int, float, bool (True is 1.0, as in TRL's torch.tensor), numpy and 0-d torch
    scalars. A string, list, complex number, NaN or infinity fails at once, naming the function, the value and its
    completion: a string is not parsed, and a NaN or infinity would otherwise surface steps later as a NaN gradient
    norm that names nothing."""
    if isinstance(values, (str, bytes, dict)):  # list() would make characters or keys of them
        raise RewardFunctionError(
            f"reward function {name} returned a {type(values).__name__}, not a list of {expected} values"
        )
    try:
        values = list(values)
    except TypeError:
        raise RewardFunctionError(
            f"reward function {name} returned a {type(values).__name__}, not a list of {expected} values"
        ) from None
    if len(values) != expected:
        raise RewardFunctionError(f"reward function {name} returned {len(values)} values for {expected} completions")
    checked = []
    for index, value in enumerate(values):
        if value is None:
            checked.append(None)
            continue
        try:
            if not hasattr(type(value), "__float__"):  # float("1.0") would parse a string: no conversion but this
                raise TypeError
            number = float(value)
        except OverflowError:  # an int beyond float's range
            number = math.inf
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a torch tensor of several elements
            raise RewardFunctionError(
                f"reward function {name} returned {_shown(value)} for completion {index}, not a number or None"
            ) from None
        if not math.isfinite(number):
            raise RewardFunctionError(
                f"reward function {name} returned {_shown(value)} for completion {index}, "
                "not a finite number (return None where the function does not apply)"
            )
        checked.append(number)
    return checked


def _shown(value) -> str:
    """The value's repr, cut short: an error message is one line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
