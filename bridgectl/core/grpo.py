"""The RL half of every stage that uses rewards (rl, interleaved, mix, bridge): sample groups, score them, and the
GRPO loss of any model on those rollouts. Kept in one place so every stage samples and scores identically."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from bridgectl.core import distributed
from bridgectl.core.advantages import global_std, group_advantages, normalize_then_sum
from bridgectl.core.context import TrainContext
from bridgectl.core.logprobs import completion_logprobs, micro_batches, rollout_rows
from bridgectl.core.losses import backward
from bridgectl.core.policy_losses import (
    GRPOStats,
    PolicyLossOptions,
    grpo_loss,
    rank_local,
    reduction_of,
    rollout_correction,
)
from bridgectl.core.rollout import Rollouts, concat_rollouts, generate, truncated_rows


@dataclass
class ScoredRollouts:
    problems: list  # one per row: each prompt's problem repeated num_generations times
    rollouts: Rollouts
    rewards: torch.Tensor  # [N] verifier rewards
    advantages: torch.Tensor  # [N] group-normalised
    gen_seconds: float
    logprob_gap: float | None = None  # rollout.backend=vllm: engine vs trainer log-probs (core/vllm_rollout)
    corrected: float | None = None  # rollout.backend=vllm: share of tokens or completions the correction bounded
    reward_means: dict = field(default_factory=dict)  # task.reward_funcs: each function's mean (tasks/rewards.py)
    verdicts: torch.Tensor | None = None  # [N] the verifier's verdicts, when rewards include more than it
    dropped_tokens: int = 0  # tokens of groups sampled and dropped this step (rl.filter_groups)
    sampling: dict = field(default_factory=dict)  # rl.filter_groups: how the batch was filled, for the metrics

    @property
    def correct(self) -> torch.Tensor:
        """[N] bool: the rollouts the verifier accepts (what relift, hpt and srft mean by a right answer), whatever
        other rewards task.reward_funcs adds."""
        return (self.rewards if self.verdicts is None else self.verdicts) > 0

    @property
    def gen_tokens(self) -> int:
        """Every token sampled for the step: the batch's, and those of groups dynamic sampling dropped."""
        return int(self.rollouts.lengths.sum()) + self.dropped_tokens


def sample_groups(ctx: TrainContext, group_size: int | None = None) -> ScoredRollouts:
    """`rl.prompts_per_step` fresh RL problems x `rl.num_generations` samples from the current policy, scored by
    the task's verifier, with GRPO advantages. Under data parallelism this rank samples its share of the groups
    (every rank draws the same problems and group seeds). `group_size`: samples per prompt instead of
    rl.num_generations (stages that fill the rest of each group with demonstrations: luffy, srft)."""
    rl = ctx.cfg.rl
    size = rl.num_generations if group_size is None else group_size
    return sample_filled(ctx, size) if rl.filter_groups else sample_round(ctx, size)


def sample_round(ctx: TrainContext, size: int) -> ScoredRollouts:
    """rl.prompts_per_step fresh problems and their group seeds (the same on every rank), this rank's share of the
    groups sampled and scored, `size` completions each."""
    problems = [next(ctx.rl_problems) for _ in range(ctx.cfg.rl.prompts_per_step)]
    mine = distributed.shard(list(zip(problems, group_seeds(ctx, len(problems)))))
    grouped = [problem for problem, _ in mine for _ in range(size)]
    return sample_and_score(ctx, grouped, [seed for _, seed in mine], group_size=size)


