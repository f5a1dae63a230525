"""Advantage estimators: how a step's rewards become each completion's advantage (rl.adv_estimator), one function
per estimator, registered by name (as verl's `@register_adv_est`), and group_advantages, which picks one.

Rows are grouped consecutively: rows [k*G, (k+1)*G) are the completions of prompt k. Every std is Bessel-corrected,
as torch.std and TRL; the statistics "of the step" are taken over every data-parallel rank (a collective every
rank must call). The choices themselves are listed torch-free in core/choices.ADV_ESTIMATORS, which config
validation reads; tests/test_loss_registry.py checks that each has a function here.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.distributed as dist

from bridgectl.core import distributed


class AdvantageEstimator(Protocol):
    """An estimator: (rewards [N], group size G, rl.scale_rewards, the completions' lengths [N] or None) ->
    advantages [N]."""

    def __call__(
        self, rewards: torch.Tensor, group_size: int, scale_rewards: str, lengths: torch.Tensor | None
    ) -> torch.Tensor: ...


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}
"""rl.adv_estimator -> its function (filled by register_advantage_estimator)."""


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: registers the function as rl.adv_estimator `name` (a name registered twice is a mistake)."""

    def register(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator '{name}' is registered twice")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return register


def advantage_estimator(name: str) -> AdvantageEstimator:
    """The registered estimator `name`; ValueError naming the choices for any other."""
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown adv_estimator '{name}' (choose from {', '.join(ADVANTAGE_ESTIMATORS)})") from None


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale_rewards: str = "group",
    estimator: str = "grpo",
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """The advantages [N] of `rewards` [N] by rl.adv_estimator `estimator` (see each registered function), scaled
    by rl.scale_rewards `scale_rewards`; `lengths` are the completions' token counts (the REINFORCE++ estimators
    weight each completion by them)."""
    return advantage_estimator(estimator)(rewards, group_size, scale_rewards, lengths)


@register_advantage_estimator("grpo")
def grpo_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: str, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """GRPO's outcome-supervision advantage (DeepSeekMath, arXiv 2402.03300, §4.1.2: A_i = (r_i - mean(r)) /
    std(r) over the group): reward minus its group's mean, divided by the group's std (`scale_rewards=group`), by
    the std of every reward of the step (`batch`, TRL's scale_rewards="batch") or by nothing (`none`, Dr. GRPO,
    arXiv 2503.20783); each std + 1e-4. `lengths` is not read."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    elif scale_rewards == "batch":
        centred = centred / (global_std(rewards) + 1e-4)
    return centred.reshape(-1)


@register_advantage_estimator("rloo")
def rloo_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: str, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """REINFORCE leave-one-out (arXiv 2402.14740, Eq. 6; TRL's RLOOTrainer, verl's rloo): reward minus the mean of
    the other G - 1 rewards of its group, = G / (G - 1) x the centred reward. `scale_rewards=none` keeps it (TRL's
    default), `batch` divides it by the std of the step's advantages (+ 1e-4; TRL's normalize_advantages, their
    mean is 0 by construction); `group` does not apply (config validation refuses it). `lengths` is not read."""
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    advantages = (grouped - baseline).reshape(-1)
    return advantages / (global_std(advantages) + 1e-4) if scale_rewards == "batch" else advantages


@register_advantage_estimator("reinforce_plus_plus")
def reinforce_plus_plus_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: str, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """REINFORCE++ (arXiv 2501.03262, its global advantage normalisation; equation number not checked here; verl's
    reinforce_plus_plus with an outcome reward and gamma 1, so every token's return is its completion's reward):
    the rewards whitened over every completion token of the step, each completion counting its `lengths` tokens
    (token_whitened). The whitening is its batch scaling, so it takes `scale_rewards=batch` (config validation
    refuses the others, which are not read)."""
    return token_whitened(rewards, _needs_lengths(lengths, "reinforce_plus_plus"))


@register_advantage_estimator("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: str, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """REINFORCE++-baseline (arXiv 2501.03262; equation number not checked here; verl's
    reinforce_plus_plus_baseline): the group's mean reward subtracted first, then whitened over the step's tokens
    as reinforce_plus_plus is (`scale_rewards=batch` only, as there)."""
    lengths = _needs_lengths(lengths, "reinforce_plus_plus_baseline")
    grouped = rewards.view(-1, group_size)
    return token_whitened((grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1), lengths)


def _needs_lengths(lengths: torch.Tensor | None, estimator: str) -> torch.Tensor:
    """`lengths`, or ValueError: the token-weighted estimators cannot do without them."""
    if lengths is None:
        raise ValueError(f"adv_estimator={estimator} needs the completions' lengths")
    return lengths


def normalize_then_sum(values: torch.Tensor, weights: torch.Tensor, group_size: int) -> torch.Tensor:
    """TRL's multi_objective_aggregation="normalize_then_sum" (GRPOTrainer, after GDPO): each reward function's
    values [N, K] centred and divided by their group's std (+ 1e-4), summed with `weights` [K], then the sums
    centred and divided by the std of the whole step's sums (over every data-parallel rank): the advantages [N]."""
    grouped = values.view(-1, group_size, values.size(1))
    normalised = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + 1e-4)
    summed = (normalised * weights).sum(dim=2).reshape(-1)
    return (summed - global_mean(summed)) / (global_std(summed) + 1e-4)


def _summed(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every data-parallel rank, in place (itself when not distributed)."""
    if distributed.active():
        dist.all_reduce(tensor)
    return tensor


def token_whitened(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`values` [N] (one per completion, standing for each of its `lengths` tokens) minus their token-weighted mean,
    divided by sqrt(token-weighted variance x n / (n - 1) + 1e-8), n the number of tokens, the statistics taken over
    every data-parallel rank in float64 (verl's masked_whiten of a token-level tensor constant along each row)."""
    flat, weight = values.detach().double(), lengths.detach().double()
    count, total = _summed(torch.stack([weight.sum(), (weight * flat).sum()])).unbind()
    mean = total / count.clamp(min=1)
    squares = _summed((weight * (flat - mean).square()).sum())
    variance = squares / count.clamp(min=1) * count / (count - 1).clamp(min=1)
    return ((flat - mean) / (variance + 1e-8).sqrt()).to(values.dtype)


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` taken together with those of every other data-parallel rank, in float64."""
    flat = values.detach().reshape(-1).double()
    count_total = _summed(torch.stack([flat.new_tensor(flat.numel()), flat.sum()]))
    return (count_total[1] / count_total[0]).to(values.dtype)


def global_std(values: torch.Tensor) -> torch.Tensor:
    """The Bessel-corrected std of `values` taken together with those of every other data-parallel rank (each
    rank's own when not distributed), in two passes (mean, then squared deviations) in float64."""
    flat = values.detach().reshape(-1).double()
    count, total = _summed(torch.stack([flat.new_tensor(flat.numel()), flat.sum()])).unbind()
    squares = _summed((flat - total / count).square().sum())
    return (squares / (count - 1)).sqrt().to(values.dtype)
