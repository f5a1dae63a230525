"""The GRPO policy loss: one function per rl.loss_type, registered by name (as verl's `@register_policy_loss`),
and grpo_loss, which runs the chosen one and adds what every loss type shares.

A registered loss gives each completion token its policy term (and where a clip acted on it) from PolicyTerms; its
registration names how those terms are reduced to one number (loss_token_weights / loss_denominator). grpo_loss
then applies, whatever the loss type: the off-policy mask, the top-entropy token mask, the rollout correction's
ratio, the k3 KL to the reference, the reduction, and the entropy bonus. Conventions follow TRL's GRPOTrainer
(1.16): the names, the defaults and the statistics it logs. The choices themselves are listed torch-free in
core/choices.LOSS_TYPES, which config validation reads; tests/test_loss_registry.py checks each has a function here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from bridgectl.core import distributed


@dataclass
class GRPOStats:
    clip_fraction: float
    """Share of the loss's tokens whose ratio the clip (or CISPO's weight cap) acted on, a token mean."""
    kl: float
    """The k3 KL term's token mean (0 without rl.beta)."""
    entropy: float = 0.0
    """Mean entropy of the policy over the loss's tokens (train/entropy), when the loss was given them."""
    skipped: bool = False
    """The passes were left out (core/grpo.skips_backward: no advantage, so no gradient): the other fields were not
    measured, and rollout_metrics logs none of them."""


@dataclass(frozen=True)
class PolicyLossOptions:
    """The GRPO variants beyond the clipped surrogate's own settings, under TRL 1.16's names (GRPOConfig)."""

    importance_sampling_level: str = "token"
    """token: one ratio per token (GRPO); sequence: exp(mean log-ratio over the completion's tokens) for every token
    of it (GSPO, arXiv 2507.18071)."""
    delta: float | None = None
    """Two-sided clipping: the unclipped ratio is also capped at delta (arXiv 2505.22617 uses ~1 + 2 epsilon)."""
    entropy_coef: float = 0.0
    """An entropy bonus: the loss minus entropy_coef x the mean entropy of the tokens the loss trains on."""
    sapo_temperature_pos: float = 1.0
    """SAPO's gate temperature for positive advantages (loss_type sapo, arXiv 2511.20347)."""
    sapo_temperature_neg: float = 1.05
    """SAPO's gate temperature for negative advantages."""
    vespo_k_pos: float = 2.0
    """VESPO's power k for non-negative advantages (loss_type vespo, arXiv 2602.10693)."""
    vespo_lambda_pos: float = 3.0
    """VESPO's decay lambda for non-negative advantages."""
    vespo_k_neg: float = 3.0
    """VESPO's power k for negative advantages."""
    vespo_lambda_neg: float = 2.0
    """VESPO's decay lambda for negative advantages."""
    off_policy_mask_threshold: float | None = None
    """DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556, Eq. 9): a completion with a negative advantage
    whose mean per-token KL from the policy that sampled it to the current one exceeds this is left out; None: off."""


@dataclass(frozen=True)
class PolicyTerms:
    """What a policy loss reads, for a batch of N completions of C token positions."""

    logprobs: torch.Tensor
    """[N, C] log pi of each sampled token under the policy being trained (with its gradient)."""
    token_log_ratio: torch.Tensor
    """[N, C] log pi - log pi_old per token (pi_old: the sampling policy, detached)."""
    ratio: torch.Tensor
    """The importance ratio pi / pi_old: [N, C] per token, or [N, 1] per completion (GSPO's sequence level)."""
    advantage: torch.Tensor
    """[N, 1] each completion's advantage."""
    mask: torch.Tensor
    """[N, C] float, 1 on the tokens the loss counts."""
    epsilon: float
    """The clip's lower width: the ratio is clipped at 1 - epsilon."""
    epsilon_high: float
    """The clip's upper width (1 + epsilon_high; DAPO's Clip-Higher), CISPO's weight cap."""
    options: PolicyLossOptions
    """The variants (delta, SAPO's temperatures, VESPO's k and lambda)."""
    rollout_ratio: torch.Tensor | None
    """The rollout correction's ratio (rollout_correction), for the losses whose own weight takes it (vespo)."""


PolicyLossFn = Callable[[PolicyTerms], tuple[torch.Tensor, torch.Tensor]]
"""A policy loss: its per-token terms [N, C] (or broadcastable) and where a clip acted (bool, same shape)."""