def sample_filled(ctx: TrainContext, size: int) -> ScoredRollouts:
    """DAPO's dynamic sampling (arXiv 2503.14476, Sec. 3.2; verl's algorithm.filter_groups): rounds of
    rl.prompts_per_step fresh prompts are sampled and each group whose rewards are all equal (no advantage, no
    gradient) is dropped, until this rank holds its share of rl.prompts_per_step groups with reward variance or
    rl.max_num_gen_batches rounds are done; then the batch is the first share of the kept groups (fewer when the
    rounds ran out: it trains on what it has, and train/batch_filled says how full it was). Every rank samples as
    many rounds as the slowest needs, so the processes stay in step; problems and seeds come from the run's
    stream and sampling generator, so a run (and a resumed one) gets the same batches. Advantages are those of the
    kept groups (rl.scale_rewards=batch: over the kept batch). Every round's tokens count in gen_tokens and every
    round's time in gen_seconds."""
    rl = ctx.cfg.rl
    share = rl.prompts_per_step // distributed.world_size()
    kept: list[tuple[ScoredRollouts, list[int]]] = []  # (a round, its groups kept)
    n_kept = n_constant = rounds = 0
    while rounds < rl.max_num_gen_batches and distributed.any_rank(n_kept < share):
        scored = sample_round(ctx, size)
        groups = len(scored.problems) // size
        varied = (scored.rewards.view(-1, size).std(dim=1) > 0).nonzero().flatten().tolist()
        take = varied[: max(0, share - n_kept)]
        kept.append((scored, take))
        n_kept, n_constant, rounds = n_kept + len(take), n_constant + groups - len(varied), rounds + 1
    rows = [[group * size + member for group in take for member in range(size)] for _, take in kept]
    parts = [(scored, chosen) for (scored, _), chosen in zip(kept, rows)]
    sampled_tokens = sum(int(scored.rollouts.lengths.sum()) for scored, _ in parts)
    chosen_parts = [(scored, chosen) for scored, chosen in parts if chosen]
    if not chosen_parts:  # not one group with reward variance: the last round's first group, all advantages 0
        chosen_parts = [(parts[-1][0], list(range(size)))]
    rollouts = concat_rollouts(
        [rollout_rows(scored.rollouts, chosen) for scored, chosen in chosen_parts], ctx.policy.tokenizer.pad_token_id
    )
    index = [(scored, torch.tensor(chosen, device=ctx.device)) for scored, chosen in chosen_parts]
    rewards = torch.cat([scored.rewards[at] for scored, at in index])
    verdicts = None
    if any(scored.verdicts is not None for scored, _ in index):
        verdicts = torch.cat(
            [(scored.rewards if scored.verdicts is None else scored.verdicts)[at] for scored, at in index]
        )
    problems = [scored.problems[row] for scored, chosen in chosen_parts for row in chosen]
    advantages = (
        group_advantages(rewards, size, rl.scale_rewards, rl.adv_estimator, rollouts.lengths)
        if n_kept
        else torch.zeros_like(rewards)
    )
    sampled_rows = sum(len(scored.problems) for scored, _ in parts)
    reward_means = {
        name: sum(scored.reward_means[name] * len(scored.problems) for scored, _ in parts) / sampled_rows
        for name in parts[0][0].reward_means
    }
    gaps = [scored.logprob_gap for scored, _ in parts if scored.logprob_gap is not None]
    corrected = [scored.corrected for scored, _ in parts if scored.corrected is not None]
    return ScoredRollouts(
        problems,
        rollouts,
        rewards,
        advantages,
        sum(scored.gen_seconds for scored, _ in parts),
        sum(gaps) / len(gaps) if gaps else None,
        sum(corrected) / len(corrected) if corrected else None,
        reward_means,
        verdicts,
        dropped_tokens=sampled_tokens - int(rollouts.lengths.sum()),
        sampling={
            "train/sampling_rounds": rounds,
            "train/batch_filled": n_kept / share,
            "train/dropped_groups": n_constant,
        },
    )


def group_seeds(ctx: TrainContext, n_groups: int) -> list[int]:
    """One seed per prompt group, from the run's sampling generator (saved in checkpoints)."""
    return torch.randint(
        0, 2**62, (n_groups,), generator=ctx.sampling_generator, device=ctx.sampling_generator.device
    ).tolist()


def seeds_per_row(seeds: list[int], rows_per_group: int) -> list[int]:
    """One sampling seed per completion from its group's seed (`seeds`, one per group; for samplers that take a
    seed per row, such as vLLM): a group's completions do not depend on the other groups in the batch."""
    return [
        row_seed
        for seed in seeds
        for row_seed in torch.randint(
            0, 2**62, (rows_per_group,), generator=torch.Generator().manual_seed(seed)
        ).tolist()
    ]


