"""Losses shared by every stage: SFT negative log-likelihood and the GRPO policy loss.

Conventions follow TRL's GRPOTrainer so its users feel at home: group- or batch-normalised advantages
(`scale_rewards`), a clipped importance ratio with `epsilon` and `epsilon_high`, the k3 KL estimator weighted by
`beta`, and TRL's `loss_type`s: by default token-level averaging over all completion tokens of the batch (`dapo`,
TRL's default since v0.22), which avoids the length bias of per-sequence averaging (`grpo`), or Dr. GRPO's fixed
normaliser (`dr_grpo`, arXiv 2503.20783).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bridgectl.core import distributed
from bridgectl.core.choices import LOSS_TYPES
from bridgectl.core.logprobs import micro_batches, token_logprobs


@dataclass
class SFTBatch:
    input_ids: torch.Tensor  # [B, T] right-padded `<s>question=completion</s>`
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T] completion tokens, -100 on the prompt and padding

    @property
    def n_tokens(self) -> int:
        return int((self.labels[:, 1:] != -100).sum())

    def rows(self, rows: list[int]) -> "SFTBatch":
        """The examples of `rows`, cut to their own longest row."""
        index = torch.tensor(rows, device=self.input_ids.device)
        width = int(self.attention_mask[index].sum(dim=1).max())
        return SFTBatch(self.input_ids[index, :width], self.attention_mask[index, :width], self.labels[index, :width])


def make_sft_batch(tokenizer, prompts: list[str], completions: list[str], device,
                   end_id: int | None = None) -> SFTBatch:
    """Tokenises (prompt, completion) pairs; the loss will see only the completion and its end token: `end_id`
    (the policy's `end_tokens.target`: the chat template's turn end when prompts use it, so the model learns to
    close its turn as the template does and sampling stops there), by default the tokenizer's EOS."""
    end_id = tokenizer.eos_token_id if end_id is None else end_id
    rows, labels = [], []
    for prompt, completion in zip(prompts, completions):
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [end_id]
        rows.append(prompt_ids + completion_ids)
        labels.append([-100] * len(prompt_ids) + completion_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels], device=device)
    return SFTBatch(input_ids, attention_mask, label_ids)


def sft_loss(model, batch: SFTBatch, n_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Negative log-likelihood of the completion tokens, -log pi(trace, answer | question), summed and divided by
    `n_tokens`: by default the batch's own labelled tokens (under data parallelism the global batch's over the
    number of ranks, distributed.mean_denominator, so averaged gradients equal the full-batch gradient); a
    micro-batch passes its whole step's count."""
    scored = batch.labels[:, 1:] != -100
    if n_tokens is None:
        n_tokens = distributed.mean_denominator(scored.sum())
    logprobs = token_logprobs(model, batch.input_ids, batch.attention_mask, 1, scored)
    return -logprobs.sum() / n_tokens.clamp(min=1)