@dataclass(frozen=True)
class PolicyLoss:
    """A registered rl.loss_type."""

    fn: PolicyLossFn
    """Its per-token policy terms."""
    reduction: str
    """How they become the loss (loss_token_weights, loss_denominator): dapo, bnpo, grpo, dr_grpo or luspo."""
    own_rollout_ratio: bool = False
    """Its terms take the rollout correction's ratio in themselves (vespo's weight), so grpo_loss does not
    multiply them by it."""


POLICY_LOSSES: dict[str, PolicyLoss] = {}
"""rl.loss_type -> its loss (filled by register_policy_loss)."""

REDUCTIONS = ("dapo", "bnpo", "grpo", "dr_grpo", "luspo")
"""The ways token terms are reduced (loss_denominator)."""


def register_policy_loss(
    name: str, reduction: str, own_rollout_ratio: bool = False
) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: registers the function as rl.loss_type `name`, its terms reduced by `reduction`."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction '{reduction}' for loss_type {name} (choose from {', '.join(REDUCTIONS)})")

    def register(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"loss_type '{name}' is registered twice")
        POLICY_LOSSES[name] = PolicyLoss(fn, reduction, own_rollout_ratio)
        return fn

    return register


def policy_loss(loss_type: str) -> PolicyLoss:
    """The registered loss `loss_type`; ValueError naming the choices for any other."""
    try:
        return POLICY_LOSSES[loss_type]
    except KeyError:
        raise ValueError(f"unknown loss_type '{loss_type}' (choose from {', '.join(POLICY_LOSSES)})") from None


