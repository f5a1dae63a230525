"""A run's compute: the counters the runner keeps (steps, tokens, FLOPs; core/flops.py counts each step's passes),
what they put in metrics.jsonl, and budgets in compute (`train.budget_flops`, `train.budget_tokens`) that end a run
at equal compute whatever its recipe costs per update.

metrics.jsonl, every step row: `compute/flops` (the step's sampling and training FLOPs, over every process),
`compute/gen_tokens` (tokens sampled, dropped groups of dynamic sampling included), `compute/pass_tokens` (tokens
that received a gradient, once per forward+backward pass they went through); and the run's totals so far,
`compute/cum_flops` and `compute/cum_tokens` (generated + pass tokens: train.budget_tokens' unit), which the init
and final rows carry too (`bridgectl compare --at-flops / --at-tokens` reads them at each evaluation).

A budget is split between the recipe's stages as its steps are (`recipe.fractions` or `recipe.steps`): a stage
ends after the step that brings the run's total to the end of its share (stage_targets), so every recipe stops
within one step's compute of the budget. `train.max_steps` stays the most steps a stage may take and the horizon
of the schedules that depend on it (optim.schedule=cosine, chord's mu, uft's hints, a ramp of BRIDGE's lambda):
set it at or above the steps the cheapest recipe takes at the budget. `train.eval_every_compute` evaluates each
time the total passes another multiple of it, so learning curves are sampled at equal compute.
"""

from __future__ import annotations

from omegaconf import DictConfig


def new_counters() -> dict:
    """A fresh run's counters (saved in every checkpoint, so a resumed run goes on counting; summary.json
    records them). `rl_steps`: the steps that logged rollout/no_signal, `no_signal_steps`: those of them without a
    learning signal (the runner counts both; a checkpoint from before they existed leaves them at 0)."""
    return {
        "steps": 0,
        "train_tokens": 0,
        "gen_tokens": 0,
        "pass_tokens": 0,
        "flops": 0,
        "rl_steps": 0,
        "no_signal_steps": 0,
    }


def budget_unit(cfg: DictConfig) -> str | None:
    """flops or tokens: the unit of the run's compute budget; None without one."""
    if cfg.train.budget_flops is not None:
        return "flops"
    if cfg.train.budget_tokens is not None:
        return "tokens"
    return None


def budget_value(cfg: DictConfig) -> float:
    """The size of the run's compute budget in its unit (budget_unit; a run without one has none to ask for)."""
    return float(cfg.train.budget_flops if budget_unit(cfg) == "flops" else cfg.train.budget_tokens)


def spent(cfg: DictConfig, counters: dict) -> float:
    """The run's total so far in its budget's unit (FLOPs by default)."""
    if budget_unit(cfg) == "tokens":
        return float(counters["gen_tokens"] + counters["pass_tokens"])
    return float(counters["flops"])


def stage_targets(cfg: DictConfig, budgets: list[int]) -> list[float] | None:
    """The run's total at which each stage ends: the budget split in proportion to the stages' steps and
    accumulated (the last stage's is the whole budget, so the run ends within one step of it whatever the
    earlier stages overran); None without a budget."""
    if budget_unit(cfg) is None:
        return None
    total = budget_value(cfg)
    return [total * sum(budgets[: index + 1]) / sum(budgets) for index in range(len(budgets))]


def count_step(cfg: DictConfig, counters: dict, output, ledger) -> dict:
    """Adds one step (its StepOutput and core/flops Ledger, this process's) to the counters, summed over every
    process; returns the step's compute metrics."""
    from bridgectl.core import distributed

    train_tokens, gen_tokens, pass_tokens, step_flops = distributed.total(
        output.train_tokens, output.gen_tokens, ledger.pass_tokens, int(ledger.flops)
    )
    counters["train_tokens"] += train_tokens
    counters["gen_tokens"] += gen_tokens
    counters["pass_tokens"] += pass_tokens
    counters["flops"] += step_flops
    return {
        "compute/flops": step_flops,
        "compute/gen_tokens": gen_tokens,
        "compute/pass_tokens": pass_tokens,
        **cumulative_metrics(counters),
    }


def cumulative_metrics(counters: dict) -> dict:
    """The run's totals so far, as every metrics row that can hold an evaluation carries them."""
    return {
        "compute/cum_flops": counters["flops"],
        "compute/cum_tokens": counters["gen_tokens"] + counters["pass_tokens"],
    }


def eval_due(cfg: DictConfig, step: int, before: float, after: float) -> bool:
    """Whether step `step` evaluates: every train.eval_every steps, or with train.eval_every_compute each time
    the total (`before` -> `after` this step, in the budget's unit) passes a multiple of it."""
    every = cfg.train.eval_every_compute
    if every is not None:
        return int(after // every) > int(before // every)
    return cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0


def budget_summary(cfg: DictConfig, counters: dict) -> dict:
    """summary.json's record of the budget: its unit, size and what was spent (nothing without one)."""
    unit = budget_unit(cfg)
    if unit is None:
        return {}
    value, used = budget_value(cfg), spent(cfg, counters)
    return {"budget": {"unit": unit, "value": value, "spent": used, "reached": used >= value}}


def unspent_warning(cfg: DictConfig, counters: dict) -> str | None:
    """What to tell the user when train.max_steps ended a budgeted run before its budget was spent (then it is
    not at equal compute with runs that spent theirs); None otherwise."""
    unit = budget_unit(cfg)
    if unit is None:
        return None
    value, used = budget_value(cfg), spent(cfg, counters)
    if used >= value:
        return None
    return (
        f"Warning: train.max_steps={cfg.train.max_steps} ended the run at {used:.3g} of its {value:.3g} "
        f"{unit} budget ({100 * used / value:.0f}%); raise train.max_steps for a run at the full budget"
    )