def phi_sft_loss(model, batch: SFTBatch, n_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """CHORD-phi's token-weighted NLL (arXiv 2508.11408): -sum_t phi_t log p_t over the completion tokens, divided by
    `n_tokens` as in sft_loss, with phi_t = p_t (1 - p_t) and p_t the model's probability of the target token. phi is
    detached (a weight, not differentiated) and the divisor stays the token count, not the sum of the weights, as
    in the authors' Trinity-RFT (SFTPhiLossFn: masked_mean(-logprob * phi.detach()))."""
    scored = batch.labels[:, 1:] != -100
    if n_tokens is None:
        n_tokens = distributed.mean_denominator(scored.sum())
    logprobs = token_logprobs(model, batch.input_ids, batch.attention_mask, 1, scored)
    probs = logprobs.detach().exp()
    phi = probs * (1 - probs) * scored  # unscored positions hold log p = 0 (p = 1, phi = 0) and are masked anyway
    return -(phi * logprobs).sum() / n_tokens.clamp(min=1)


def sft_backward(model, batch: SFTBatch, micro_batch_size: int, scale: float = 1.0, loss_fn=sft_loss) -> float:
    """Accumulates the gradient of `scale * loss_fn(model, batch)` (sft_loss, or phi_sft_loss) into the parameters'
    `.grad`, in micro-batches of `micro_batch_size` rows (0: one pass); returns the loss. Equal to one pass to float
    rounding."""
    n_tokens = distributed.mean_denominator((batch.labels[:, 1:] != -100).sum())
    total = torch.zeros((), device=batch.input_ids.device)
    for rows in micro_batches(batch.attention_mask.sum(dim=1).tolist(), micro_batch_size):
        loss = loss_fn(model, batch.rows(rows), n_tokens)
        backward(scale * loss)
        total += loss.detach()
    return float(total)


def backward(loss: torch.Tensor) -> None:
    """loss.backward(), skipped for a loss no parameter contributed to (a micro-batch without scored tokens)."""
    if loss.requires_grad:
        loss.backward()


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group",
                     estimator: str = "grpo", lengths: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO advantages: reward minus its group's mean, divided by the group's std (`scale_rewards=group`), by the std
    of every reward of the step (`batch`, TRL's scale_rewards="batch": over all data-parallel ranks, so a collective
    every rank must call) or by nothing (`none`). Rows are grouped consecutively: rows [k*G, (k+1)*G) are the
    completions of prompt k. Both stds are Bessel-corrected, as torch.std and TRL.

    `estimator=rloo`: REINFORCE leave-one-out (arXiv 2402.14740; TRL's RLOOTrainer, verl's rloo): reward minus the
    mean of the other G - 1 rewards of its group, = G / (G - 1) x the centred reward; `scale_rewards=none` keeps it
    (TRL's default), `batch` divides it by the std of the step's advantages over every rank (TRL's
    normalize_advantages; their mean is 0 by construction). `group` does not apply (config validation refuses it).

    `estimator=reinforce_plus_plus` (arXiv 2501.03262; verl's reinforce_plus_plus with an outcome reward and
    gamma 1, so every token's return is its completion's reward): the rewards whitened over every completion token
    of the step (all ranks), each completion counting its `lengths` tokens: (R - mean) / sqrt(var + 1e-8) with the
    token-weighted mean and Bessel-corrected variance (verl's masked_whiten). `reinforce_plus_plus_baseline`
    (verl's): the group's mean subtracted first, then whitened the same way. Their whitening is their batch
    scaling, so they take `scale_rewards=batch` (config validation refuses the others)."""
    grouped = rewards.view(-1, group_size)
    if estimator in ("reinforce_plus_plus", "reinforce_plus_plus_baseline"):
        if lengths is None:
            raise ValueError(f"adv_estimator={estimator} needs the completions' lengths")
        returns = rewards if estimator == "reinforce_plus_plus" else (
            grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
        return token_whitened(returns, lengths)
    if estimator == "rloo":
        baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
        advantages = (grouped - baseline).reshape(-1)
        return advantages / (global_std(advantages) + 1e-4) if scale_rewards == "batch" else advantages
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    elif scale_rewards == "batch":
        centred = centred / (global_std(rewards) + 1e-4)
    return centred.reshape(-1)


def normalize_then_sum(values: torch.Tensor, weights: torch.Tensor, group_size: int) -> torch.Tensor:
    """TRL's multi_objective_aggregation="normalize_then_sum" (GRPOTrainer, after GDPO): each reward function's
    values [N, K] centred and divided by their group's std (+ 1e-4), summed with `weights` [K], then the sums
    centred and divided by the std of the whole step's sums (over every data-parallel rank): the advantages [N]."""
    grouped = values.view(-1, group_size, values.size(1))
    normalised = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + 1e-4)
    summed = (normalised * weights).sum(dim=2).reshape(-1)
    return (summed - global_mean(summed)) / (global_std(summed) + 1e-4)


def token_whitened(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`values` [N] (one per completion, standing for each of its `lengths` tokens) minus their token-weighted mean,
    divided by sqrt(token-weighted variance x n / (n - 1) + 1e-8), n the number of tokens, the statistics taken over
    every data-parallel rank in float64 (verl's masked_whiten of a token-level tensor constant along each row)."""
    flat, weight = values.detach().double(), lengths.detach().double()

    def summed(tensor: torch.Tensor) -> torch.Tensor:
        if distributed.active():
            dist.all_reduce(tensor)
        return tensor

    count, total = summed(torch.stack([weight.sum(), (weight * flat).sum()])).unbind()
    mean = total / count.clamp(min=1)
    squares = summed((weight * (flat - mean).square()).sum())
    variance = squares / count.clamp(min=1) * count / (count - 1).clamp(min=1)
    return ((flat - mean) / (variance + 1e-8).sqrt()).to(values.dtype)


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` taken together with those of every other data-parallel rank, in float64."""
    flat = values.detach().reshape(-1).double()
    count_total = torch.stack([flat.new_tensor(flat.numel()), flat.sum()])
    if distributed.active():
        dist.all_reduce(count_total)
    return (count_total[1] / count_total[0]).to(values.dtype)


def global_std(values: torch.Tensor) -> torch.Tensor:
    """The Bessel-corrected std of `values` taken together with those of every other data-parallel rank (each
    rank's own when not distributed), in two passes (mean, then squared deviations) in float64."""
    def summed(tensor: torch.Tensor) -> torch.Tensor:
        if distributed.active():
            dist.all_reduce(tensor)
        return tensor

    flat = values.detach().reshape(-1).double()
    count, total = summed(torch.stack([flat.new_tensor(flat.numel()), flat.sum()])).unbind()
    squares = summed((flat - total / count).square().sum())
    return (squares / (count - 1)).sqrt().to(values.dtype)


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


def reduction_of(loss_type: str) -> str:
    """How `loss_type`'s token losses are reduced: dapo, bnpo, grpo, dr_grpo or luspo (cispo and vespo as dapo,
    sapo as grpo, as TRL)."""
    return {"cispo": "dapo", "vespo": "dapo", "sapo": "grpo"}.get(loss_type, loss_type)


def rank_local(loss_type: str) -> bool:
    """Whether `loss_type` divides by this process's own token count (bnpo: "the local batch", TRL), not the whole
    step's over the processes (every other token-count reduction)."""
    return reduction_of(loss_type) == "bnpo"


def loss_token_weights(mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Each completion token's weight in the loss's numerator, before the division by `loss_denominator`: 1 for
    `dapo`, `bnpo`, `dr_grpo` and `luspo` (a sum per sequence), 1 / (its completion's scored tokens) for `grpo` (a
    mean per sequence); 0 off the mask."""
    mask = mask.float()
    if loss_type == "grpo":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return mask


def loss_denominator(loss_type: str, n_tokens: torch.Tensor, n_sequences: torch.Tensor | None,
                     max_completion_length: int | None) -> torch.Tensor:
    """What the weighted token sum is divided by: the step's scored tokens (`dapo`; `bnpo`: this process's own),
    its completions (`grpo`: the mean of the per-sequence means; `luspo`: the mean of the per-sequence sums, arXiv
    2602.05261) or its completions times rl.max_completion_length (`dr_grpo`, a constant, so no completion's
    length changes another's weight). As in TRL, the completion count includes completions whose tokens
    mask_truncated_completions has masked out (they add 0 to the numerator)."""
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
    raise ValueError(f"unknown loss_type '{loss_type}' (choose from {', '.join(LOSS_TYPES)})")


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon: float, beta: float = 0.0, ref_logprobs: torch.Tensor | None = None,
              n_tokens: torch.Tensor | None = None, epsilon_high: float | None = None, loss_type: str = "dapo",
              n_sequences: torch.Tensor | None = None, max_completion_length: int | None = None,
              bias_correction_kl: bool = False, options: PolicyLossOptions = PolicyLossOptions(),
              entropies: torch.Tensor | None = None, entropy_mask: torch.Tensor | None = None,
              n_entropy_tokens: torch.Tensor | None = None, rollout_ratio: torch.Tensor | None = None,
              behaviour_logprobs: torch.Tensor | None = None) -> tuple[torch.Tensor, GRPOStats]:
    """Clipped surrogate  -min(r A, clip(r, 1-eps, 1+eps_high) A)  with r = pi / pi_old per token (eps_high =
    `epsilon_high`, default `epsilon`: DAPO's asymmetric "Clip-Higher", arXiv 2503.14476), plus
    beta * KL(pi || pi_ref) with the k3 estimator exp(ref - logp) - (ref - logp) - 1, over the tokens of `mask`,
    reduced by `loss_type` (loss_token_weights / loss_denominator): `dapo` divides the sum by `n_tokens`, `grpo`
    averages each completion then divides by `n_sequences`, `dr_grpo` divides the sum by `n_sequences` x
    `max_completion_length`. The counts default to the batch's own (under data parallelism the global batch's over
    the number of ranks); a micro-batch passes its whole step's, so its loss and statistics add up to the step's.
    The statistics (clip fraction, KL) are token means whatever the loss type, as TRL logs them. `old_logprobs` are
    the sampling policy's (detached). `bias_correction_kl` multiplies each token's k3 term by the (unclipped,
    undetached) importance ratio r, as TRL's `use_bias_correction_kl` does (its default since TRL 1.x,
    grpo_trainer.py: `per_token_kl = per_token_kl * coef_1`): the k3 estimate is then unbiased for tokens sampled
    from pi_old rather than pi; the logged KL is the corrected term, as TRL logs it.

    The variants of `options`, as TRL 1.16's GRPOTrainer._compute_loss computes them: r per sequence (GSPO: the
    exponentiated mean log-ratio of the completion, for all its tokens), the two-sided cap min(r, delta) on the
    unclipped term, and the other policy losses: `cispo` (MiniMax-M1, arXiv 2506.13585: -sg(min(r, eps_high)) A
    log pi, the weight clipped and never the gradient; reduced as dapo), `sapo` (-A (4 / tau) sigmoid(tau (r - 1)),
    tau by the advantage's sign; reduced as grpo) and `vespo` (-phi(w) A log pi with phi detached, vespo_weights;
    reduced as dapo); `bnpo` and `luspo` are the clipped surrogate reduced over this process's tokens and as a mean
    of per-completion sums. `entropy_mask` [N, C] keeps only those tokens in the policy term
    (rl.top_entropy_quantile: the step's highest-entropy tokens, arXiv 2506.01939); `entropies` [N, C] (with grad
    for options.entropy_coef) give the entropy bonus, the mean over the tokens trained on (`n_entropy_tokens` in the
    whole step, default this batch's), and the logged mean entropy. `rollout_ratio` (rollout_correction's, [N, C]
    or [N, 1]) multiplies each token's policy term (vespo: enters its weight instead), correcting for an inference
    engine that sampled from slightly other probabilities; `behaviour_logprobs` are that engine's log-probs
    (default `old_logprobs`), from which options.off_policy_mask_threshold measures how far off-policy a
    completion is (off_policy_mask)."""
    mask = mask.float()
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    token_log_ratio = logprobs - old_logprobs
    log_ratio = token_log_ratio
    if options.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1))
    ratio = torch.exp(log_ratio)
    advantage = advantages.unsqueeze(1)
    if loss_type == "vespo":
        phi = vespo_weights(advantage, token_log_ratio.detach(), mask, rollout_ratio, options)
        per_token = -phi * advantage * logprobs
        was_clipped = torch.zeros_like(ratio, dtype=torch.bool)
    elif loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=epsilon_high).detach() * advantage * logprobs
        was_clipped = (ratio > epsilon_high) & (advantage > 0)
    elif loss_type == "sapo":
        temperature = torch.where(advantage > 0, options.sapo_temperature_pos, options.sapo_temperature_neg)
        per_token = -torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature * advantage
        was_clipped = torch.zeros_like(ratio, dtype=torch.bool)
    else:
        clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * advantage
        capped = ratio if options.delta is None else torch.clamp(ratio, max=options.delta)
        per_token = -torch.min(capped * advantage, clipped)
        was_clipped = ((ratio < 1 - epsilon) & (advantage < 0)) | ((ratio > 1 + epsilon_high) & (advantage > 0))
    if options.off_policy_mask_threshold is not None:
        behaviour = old_logprobs if behaviour_logprobs is None else behaviour_logprobs
        per_token = per_token * off_policy_mask(advantage, logprobs.detach(), behaviour, mask,
                                                options.off_policy_mask_threshold)
    if entropy_mask is not None:
        per_token = per_token * entropy_mask.float()
    if rollout_ratio is not None and loss_type != "vespo":
        per_token = per_token * rollout_ratio
    if n_tokens is None:
        n_tokens = mask.sum() if rank_local(loss_type) else distributed.mean_denominator(mask.sum())
    reduction = reduction_of(loss_type)
    if n_sequences is None and reduction not in ("dapo", "bnpo"):
        n_sequences = distributed.mean_denominator(torch.tensor(float(mask.size(0)), device=mask.device))
    n_tokens = n_tokens.clamp(min=1)
    kl_value = 0.0
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs reference log-probs")
        ref_log_ratio = ref_logprobs - logprobs
        per_token_kl = torch.exp(ref_log_ratio) - ref_log_ratio - 1
        if bias_correction_kl:
            per_token_kl = per_token_kl * ratio
        per_token = per_token + beta * per_token_kl
        kl_value = float((per_token_kl.detach() * mask).sum() / n_tokens)
    weights = loss_token_weights(mask, reduction)
    loss = (per_token * weights).sum() / loss_denominator(reduction, n_tokens, n_sequences, max_completion_length)
    entropy_value = 0.0
    if entropies is not None:
        entropy_value = float((entropies.detach() * mask).sum() / n_tokens)
        if options.entropy_coef:
            trained = mask if entropy_mask is None else mask * entropy_mask.float()
            count = distributed.mean_denominator(trained.sum()) if n_entropy_tokens is None else n_entropy_tokens
            loss = loss - options.entropy_coef * (entropies * trained).sum() / count.clamp(min=1)
    clip_fraction = float((was_clipped.float() * mask).sum() / n_tokens)
    return loss, GRPOStats(clip_fraction=clip_fraction, kl=kl_value, entropy=entropy_value)


def off_policy_mask(advantage: torch.Tensor, logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                    mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """[N, 1] 1.0 for the completions the policy term keeps, as TRL 1.16's get_off_policy_mask: those with a
    non-negative advantage, and the others whose mean over their tokens of (behaviour log-prob - current log-prob)
    (the KL from the sampling policy to the current one, estimated on the sampled tokens) is at most `threshold`.
    A NaN behaviour log-prob (a token the engine did not score) adds nothing."""
    gap = torch.nan_to_num(behaviour_logprobs - logprobs, nan=0.0)
    mean_gap = (gap * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return ((advantage >= 0) | (mean_gap <= threshold)).to(mask.dtype)


def vespo_weights(advantage: torch.Tensor, token_log_ratio: torch.Tensor, mask: torch.Tensor,
                  rollout_ratio: torch.Tensor | None, options: PolicyLossOptions) -> torch.Tensor:
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


@torch.no_grad()
def rollout_correction(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor,
                       mode: str, clip_min: float | None, clip_max: float | None) -> tuple[torch.Tensor, torch.Tensor]:
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