# ---- the loss types ----------------------------------------------------------------------------------------------
def clipped_surrogate(terms: PolicyTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate -min(r A, clip(r, 1 - eps, 1 + eps_high) A) per token (arXiv 1707.06347, Eq. 7),
    with DAPO's decoupled upper width eps_high ("Clip-Higher", arXiv 2503.14476, §3.1) and, with options.delta,
    the unclipped term's ratio also capped at delta (two-sided clipping, arXiv 2505.22617). Clipped: a ratio below
    1 - eps with A < 0, or above 1 + eps_high with A > 0 (where the clip stops the gradient)."""
    ratio, advantage, epsilon, epsilon_high = terms.ratio, terms.advantage, terms.epsilon, terms.epsilon_high
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * advantage
    capped = ratio if terms.options.delta is None else torch.clamp(ratio, max=terms.options.delta)
    per_token = -torch.min(capped * advantage, clipped)
    was_clipped = ((ratio < 1 - epsilon) & (advantage < 0)) | ((ratio > 1 + epsilon_high) & (advantage > 0))
    return per_token, was_clipped


@register_policy_loss("dapo", reduction="dapo")
def dapo_loss(terms: PolicyTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """DAPO's token-level policy gradient loss (arXiv 2503.14476, §3.3 and its objective in §3; equation numbers not
    checked here; TRL's default loss_type since v0.22): the clipped surrogate summed over every completion token of
    the step and divided by their number, so a long completion weighs by its length (no per-sequence averaging)."""
    return clipped_surrogate(terms)


@register_policy_loss("bnpo", reduction="bnpo")
def bnpo_loss(terms: PolicyTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's loss_type="bnpo" (a reduction of TRL's, no paper equation): the clipped surrogate summed and divided by
    this process's own tokens ("the local batch"), not the step's over every process; = dapo in one process."""
    return clipped_surrogate(terms)


@register_policy_loss("grpo", reduction="grpo")
def grpo_sequence_mean_loss(terms: PolicyTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's objective (DeepSeekMath, arXiv 2402.03300, Eq. 3): the clipped surrogate averaged over each
    completion's tokens (1 / |o_i|), then over the completions (1 / G)."""
    return clipped_surrogate(terms)


@register_policy_loss("dr_grpo", reduction="dr_grpo")
def dr_grpo_loss(terms: PolicyTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr. GRPO (arXiv 2503.20783, its Dr. GRPO objective; section and equation number not checked here): the clipped
    surrogate summed and divided by a constant, the completions times rl.max_completion_length, so that no
    completion's length changes another's weight (GRPO's 1 / |o_i| length bias removed)."""
    return clipped_surrogate(terms)


@register_policy_loss("luspo", reduction="luspo")
def luspo_loss(terms: PolicyTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """LUSPO (arXiv 2602.05261; equation number not checked here): the clipped surrogate summed over each
    completion's tokens, then averaged over the completions (the mean of per-completion sums)."""
    return clipped_surrogate(terms)


@register_policy_loss("cispo", reduction="dapo")
def cispo_loss(terms: PolicyTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1, arXiv 2506.13585, Eq. 4): -sg(min(r, eps_high)) A log pi per token: the importance weight
    is capped and detached, never the gradient of log pi; reduced as dapo. Clipped: where the cap acted on a
    positive advantage."""
    ratio, advantage = terms.ratio, terms.advantage
    per_token = -torch.clamp(ratio, max=terms.epsilon_high).detach() * advantage * terms.logprobs
    return per_token, (ratio > terms.epsilon_high) & (advantage > 0)


@register_policy_loss("sapo", reduction="grpo")
def sapo_loss(terms: PolicyTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """SAPO (arXiv 2511.20347; equation number not checked here; TRL 1.16's sapo): a soft gate in place of the
    clip, -A (4 / tau) sigmoid(tau (r - 1)), tau options.sapo_temperature_pos for A > 0 and _neg otherwise; reduced
    as grpo. Nothing is clipped."""
    ratio, advantage, options = terms.ratio, terms.advantage, terms.options
    temperature = torch.where(advantage > 0, options.sapo_temperature_pos, options.sapo_temperature_neg)
    per_token = -torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature * advantage
    return per_token, torch.zeros_like(ratio, dtype=torch.bool)


@register_policy_loss("vespo", reduction="dapo", own_rollout_ratio=True)
def vespo_loss(terms: PolicyTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """VESPO (arXiv 2602.10693; equation number not checked here; TRL 1.16's vespo): -phi(w) A log pi per token,
    phi the sequence's detached weight (vespo_weights, which takes the rollout correction's ratio in); reduced as
    dapo. Nothing is clipped."""
    phi = vespo_weights(terms.advantage, terms.token_log_ratio.detach(), terms.mask, terms.rollout_ratio, terms.options)
    per_token = -phi * terms.advantage * terms.logprobs
    return per_token, torch.zeros_like(terms.ratio, dtype=torch.bool)


def vespo_weights(
    advantage: torch.Tensor,
    token_log_ratio: torch.Tensor,
    mask: torch.Tensor,
    rollout_ratio: torch.Tensor | None,
    options: PolicyLossOptions,
) -> torch.Tensor:
    """[N, 1] VESPO's weight (arXiv 2602.10693; TRL 1.16's get_gamma_weights) of each completion, detached:
    phi(w) = exp(lambda) w^k exp(-lambda w) (so phi(1) = 1), with w the sequence's importance ratio
    exp(sum of its clamped token log-ratios, times the rollout correction's token ratios when given), k and lambda by
    the advantage's sign (vespo_k/lambda_pos for A >= 0, _neg below), log w clamped to [log 1e-8, 20]."""
    lowest = math.log(1e-8)
    log_w = (token_log_ratio.clamp(-20.0, 20.0) * mask).sum(dim=1, keepdim=True)
    if rollout_ratio is not None:
        log_w = log_w + rollout_ratio.log().clamp(lowest, 20.0).sum(dim=1, keepdim=True)
    log_w = log_w.clamp(lowest, 20.0)
    non_negative = advantage >= 0
    k = torch.where(non_negative, options.vespo_k_pos, options.vespo_k_neg)
    decay = torch.where(non_negative, options.vespo_lambda_pos, options.vespo_lambda_neg).clamp(min=1e-4)
    phi = torch.exp(decay + k * log_w - decay * log_w.exp())
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


# ---- what every loss type shares ---------------------------------------------------------------------------------
def reduction_of(loss_type: str) -> str:
    """How `loss_type`'s token terms are reduced: dapo, bnpo, grpo, dr_grpo or luspo (cispo and vespo as dapo,
    sapo as grpo, as TRL)."""
    return policy_loss(loss_type).reduction


def rank_local(loss_type: str) -> bool:
    """Whether `loss_type` divides by this process's own token count (bnpo: "the local batch", TRL), not the whole
    step's over the processes (every other token-count reduction)."""
    return reduction_of(loss_type) == "bnpo"


def loss_token_weights(mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Each completion token's weight in the loss's numerator, before the division by `loss_denominator`: 1 for
    `dapo`, `bnpo`, `dr_grpo` and `luspo` (a sum per sequence), 1 / (its completion's scored tokens) for `grpo` (a
    mean per sequence); 0 off the mask. `loss_type`: a reduction (reduction_of)."""
    mask = mask.float()
    if loss_type == "grpo":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return mask


def loss_denominator(
    loss_type: str, n_tokens: torch.Tensor, n_sequences: torch.Tensor | None, max_completion_length: int | None
) -> torch.Tensor:
    """What the weighted token sum is divided by: the step's scored tokens (`dapo`; `bnpo`: this process's own),
    its completions (`grpo`: the mean of the per-sequence means; `luspo`: the mean of the per-sequence sums) or its
    completions times rl.max_completion_length (`dr_grpo`, a constant, so no completion's length changes another's
    weight). As in TRL, the completion count includes completions whose tokens mask_truncated_completions has
    masked out (they add 0 to the numerator). `loss_type`: a reduction (reduction_of)."""
    if loss_type in ("dapo", "bnpo"):
        return n_tokens.clamp(min=1)
    if n_sequences is None:
        raise ValueError(f"loss_type={loss_type} needs the number of completions")
    if loss_type in ("grpo", "luspo"):
        return n_sequences.clamp(min=1)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type=dr_grpo needs max_completion_length")
        return n_sequences.clamp(min=1) * max_completion_length
    raise ValueError(f"unknown reduction '{loss_type}' (choose from {', '.join(REDUCTIONS)})")


def policy_terms(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
    epsilon_high: float | None,
    options: PolicyLossOptions,
    rollout_ratio: torch.Tensor | None,
) -> PolicyTerms:
    """The PolicyTerms of a batch: the ratio r = pi / pi_old per token, or with options.importance_sampling_level
    "sequence" GSPO's exp(mean log-ratio over the completion's tokens) (arXiv 2507.18071, Eq. 7) for all its tokens;
    eps_high defaults to `epsilon`. `mask` as a float."""
    mask = mask.float()
    token_log_ratio = logprobs - old_logprobs
    log_ratio = token_log_ratio
    if options.importance_sampling_level == "sequence":
        log_ratio = (log_ratio * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return PolicyTerms(
        logprobs=logprobs,
        token_log_ratio=token_log_ratio,
        ratio=torch.exp(log_ratio),
        advantage=advantages.unsqueeze(1),
        mask=mask,
        epsilon=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        options=options,
        rollout_ratio=rollout_ratio,
    )


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    n_tokens: torch.Tensor | None = None,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    n_sequences: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    bias_correction_kl: bool = False,
    options: PolicyLossOptions = PolicyLossOptions(),
    entropies: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
    n_entropy_tokens: torch.Tensor | None = None,
    rollout_ratio: torch.Tensor | None = None,
    behaviour_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GRPOStats]:
    """The policy loss `loss_type` (a registered function: its per-token terms, over the tokens of `mask`) with
    what every loss type shares, as TRL 1.16's GRPOTrainer._compute_loss:
      - `behaviour_logprobs` (an inference engine's; default `old_logprobs`, the sampling policy's, detached):
        options.off_policy_mask_threshold's off-policy mask (off_policy_mask) drops the far-off completions of
        negative advantage;
      - `entropy_mask` [N, C] keeps only those tokens in the policy term (rl.top_entropy_quantile: the step's
        highest-entropy tokens, arXiv 2506.01939);
      - `rollout_ratio` (rollout_correction's, [N, C] or [N, 1]) multiplies each token's policy term (a loss whose
        own weight takes it, vespo, excepted), correcting for an engine that sampled from slightly other
        probabilities;
      - beta * KL(pi || pi_ref) by the k3 estimator exp(ref - logp) - (ref - logp) - 1 on `ref_logprobs`;
        `bias_correction_kl` multiplies each token's k3 term by the (unclipped, undetached) ratio r, as TRL's
        use_bias_correction_kl (its default since TRL 1.x), so the estimate is unbiased for tokens sampled from
        pi_old; the logged KL is the corrected term, as TRL logs it;
      - the reduction of the loss type (loss_token_weights / loss_denominator) by `n_tokens`, `n_sequences` and
        `max_completion_length`: the counts default to the batch's own (under data parallelism the global batch's
        over the number of ranks); a micro-batch passes its whole step's, so its loss and statistics add up to the
        step's;
      - `entropies` [N, C] (with grad for options.entropy_coef): the entropy bonus, minus entropy_coef x their mean
        over the tokens trained on (`n_entropy_tokens` in the whole step, default this batch's), and the logged
        mean entropy.
    The statistics (clip fraction, KL) are token means whatever the loss type, as TRL logs them. Raises ValueError
    for a loss_type that is not registered."""
    policy = policy_loss(loss_type)
    terms = policy_terms(logprobs, old_logprobs, advantages, mask, epsilon, epsilon_high, options, rollout_ratio)
    mask = terms.mask
    per_token, was_clipped = policy.fn(terms)
    if options.off_policy_mask_threshold is not None:
        behaviour = old_logprobs if behaviour_logprobs is None else behaviour_logprobs
        per_token = per_token * off_policy_mask(
            terms.advantage, logprobs.detach(), behaviour, mask, options.off_policy_mask_threshold
        )
    if entropy_mask is not None:
        per_token = per_token * entropy_mask.float()
    if rollout_ratio is not None and not policy.own_rollout_ratio:
        per_token = per_token * rollout_ratio
    if n_tokens is None:
        n_tokens = mask.sum() if policy.reduction == "bnpo" else distributed.mean_denominator(mask.sum())
    if n_sequences is None and policy.reduction not in ("dapo", "bnpo"):
        n_sequences = distributed.mean_denominator(torch.tensor(float(mask.size(0)), device=mask.device))
    n_tokens = n_tokens.clamp(min=1)
    kl_value = 0.0
    if beta > 0:
        per_token_kl = kl_k3(ref_logprobs, logprobs, terms.ratio if bias_correction_kl else None)
        per_token = per_token + beta * per_token_kl
        kl_value = float((per_token_kl.detach() * mask).sum() / n_tokens)
    denominator = loss_denominator(policy.reduction, n_tokens, n_sequences, max_completion_length)
    loss = (per_token * loss_token_weights(mask, policy.reduction)).sum() / denominator
    entropy_value = 0.0
    if entropies is not None:
        entropy_value = float((entropies.detach() * mask).sum() / n_tokens)
        if options.entropy_coef:
            trained = mask if entropy_mask is None else mask * entropy_mask.float()
            count = distributed.mean_denominator(trained.sum()) if n_entropy_tokens is None else n_entropy_tokens
            loss = loss - options.entropy_coef * (entropies * trained).sum() / count.clamp(min=1)
    clip_fraction = float((was_clipped.float() * mask).sum() / n_tokens)
    return loss, GRPOStats(clip_fraction=clip_fraction, kl=kl_value, entropy=entropy_value)


def kl_k3(ref_logprobs: torch.Tensor | None, logprobs: torch.Tensor, ratio: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) (DeepSeekMath, arXiv 2402.03300, Eq. 4): exp(ref - logp) - (ref -
    logp) - 1, times `ratio` when given (TRL's use_bias_correction_kl)."""
    if ref_logprobs is None:
        raise ValueError("beta > 0 needs reference log-probs")
    ref_log_ratio = ref_logprobs - logprobs
    per_token_kl = torch.exp(ref_log_ratio) - ref_log_ratio - 1
    return per_token_kl if ratio is None else per_token_kl * ratio


def off_policy_mask(
    advantage: torch.Tensor,
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """[N, 1] 1.0 for the completions the policy term keeps, as TRL 1.16's get_off_policy_mask: those with a
    non-negative advantage, and the others whose mean over their tokens of (behaviour log-prob - current log-prob)
    (the KL from the sampling policy to the current one, estimated on the sampled tokens; DeepSeek-V3.2, arXiv
    2512.02556, Eq. 9) is at most `threshold`. A NaN behaviour log-prob (a token the engine did not score) adds
    nothing."""
    gap = torch.nan_to_num(behaviour_logprobs - logprobs, nan=0.0)
    mean_gap = (gap * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return ((advantage >= 0) | (mean_gap <= threshold)).to(mask.dtype)


@torch.no_grad()
def rollout_correction(
    trainer_logprobs: torch.Tensor,
    engine_logprobs: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    clip_min: float | None,
    clip_max: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The importance ratio pi_trainer / pi_engine that corrects for an inference engine (vLLM) sampling from
    probabilities its kernels compute slightly differently from the trained model's (TRL 1.16's
    vllm_importance_sampling_correction; "truncated" and "masked" importance sampling, Yao et al. 2025): per token
    (`token_*`, [N, C]) or per completion (`sequence_*`: exp of the summed log-ratio, [N, 1]); `*_truncate` clamps
    it to [clip_min, clip_max], `*_mask` sets it to 0 outside that range (None: unbounded on that side). A NaN
    engine log-prob counts as no difference. Returns the ratio and where the bounds acted (same shape), from which
    the share of tokens or completions clipped or masked is logged."""
    gap = torch.nan_to_num((trainer_logprobs - engine_logprobs) * mask, nan=0.0)
    if mode.startswith("sequence"):
        gap = gap.sum(dim=1, keepdim=True)
    ratio = torch.exp(gap)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    acted = (ratio < low) | (ratio > high)
    if mode.endswith("truncate"):
        ratio = ratio.clamp(min=low, max=high)
    else:
        ratio = ratio.masked_fill(acted, 0.0)
    return ratio, acted