def sample_and_score(
    ctx: TrainContext, grouped: list, seeds: list[int] | None = None, group_size: int | None = None
) -> ScoredRollouts:
    """Samples `grouped` (consecutive groups of `group_size` rows, default rl.num_generations), one generator per
    group seeded from `seeds` (fresh seeds when None)."""
    rl, policy = ctx.cfg.rl, ctx.policy
    size = rl.num_generations if group_size is None else group_size
    seeds = seeds if seeds is not None else group_seeds(ctx, len(grouped) // size)
    started = time.perf_counter()
    was_training = policy.model.training
    policy.model.eval()
    questions, logprob_gap = [p.question for p in grouped], None
    if ctx.rollout_engine is not None:
        rollouts = ctx.rollout_engine.sample(
            policy,
            questions,
            rl.max_completion_length,
            rl.temperature,
            seeds_per_row(seeds, size),
            rl.top_k,
            rl.top_p,
            rl.min_p,
        )
        logprob_gap = ctx.rollout_engine.last_logprob_gap
    else:
        generators = [torch.Generator(device=ctx.device).manual_seed(seed) for seed in seeds]
        with policy.merged_for_generation() as sampler:
            rollouts = generate(
                sampler,
                policy.tokenizer,
                questions,
                rl.max_completion_length,
                temperature=rl.temperature,
                group_generators=generators,
                rows_per_batch=ctx.cfg.rollout.batch_size,
                top_k=rl.top_k,
                top_p=rl.top_p,
                min_p=rl.min_p,
                end_ids=policy.end_tokens.ids,
                pack_weights=ctx.cfg.rollout.cpu_packed_weights,
            )
    policy.model.train(was_training)
    gen_seconds = time.perf_counter() - started
    # the verifier, or the weighted sum of task.reward_funcs (tasks/rewards.py)
    values, reward_means, verdicts = ctx.task.step_reward(grouped, rollouts.completions)
    rewards = torch.tensor(values, device=ctx.device)
    verdicts = None if verdicts is values else torch.tensor(verdicts, device=ctx.device)
    if rl.overlong_buffer_len > 0:
        penalty = overlong_penalty(
            rollouts.lengths, rl.max_completion_length, rl.overlong_buffer_len, rl.overlong_penalty_factor
        )
        verdicts = rewards.clone() if verdicts is None else verdicts  # what the verifier said, before the shaping
        rewards = rewards + penalty
        reward_means = {**reward_means, "overlong": penalty.mean().item()}
    # a group of one has no baseline to compare with: advantage 0 (its std would be NaN)
    if size == 1:
        advantages = torch.zeros_like(rewards)
    elif rl.multi_objective_aggregation == "normalize_then_sum":
        per_function = torch.tensor(ctx.task.step_reward.last_values, device=ctx.device).T  # [N, K]
        if rl.overlong_buffer_len > 0:  # the length penalty is one more objective, weight 1
            per_function = torch.cat([per_function, penalty.unsqueeze(1)], dim=1)
        weights = torch.tensor(ctx.task.step_reward.weights() + [1.0] * (rl.overlong_buffer_len > 0), device=ctx.device)
        advantages = normalize_then_sum(per_function, weights, size)
    else:
        advantages = group_advantages(rewards, size, rl.scale_rewards, rl.adv_estimator, rollouts.lengths)
    corrected = None
    if correction := rollout_ratio(rollouts, ctx):
        ratio, acted = correction
        mask = loss_mask(rollouts, ctx).bool()
        corrected = float(acted.float().mean() if ratio.size(1) == 1 else acted[mask].float().mean())
    return ScoredRollouts(
        grouped, rollouts, rewards, advantages, gen_seconds, logprob_gap, corrected, reward_means, verdicts
    )


def rollout_ratio(rollouts: Rollouts, ctx: TrainContext) -> tuple[torch.Tensor, torch.Tensor] | None:
    """rl.vllm_importance_sampling_correction's ratio of `rollouts` and where its bounds acted
    (core/policy_losses.rollout_correction), for rollouts an engine sampled (their engine_logprobs); None otherwise."""
    rl = ctx.cfg.rl
    if not rl.vllm_importance_sampling_correction or rollouts.engine_logprobs is None:
        return None
    return rollout_correction(
        rollouts.sampling_logprobs,
        rollouts.engine_logprobs,
        loss_mask(rollouts, ctx),
        rl.vllm_importance_sampling_mode,
        rl.vllm_importance_sampling_clip_min,
        rl.vllm_importance_sampling_clip_max,
    )


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13; verl's overlong_buffer, TRL's
    get_soft_overlong_punishment): 0 up to max_length - buffer tokens, then falling linearly to -factor at
    max_length (and below it past max_length): factor x min(0, (max_length - buffer - length) / buffer)."""
    return factor * torch.clamp((max_length - buffer - lengths.float()) / buffer, max=0.0)


def loss_mask(rollouts: Rollouts, ctx: TrainContext) -> torch.Tensor:
    """[N, C] the completion tokens the GRPO loss counts: every one, or with rl.mask_truncated_completions none of
    a completion cut off at rl.max_completion_length before an end token of any kind (the policy's
    end_tokens.ids; TRL's mask_truncated_completions; DAPO, arXiv 2503.14476, "Overlong Filtering"): out of the
    numerator and of the token count alike."""
    mask = rollouts.completion_mask
    if ctx.cfg.rl.mask_truncated_completions:
        mask = mask * ~truncated_rows(rollouts, ctx.policy.end_tokens.ids).unsqueeze(1)
    return mask


def trained_tokens(scored: ScoredRollouts, ctx: TrainContext, rows: torch.Tensor | None = None) -> int:
    """The completion tokens the GRPO loss trains on (of `rows`, or all): every generated one, less those of
    completions loss_mask leaves out under rl.mask_truncated_completions (what StepOutput.train_tokens counts)."""
    lengths = scored.rollouts.lengths if rows is None else scored.rollouts.lengths[rows]
    if ctx.cfg.rl.mask_truncated_completions:
        kept = ~truncated_rows(scored.rollouts, ctx.policy.end_tokens.ids)
        lengths = lengths[kept if rows is None else kept[rows]]
    return int(lengths.sum())


def loss_options(ctx: TrainContext) -> PolicyLossOptions:
    """The GRPO variants rl.* sets (core/policy_losses.PolicyLossOptions)."""
    rl = ctx.cfg.rl
    return PolicyLossOptions(
        importance_sampling_level=rl.importance_sampling_level,
        delta=rl.delta,
        entropy_coef=rl.entropy_coef,
        sapo_temperature_pos=rl.sapo_temperature_pos,
        sapo_temperature_neg=rl.sapo_temperature_neg,
        vespo_k_pos=rl.vespo_k_pos,
        vespo_lambda_pos=rl.vespo_lambda_pos,
        vespo_k_neg=rl.vespo_k_neg,
        vespo_lambda_neg=rl.vespo_lambda_neg,
        off_policy_mask_threshold=rl.off_policy_mask_threshold,
    )


@dataclass(frozen=True)
class EntropySelection:
    """rl.top_entropy_quantile's choice for one step (arXiv 2506.01939): the policy term keeps the tokens whose
    entropy is at least `threshold`, the quantile 1 - rl.top_entropy_quantile of all the step's loss tokens (over
    every process), `n_tokens` of them (per process, as the loss's other counts)."""

    threshold: torch.Tensor
    n_tokens: torch.Tensor


def select_high_entropy(
    model, scored: ScoredRollouts, ctx: TrainContext, rows: list[int], lengths: list[int]
) -> EntropySelection:
    """The step's entropy threshold and selected-token count: one no-grad pass over the step's rows (in
    micro-batches of rl_backward's: `lengths` are `rows`' token counts), so every micro-batch keeps the same tokens
    the one-pass loss would (TRL takes the quantile of each micro-batch's own tokens; with one micro-batch, as here,
    the two agree)."""
    rollouts = scored.rollouts
    values = []
    with torch.no_grad():
        for part in micro_batches(lengths, ctx.cfg.train.micro_batch_size):
            chosen = rollout_rows(rollouts, [rows[i] for i in part])
            _, entropies = completion_logprobs(model, chosen, ctx.cfg.rl.temperature, with_entropy=True)
            values.append(entropies[loss_mask(chosen, ctx).bool()])
    local = torch.cat(values) if values else torch.zeros(0, device=rollouts.completion_ids.device)
    every = distributed.gather_values(local)
    if every.numel() == 0:
        threshold = torch.tensor(float("inf"), device=local.device)
    else:
        threshold = torch.quantile(every.float(), 1 - ctx.cfg.rl.top_entropy_quantile)
    n_tokens = distributed.mean_denominator((local >= threshold).sum().float())
    return EntropySelection(threshold=threshold, n_tokens=n_tokens)


def rl_loss(
    model,
    scored: ScoredRollouts,
    ctx: TrainContext,
    rows: list[int] | None = None,
    n_tokens: torch.Tensor | None = None,
    n_sequences: torch.Tensor | None = None,
    selection: EntropySelection | None = None,
) -> tuple[torch.Tensor, GRPOStats]:
    """GRPO loss of `model` (any module with the model's signature) on shared rollouts: of all of them, or of
    `rows` normalised by the whole step's `n_tokens` and `n_sequences` (a micro-batch of rl_backward; which one
    divides is rl.loss_type's choice, core/policy_losses.grpo_loss). The ratio is taken against the sampling policy, so
    scoring another model (BRIDGE's shadow, or the policy after its first update with rl.num_iterations > 1) is
    properly off-policy and clipped at rl.epsilon / rl.epsilon_high. The same forward gives the tokens' entropies
    (train/entropy, rl.entropy_coef's bonus, and with `selection` rl.top_entropy_quantile's mask). Rollouts an
    engine sampled carry its log-probs: the rollout correction's ratio and the off-policy mask use them."""
    rl, rollouts, advantages = ctx.cfg.rl, scored.rollouts, scored.advantages
    if rows is not None:
        rollouts, advantages = rollout_rows(rollouts, rows), advantages[rows]
    ref_logprobs = None
    if rl.beta > 0:
        with torch.no_grad(), ctx.policy.reference() as reference:
            ref_logprobs = completion_logprobs(reference, rollouts, rl.temperature)
    logprobs, entropies = completion_logprobs(model, rollouts, rl.temperature, with_entropy=True)
    if not rl.entropy_coef:
        entropies = entropies.detach()  # logged only: no gradient through the entropy
    mask = loss_mask(rollouts, ctx)
    entropy_mask = None if selection is None else (entropies.detach() >= selection.threshold) & mask.bool()
    correction = rollout_ratio(rollouts, ctx)
    return grpo_loss(
        logprobs,
        rollouts.sampling_logprobs,
        advantages,
        mask,
        rl.epsilon,
        rl.beta,
        ref_logprobs,
        n_tokens,
        epsilon_high=rl.epsilon_high,
        loss_type=rl.loss_type,
        n_sequences=n_sequences,
        max_completion_length=rl.max_completion_length,
        bias_correction_kl=rl.use_bias_correction_kl,
        options=loss_options(ctx),
        entropies=entropies,
        entropy_mask=entropy_mask,
        n_entropy_tokens=None if selection is None else selection.n_tokens,
        rollout_ratio=None if correction is None else correction[0],
        behaviour_logprobs=rollouts.engine_logprobs,
    )


def rl_backward(
    model,
    scored: ScoredRollouts,
    ctx: TrainContext,
    scale: float = 1.0,
    n_tokens: torch.Tensor | None = None,
    rows: list[int] | None = None,
) -> tuple[float, GRPOStats]:
    """Accumulates the gradient of `scale * rl_loss(model, scored, ctx)` into the parameters' `.grad`, in
    micro-batches of `train.micro_batch_size` rows, each normalised by the whole step's token and completion counts
    (rl.loss_type), so the sum equals the one-pass gradient to float rounding; returns the loss and its statistics.
    `n_tokens`: the token count when the step's token mean also covers other tokens (luffy's demonstrations);
    default the rollouts' own (of loss_mask). `rows`: only these rollouts, normalised by their own counts (hpt's
    kept prompts; every process calls this, also with no rows, as the counts are summed over processes).

    When no row has an advantage on any process and nothing else in the loss has a gradient (skips_backward), no
    pass runs (and core/flops counts none): every trainable parameter without a gradient gets a zero one, which is
    exactly what the passes would have given, and the loss 0.0 comes with statistics marked `skipped`."""
    rollouts = scored.rollouts
    device = rollouts.completion_ids.device
    rows = list(range(rollouts.completion_ids.size(0))) if rows is None else rows
    index = torch.tensor(rows, dtype=torch.long, device=device)
    if skips_backward(scored, ctx, index):
        zero_missing_gradients(model)
        return 0.0, GRPOStats(clip_fraction=0.0, kl=0.0, skipped=True)
    if n_tokens is None:
        local = loss_mask(rollouts, ctx)[index].sum()
        n_tokens = local if rank_local(ctx.cfg.rl.loss_type) else distributed.mean_denominator(local)
    n_sequences = None
    if reduction_of(ctx.cfg.rl.loss_type) not in ("dapo", "bnpo"):  # the completion count divides
        n_sequences = distributed.mean_denominator(torch.tensor(float(len(rows)), device=device))
    lengths = (rollouts.prompt_mask.sum(dim=1) + rollouts.completion_mask.sum(dim=1))[index].tolist()
    selection = None
    if ctx.cfg.rl.top_entropy_quantile < 1:
        selection = select_high_entropy(model, scored, ctx, rows, lengths)
    total, clip_fraction, kl, entropy = torch.zeros((), device=device), 0.0, 0.0, 0.0
    for part in micro_batches(lengths, ctx.cfg.train.micro_batch_size) if rows else []:
        loss, stats = rl_loss(model, scored, ctx, [rows[i] for i in part], n_tokens, n_sequences, selection)
        backward(scale * loss)
        total += loss.detach()
        clip_fraction, kl, entropy = clip_fraction + stats.clip_fraction, kl + stats.kl, entropy + stats.entropy
    return float(total), GRPOStats(clip_fraction=clip_fraction, kl=kl, entropy=entropy)


def without_signal(advantages: torch.Tensor, other_signal: bool = False) -> bool:
    """Whether every one of `advantages` is 0 and no rank has `other_signal`, over every data-parallel rank (a
    collective every rank must call)."""
    return not distributed.any_rank(other_signal or bool((advantages != 0).any()))


def skips_backward(scored: ScoredRollouts, ctx: TrainContext, rows: torch.Tensor) -> bool:
    """Whether rl_backward may leave out its passes over `rows` (indices into `scored`): every advantage of theirs is
    0 on every data-parallel rank (a collective: every rank calls rl_backward together), and rl.beta and
    rl.entropy_coef are 0, the only terms of core/policy_losses.grpo_loss that are not a product with the advantage. The
    passes would then give exactly zero gradients, whatever rl.loss_type (tests/test_no_signal.py checks each)."""
    rl = ctx.cfg.rl
    if rl.beta != 0 or rl.entropy_coef != 0:  # the KL or the entropy bonus has a gradient of its own
        return False
    return without_signal(scored.advantages[rows])


def zero_missing_gradients(model) -> None:
    """A zero `.grad` for every parameter of `model` that trains and has none: what left-out passes would have
    accumulated, so the optimizer step that follows is theirs (AdamW passes over a parameter without a gradient,
    but advances its moments, step count and weight decay on a zero one)."""
    for param in model.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)


