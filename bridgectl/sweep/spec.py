"""A sweep spec (`bridgectl sweep SPEC.yaml`, format in sweeps/README.md): reading and checking its YAML (types
first, then values, then one composed example config), the `bridgectl run` overrides of each trial, and its search
space: the points of a finite one, and the params a trial draws from it."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from bridgectl.config.compose import compose
from bridgectl.errors import UserError

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "hyperband")
PARAM_TYPES = ("float", "int", "categorical")
PARAM_KEYS = ("type", "low", "high", "log", "choices", "values")
SPEC_KEYS = ("name", "base", "seeds", "objective", "sampler", "n_trials", "pruner", "params", "nproc", "nnodes")
ENUMERABLE_POINTS = 10_000
"""A finite search space up to this many points is enumerated, so a duplicate draw is replaced by an untried point."""


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
    nproc: int = 1
    """Data-parallel processes per run (per node): above 1 each seed of a trial runs under torchrun (`bridgectl
    run --nproc`)."""
    nnodes: int = 1
    """Machines per run: above 1 each seed of a trial is a cluster job of that many torchrun nodes (`bridgectl run
    --launcher slurm --nnodes`), submitted by workers that run where the sweep command runs."""
    run_jobs: tuple | None = None
    """Not in the YAML: (launcher, submitit options) each seed's job is submitted with, when nnodes > 1."""

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
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        type(None): "empty",
    }
    return names.get(type(value), type(value).__name__)


def check_types(raw: dict) -> None:
    """Every field of a sweep spec has the YAML type the format says (sweeps/README.md); a wrong one is bad input
    named with its field, before any value is read."""

    def need(ok: bool, field: str, wanted: str, example: str) -> None:
        """Raises the error for `field` (dotted for nested ones) unless `ok`."""
        if not ok:
            value = raw_value(field)
            raise UserError(
                f"sweep spec field '{field}' must be {wanted}, got {_kind(value)} ({value!r})", f"e.g. {example}"
            )

    def raw_value(field: str):
        """The raw value of a dotted field, or None."""
        value = raw
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    fields = {
        "name": (str, "a string", "name: my_sweep"),
        "sampler": (str, "a string", "sampler: tpe"),
        "pruner": (str, "a string", "pruner: median"),
    }
    for field, (kind, wanted, example) in fields.items():
        need(raw.get(field) is None or isinstance(raw[field], kind), field, wanted, example)
    need(
        raw.get("base") is None or (isinstance(raw["base"], list) and all(isinstance(b, str) for b in raw["base"])),
        "base",
        "a list of overrides",
        "base: [recipe=bridge, task=arith]",
    )
    need(
        raw.get("seeds") is None or (isinstance(raw["seeds"], list) and all(_is_int(s) for s in raw["seeds"])),
        "seeds",
        "a list of integers",
        "seeds: [0, 1, 2]",
    )
    need(raw.get("n_trials") is None or _is_int(raw["n_trials"]), "n_trials", "an integer", "n_trials: 12")
    need(raw.get("nproc") is None or _is_int(raw["nproc"]), "nproc", "an integer", "nproc: 2")
    need(raw.get("nnodes") is None or _is_int(raw["nnodes"]), "nnodes", "an integer", "nnodes: 2")
    objective = raw.get("objective")
    need(
        objective is None or isinstance(objective, dict),
        "objective",
        "a mapping",
        "objective: {metric: eval/test/accuracy, direction: maximize}",
    )
    if isinstance(objective, dict):
        unknown = sorted(set(objective) - {"metric", "direction"})
        if unknown:
            raise UserError(
                f"unknown key(s) in objective: {', '.join(map(str, unknown))}", "keys are: direction, metric"
            )
        for field in ("metric", "direction"):
            need(
                objective.get(field) is None or isinstance(objective[field], str),
                f"objective.{field}",
                "a string",
                "objective: {metric: eval/test/accuracy, direction: maximize}",
            )
    params = raw.get("params")
    need(
        params is None or isinstance(params, dict),
        "params",
        "a mapping of config keys",
        "params: {bridge.lam: {type: float, low: 0.1, high: 0.9}}",
    )
    for key, param in (params or {}).items():
        if not isinstance(param, dict):
            raise UserError(
                f"param '{key}' must be a mapping, got {_kind(param)} ({param!r})",
                "e.g. {type: float, low: 0.1, high: 0.9} or {type: categorical, choices: [4, 8]}",
            )
        unknown = sorted(set(param) - set(PARAM_KEYS))
        if unknown:
            raise UserError(
                f"param '{key}' has unknown key(s): {', '.join(map(str, unknown))}",
                f"keys are: {', '.join(PARAM_KEYS)}",
            )
        for field in ("choices", "values"):
            if field in param and not (isinstance(param[field], list) and param[field]):
                raise UserError(
                    f"param '{key}': {field} must be a non-empty list, got {_kind(param[field])} ({param[field]!r})",
                    f"e.g. {field}: [4, 8, 16]",
                )
        integer = param.get("type") == "int"
        for field in ("low", "high"):
            if field in param and not (_is_int if integer else _is_number)(param[field]):
                raise UserError(
                    f"param '{key}': {field} must be {'an integer' if integer else 'a number'}, got "
                    f"{_kind(param[field])} ({param[field]!r})",
                    "e.g. {type: float, low: 0.1, high: 0.9}",
                )
        if "log" in param and not isinstance(param["log"], bool):
            raise UserError(f"param '{key}': log must be true or false, got {_kind(param['log'])}", "e.g. log: true")


