"""The training reward: the task's verifier, or a weighted sum of reward functions the user writes.

`task.reward_funcs=[verifier, my_rewards.py:format_reward]` with `task.reward_weights=[1.0, 0.5]` follows TRL's
GRPOTrainer convention (trl/trainer/grpo_trainer.py, `_calculate_rewards`), so a function written for TRL runs here:

    def format_reward(prompts, completions, **kwargs) -> list[float | None]

is called once per step with one entry per completion in each list: `prompts` (the prompt text the model saw, or
for conversational rows the list of messages, system turn included), `completions` (the text, or for
conversational rows `[{"role": "assistant", "content": text}]`), and every other field of the dataset row as a
keyword argument (the built-in arith task: question, answer, trace). TRL's `completion_ids` and `trainer_state`
are not passed. None means "does not apply to this completion": it counts as 0 in the weighted sum, as TRL's
nansum does, and in that function's logged mean (`train/rewards/<name>`) too, where TRL takes a nanmean: so the
weighted sum of the logged means is always train/reward_mean, and every process of a data-parallel run logs the
same keys (a nanmean of nothing would be NaN, or a key missing on one rank). `verifier` names the task's own
check (1.0 for a right final answer); an empty list is the verifier alone, computed exactly as before reward
functions existed, with no train/rewards/ keys. Evaluation always scores with the verifier alone: accuracy is its
verdict. Stages that ask which rollouts are right (relift, hpt, srft) read the verifier's verdicts too
(ScoredRollouts.correct), not the combined reward, which a format reward would make positive.

A function that raises, returns the wrong number of values or a non-number stops the run (RewardFunctionError:
status failed, the step and the function named, the last checkpoint intact). Each call runs in a worker thread
joined with a time limit (`task.reward_timeout_s`): Python cannot stop a thread, so a call that overruns is
abandoned (a daemon thread, which never holds up the process's exit) and the run fails naming the function and
the limit.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bridgectl.errors import UserError

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
            raise UserError(f"task.reward_funcs: two reward functions are named '{name}'",
                            "each function's mean is logged as train/rewards/<name>: give them distinct names")
        functions.append(RewardFunction(name, float(weight), function))
    return functions


def _load(spec: str) -> Callable:
    key = (os.getcwd(), spec)  # relative paths and modules are looked up from the current directory
    if key not in _loaded:
        location, _, attribute = spec.rpartition(":")
        module = _load_file(location) if location.endswith(".py") or "/" in location else _import(location)
        function = getattr(module, attribute, None)
        if function is None:
            raise UserError(f"reward function '{attribute}' not found in {location}",
                            f"{location} defines: {', '.join(n for n in dir(module) if not n.startswith('_'))}")
        if not callable(function):
            raise UserError(f"reward function {spec} is a {type(function).__name__}, not a function",
                            "name a function: def f(prompts, completions, **kwargs) -> list[float]")
        _check_signature(spec, function)
        _loaded[key] = function
    return _loaded[key]


def _load_file(location: str) -> object:
    path = Path(location).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"reward function file {location} does not exist",
                        "give path/to/file.py:function (relative to the current directory) or pkg.module:function")
    # a name of its own per file, so two files called rewards.py do not replace each other in sys.modules
    name = f"bridgectl_rewards_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling in the user's file look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise UserError(f"could not load reward function file {location}: {type(error).__name__}: {error}",
                        "fix the file; it is imported before the run starts") from None
    return module


def _import(location: str) -> object:
    # the console script's sys.path lacks the current directory, where `python -m` would find my_rewards.py
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(location)
    except Exception as error:
        raise UserError(f"could not import reward function module {location}: {type(error).__name__}: {error}",
                        "give an importable module (pkg.module:function) or a file (path/to/file.py:function)"
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
        raise UserError(f"reward function {spec} cannot be called as f(prompts=..., completions=..., **columns)",
                        "define it as def f(prompts, completions, **kwargs) -> list[float | None] (TRL's "
                        "convention; every dataset column arrives as a keyword argument)")


# ---- calling (every RL step) ----------------------------------------------------------------------------------
class StepReward:
    """The reward RL trains on: `step_reward(problems, completions)` -> (one reward per completion, each function's
    mean). Functions are loaded on the first call, so evaluation, which scores with the verifier alone, never
    imports them."""

    def __init__(self, task, task_cfg) -> None:
        self.task, self.task_cfg = task, task_cfg
        self._functions: list[RewardFunction] | None = None

    def __call__(self, problems: list, completions: list[str]) -> tuple[list[float], dict[str, float], list[float]]:
        """(the step reward per completion, each function's mean, the verifier's verdict per completion)."""
        golds = [problem.answer for problem in problems]
        if not self.task_cfg.reward_funcs:  # the verifier alone, exactly as before reward functions existed
            verdicts = self.task.rewards(completions, golds)
            return verdicts, {}, verdicts
        total, means, verdicts = [0.0] * len(completions), {}, None
        for function in self.functions:
            values = (self.task.rewards(completions, golds) if function.call is None
                      else self._call_user(function, problems, completions))
            values = [v if v is not None else 0.0 for v in values]
            verdicts = values if function.call is None else verdicts
            total = [t + function.weight * v for t, v in zip(total, values)]
            means[function.name] = sum(values) / len(values)
        if verdicts is None:  # the verifier is not among the rewards: still what "right" means
            verdicts = self.task.rewards(completions, golds)
        return total, means, verdicts

    @property
    def functions(self) -> list[RewardFunction]:
        if self._functions is None:
            try:
                self._functions = load_reward_functions(self.task_cfg)
            except UserError as error:  # checked before the run; changed since: the run fails, it is not bad input
                raise RewardFunctionError(f"{error.message} ({error.hint})") from None
        return self._functions

    def _call_user(self, function: RewardFunction, problems: list, completions: list[str]) -> list[float | None]:
        conversational = [problem.conversation is not None for problem in problems]
        prompts = [p.conversation if chat else p.question for p, chat in zip(problems, conversational)]
        shown = [[{"role": "assistant", "content": c}] if chat else c for c, chat in zip(completions, conversational)]
        columns = {key: [problem.columns.get(key) for problem in problems]
                   for key in dict.fromkeys(key for problem in problems for key in problem.columns)}
        values = call_with_time_limit(function, self.task_cfg.reward_timeout_s,
                                      dict(columns, prompts=prompts, completions=shown))
        return checked_values(function.name, values, len(completions))


def call_with_time_limit(function: RewardFunction, limit_s: float, kwargs: dict):
    """function.call(**kwargs) in a daemon thread joined for `limit_s` seconds. Its exception, or an overrun, is
    raised here as RewardFunctionError; an overrunning call keeps running, abandoned (see the module docstring)."""
    outcome = {}

    def target() -> None:
        try:
            outcome["values"] = function.call(**kwargs)
        except BaseException as error:  # noqa: BLE001: whatever it raises is reported with its name
            outcome["error"] = error

    worker = threading.Thread(target=target, name=f"reward-{function.name}", daemon=True)
    worker.start()
    worker.join(limit_s)
    if worker.is_alive():
        raise RewardFunctionError(f"reward function {function.name} did not return within task.reward_timeout_s="
                                  f"{limit_s:g} s")
    if "error" in outcome:
        error = outcome["error"]
        raise RewardFunctionError(f"reward function {function.name} raised {type(error).__name__}: {error}")
    return outcome["values"]


def checked_values(name: str, values, expected: int) -> list[float | None]:
    """One float or None per completion (NaN is None, as in TRL, which turns None into NaN); anything else fails."""
    try:
        values = list(values)
    except TypeError:
        raise RewardFunctionError(f"reward function {name} returned a {type(values).__name__}, not a list of "
                                  f"{expected} values") from None
    if len(values) != expected:
        raise RewardFunctionError(f"reward function {name} returned {len(values)} values for {expected} completions")
    checked = []
    for value in values:
        if value is None:
            checked.append(None)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RewardFunctionError(f"reward function {name} returned {value!r}, not a number or None") from None
        checked.append(None if math.isnan(number) else number)
    return checked