@dataclass(frozen=True)
class Update:
    """What one optimizer update on a batch of rollouts reports to iterate_updates."""

    rl_loss: float
    """The RL loss (rl_backward's)."""
    stats: GRPOStats
    """The RL loss's clip fraction and KL (rl_backward's)."""
    sft_loss: float | None
    """The SFT term's loss, None for stages without one (rl)."""
    grad_norm: float
    """The gradient norm before clipping (core/optim.take_step)."""


def iterate_updates(n: int, one_update: Callable[[], Update]) -> tuple[dict, GRPOStats]:
    """Runs `one_update()` `n` times (rl.num_iterations updates on one batch of rollouts), each reporting an Update.
    Returns the step's metrics, the means over its updates (TRL averages its logged values likewise): train/rl_loss,
    train/grad_norm and train/sft_loss where there is one; and the mean statistics, for rollout_metrics."""
    updates = [one_update() for _ in range(n)]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    metrics = {
        "train/rl_loss": mean([u.rl_loss for u in updates]),
        "train/grad_norm": mean([u.grad_norm for u in updates]),
    }
    if updates[0].sft_loss is not None:
        metrics["train/sft_loss"] = mean([u.sft_loss for u in updates])
    stats = GRPOStats(
        clip_fraction=mean([u.stats.clip_fraction for u in updates]),
        kl=mean([u.stats.kl for u in updates]),
        entropy=mean([u.stats.entropy for u in updates]),
        skipped=all(u.stats.skipped for u in updates),
    )
    return metrics, stats