def load_spec(path: Path, nproc: int | None = None, nnodes: int | None = None) -> SweepSpec:
    """Reads and checks a sweep spec: types first, then values, then one composed example config. `nproc` and
    `nnodes` (the command's --nproc, --nnodes) replace the spec's."""
    if not path.is_file():
        raise UserError(f"sweep spec {path} does not exist", "give a YAML file like sweeps/quick.yaml")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as error:  # yaml's own errors: any unreadable file is bad input
        raise UserError(
            f"sweep spec {path} is not valid YAML: {str(error).splitlines()[0]}", "check its indentation"
        ) from None
    if not isinstance(raw, dict):
        raise UserError(f"sweep spec {path} is not a mapping", "see sweeps/README.md for the format")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise UserError(
            f"unknown key(s) in sweep spec: {', '.join(map(str, unknown))}", f"keys are: {', '.join(sorted(SPEC_KEYS))}"
        )
    check_types(raw)
    objective = raw.get("objective") or {}
    spec = SweepSpec(
        name=str(raw.get("name") or path.stem),
        base=list(raw.get("base") or []),
        seeds=list(raw.get("seeds") or [0]),
        metric=objective.get("metric", "eval/test/accuracy"),
        direction=objective.get("direction", "maximize"),
        sampler=raw.get("sampler", "tpe"),
        n_trials=raw.get("n_trials", 10),
        pruner=raw.get("pruner", "none"),
        params=raw.get("params") or {},
        nproc=nproc if nproc is not None else raw.get("nproc", 1),
        nnodes=nnodes if nnodes is not None else raw.get("nnodes", 1),
    )
    checks = [
        (spec.sampler in SAMPLERS, f"unknown sampler '{spec.sampler}'", f"choose one of: {', '.join(SAMPLERS)}"),
        (spec.pruner in PRUNERS, f"unknown pruner '{spec.pruner}'", f"choose one of: {', '.join(PRUNERS)}"),
        (spec.direction in ("maximize", "minimize"), f"unknown direction '{spec.direction}'", "maximize or minimize"),
        (spec.n_trials > 0, f"n_trials must be positive, got {spec.n_trials}", "e.g. n_trials: 12"),
        (spec.nproc > 0, f"nproc must be at least 1, got {spec.nproc}", "e.g. nproc: 2 (or --nproc 2)"),
        (spec.nnodes > 0, f"nnodes must be at least 1, got {spec.nnodes}", "e.g. nnodes: 2 (or --nnodes 2)"),
        (
            spec.metric.startswith("eval/") and spec.metric.endswith("/accuracy"),
            f"unsupported objective metric '{spec.metric}'",
            "use a final eval metric, e.g. eval/test/accuracy or eval/ood/accuracy",
        ),
    ]
    for ok, message, hint in checks:
        if not ok:
            raise UserError(message, hint)
    if not spec.params and spec.sampler != "grid":
        raise UserError(
            f"sampler {spec.sampler} has no params to search",
            "add params, or use sampler: grid to run the base config over seeds",
        )
    for key, param in spec.params.items():
        kind = param.get("type") if isinstance(param, dict) else None
        if kind not in PARAM_TYPES:
            raise UserError(f"param '{key}' needs a type", f"type is one of: {', '.join(PARAM_TYPES)}")
        if kind == "categorical" and not param.get("choices"):
            raise UserError(f"categorical param '{key}' has no choices", "e.g. choices: [4, 8, 16]")
        if kind != "categorical" and not ({"low", "high"} <= set(param) or param.get("values")):
            raise UserError(
                f"param '{key}' needs low and high (or values for a grid)", "e.g. {type: float, low: 0.1, high: 0.9}"
            )
        if {"low", "high"} <= set(param) and not param["low"] < param["high"]:
            raise UserError(f"param '{key}': low {param['low']} is not below high {param['high']}", "swap them")
        if param.get("log") and {"low", "high"} <= set(param) and param["low"] <= 0:
            raise UserError(f"param '{key}': a log scale needs low > 0, got {param['low']}", "e.g. low: 1.0e-5")
        if spec.sampler == "grid" and kind != "categorical" and not param.get("values"):
            raise UserError(f"grid sampler: param '{key}' needs a list of values", "e.g. values: [0.3, 0.5, 0.7]")
    # Every key and value must compose exactly as `bridgectl run` would: check one example of each param.
    example = {k: (p.get("choices") or p.get("values") or [p["low"]])[0] for k, p in spec.params.items()}
    cfg = compose(trial_overrides(spec, example, spec.seeds[0]))
    from bridgectl.core.distributed import check_batch_split
    from bridgectl.tasks import task_eval_splits

    check_batch_split(cfg, spec.nproc * spec.nnodes)  # a batch that does not split: before any trial
    splits = task_eval_splits(cfg.task)
    if spec.metric.split("/")[1] not in splits:
        raise UserError(
            f"objective metric {spec.metric} is never logged by task {cfg.task.name}",
            f"its eval splits are: {', '.join(splits)} (e.g. eval/{splits[0]}/accuracy)",
        )
    return spec


def trial_overrides(spec: SweepSpec, params: dict, seed: int) -> list[str]:
    """The `bridgectl run` overrides of one seed of one trial."""
    return [*spec.base, *(f"{key}={value}" for key, value in params.items()), f"seed={seed}"]


def suggest_params(trial, spec: SweepSpec) -> dict:
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
    for param in spec.params.values():
        if param["type"] == "categorical" or spec.sampler == "grid":
            axes.append(param.get("choices") or param.get("values"))
        elif param["type"] == "int":
            axes.append(range(int(param["low"]), int(param["high"]) + 1))
        else:
            return None
    if math.prod(len(axis) for axis in axes) > limit:
        return None
    return [dict(zip(spec.params, combo)) for combo in itertools.product(*axes)]