def rollout_metrics(
    scored: ScoredRollouts, stats: GRPOStats, group_size: int, ctx: TrainContext, other_signal: bool = False
) -> dict:
    """The step's metrics of its rollouts, the same for every stage that samples (groups of `group_size`
    consecutive rows of `scored`): rewards, lengths, the RL loss's statistics (none for a step whose passes were
    skipped: nothing was measured), and whether the step had a learning signal at all. A collective: every rank
    calls it at one point of the step. `other_signal`: this rank's stage learned from the step's prompts in a way
    no advantage measures (hpt's demonstrations of the prompts it switched to SFT, srft's losses, luffy's
    demonstrations), so the step has a signal whatever the rollouts' advantages."""
    rewards = scored.rewards
    grouped = rewards.view(-1, group_size)
    constant = (grouped == grouped[:, :1]).all(dim=1)  # groups whose rewards are all equal: no advantage
    stats_metrics = (
        {}
        if stats.skipped
        else {"train/kl": stats.kl, "train/clip_fraction": stats.clip_fraction, "train/entropy": stats.entropy}
    )
    return {
        # the std of the whole step's rewards, over every data-parallel rank (a collective: every rank logs it); the
        # mean of the ranks' own stds would not be it
        "train/reward_mean": rewards.mean().item(),
        "train/reward_std": global_std(rewards).item(),
        "train/response_len": scored.rollouts.lengths.float().mean().item(),
        **stats_metrics,
        # groups whose rewards are all equal carry no learning signal: counted, not an error
        "train/zero_std_groups": int(constant.sum()),
        "rollout/frac_reward_zero_std": constant.float().mean().item(),
        # completions cut at rl.max_completion_length before any end token (TRL's completions/clipped_ratio): a
        # limit too short for the task scores them all alike
        "rollout/clipped_ratio": truncated_rows(scored.rollouts, ctx.policy.end_tokens.ids).float().mean().item(),
        # 1.0: not one advantage on any rank, so the RL loss gave no gradient (the runner counts and warns)
        "rollout/no_signal": float(without_signal(scored.advantages, other_signal)),
        "perf/gen_tokens_per_s": scored.gen_tokens / max(scored.gen_seconds, 1e-9),
        **{f"train/rewards/{name}": mean for name, mean in scored.reward_means.items()},
        **({"rollout/logprob_gap": scored.logprob_gap} if scored.logprob_gap is not None else {}),
        **({"rollout/is_corrected": scored.corrected} if scored.corrected is not None else {}),
        **scored.sampling,
    }


def completion_rows(scored: ScoredRollouts, ctx: TrainContext, update: int) -> list[dict]:
    """The first group of the `update`-th update (counted from 1) for completions.jsonl, every
    `train.log_completions_every` updates; nothing in between."""
    every, group_size = ctx.cfg.train.log_completions_every, ctx.cfg.rl.num_generations
    if every <= 0 or (update - 1) % every != 0:
        return []
    return [
        {"prompt": p.question, "completion": c, "reward": r, "gold": p.answer, "split": "train"}
        for p, c, r in zip(scored.problems[:group_size], scored.rollouts.completions, scored.rewards.tolist())
    ]
