"""The RL half of every stage that uses rewards (rl, interleaved, mix, bridge): sample groups, score them, and the
GRPO loss of any model on those rollouts. Kept in one place so every stage samples and scores identically."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bridgectl.core import distributed
from bridgectl.core.context import TrainContext
from bridgectl.core.logprobs import completion_logprobs, micro_batches, rollout_rows
from bridgectl.core.losses import GRPOStats, backward, group_advantages, grpo_loss
from bridgectl.core.rollout import Rollouts, generate


@dataclass
class ScoredRollouts:
    problems: list  # one per row: each prompt's problem repeated num_generations times
    rollouts: Rollouts
    rewards: torch.Tensor  # [N] verifier rewards
    advantages: torch.Tensor  # [N] group-normalised
    gen_seconds: float
    logprob_gap: float | None = None  # rollout.backend=vllm: engine vs trainer log-probs (core/vllm_rollout)

    @property
    def gen_tokens(self) -> int:
        return int(self.rollouts.lengths.sum())


def sample_groups(ctx: TrainContext, group_size: int | None = None) -> ScoredRollouts:
    """`rl.prompts_per_step` fresh RL problems x `rl.num_generations` samples from the current policy, scored by
    the task's verifier, with GRPO advantages. Under data parallelism this rank samples its share of the groups
    (every rank draws the same problems and group seeds). `group_size`: samples per prompt instead of
    rl.num_generations (stages that fill the rest of each group with demonstrations: luffy, srft)."""
    rl = ctx.cfg.rl
    size = rl.num_generations if group_size is None else group_size
    problems = [next(ctx.rl_problems) for _ in range(rl.prompts_per_step)]
    mine = distributed.shard(list(zip(problems, group_seeds(ctx, len(problems)))))
    grouped = [problem for problem, _ in mine for _ in range(size)]
    return sample_and_score(ctx, grouped, [seed for _, seed in mine], group_size=size)


def group_seeds(ctx: TrainContext, n_groups: int) -> list[int]:
    """One seed per prompt group, from the run's sampling generator (saved in checkpoints)."""
    return torch.randint(0, 2**62, (n_groups,), generator=ctx.sampling_generator,
                         device=ctx.sampling_generator.device).tolist()


def seeds_per_row(seeds: list[int], rows_per_group: int) -> list[int]:
    """One sampling seed per completion from its group's seed (`seeds`, one per group; for samplers that take a
    seed per row, such as vLLM): a group's completions do not depend on the other groups in the batch."""
    return [row_seed for seed in seeds for row_seed in
            torch.randint(0, 2**62, (rows_per_group,), generator=torch.Generator().manual_seed(seed)).tolist()]


def sample_and_score(ctx: TrainContext, grouped: list, seeds: list[int] | None = None,
                     group_size: int | None = None) -> ScoredRollouts:
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
        rollouts = ctx.rollout_engine.sample(policy, questions, rl.max_completion_length, rl.temperature,
                                             seeds_per_row(seeds, size))
        logprob_gap = ctx.rollout_engine.last_logprob_gap
    else:
        generators = [torch.Generator(device=ctx.device).manual_seed(seed) for seed in seeds]
        with policy.merged_for_generation() as sampler:
            rollouts = generate(sampler, policy.tokenizer, questions, rl.max_completion_length,
                                temperature=rl.temperature, group_generators=generators,
                                rows_per_batch=ctx.cfg.rollout.batch_size)
    policy.model.train(was_training)
    gen_seconds = time.perf_counter() - started
    rewards = torch.tensor(ctx.task.rewards(rollouts.completions, [p.answer for p in grouped]), device=ctx.device)
    # a group of one has no baseline to compare with: advantage 0 (its std would be NaN)
    advantages = group_advantages(rewards, size, rl.scale_rewards) if size > 1 else torch.zeros_like(rewards)
    return ScoredRollouts(grouped, rollouts, rewards, advantages, gen_seconds, logprob_gap)


def rl_loss(model, scored: ScoredRollouts, ctx: TrainContext, rows: list[int] | None = None,
            n_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, GRPOStats]:
    """GRPO loss of `model` (any module with the model's signature) on shared rollouts: of all of them, or of
    `rows` divided by `n_tokens` (a micro-batch of rl_backward). The ratio is taken against the sampling policy, so
    scoring another model (BRIDGE's shadow) is properly off-policy."""
    rl, rollouts, advantages = ctx.cfg.rl, scored.rollouts, scored.advantages
    if rows is not None:
        rollouts, advantages = rollout_rows(rollouts, rows), advantages[rows]
    ref_logprobs = None
    if rl.beta > 0:
        with torch.no_grad(), ctx.policy.reference() as reference:
            ref_logprobs = completion_logprobs(reference, rollouts, rl.temperature)
    logprobs = completion_logprobs(model, rollouts, rl.temperature)
    return grpo_loss(logprobs, rollouts.sampling_logprobs, advantages, rollouts.completion_mask, rl.epsilon, rl.beta,
                     ref_logprobs, n_tokens)


def rl_backward(model, scored: ScoredRollouts, ctx: TrainContext, scale: float = 1.0,
                n_tokens: torch.Tensor | None = None) -> tuple[float, GRPOStats]:
    """Accumulates the gradient of `scale * rl_loss(model, scored, ctx)` into the parameters' `.grad`, in
    micro-batches of `train.micro_batch_size` rows, each divided by the whole step's token count, so the sum equals
    the one-pass gradient to float rounding; returns the loss and its statistics. `n_tokens`: the divisor when the
    step's token mean also covers other tokens (luffy's demonstrations); default the rollouts' own count."""
    rollouts = scored.rollouts
    if n_tokens is None:
        n_tokens = distributed.mean_denominator(rollouts.completion_mask.sum())
    lengths = (rollouts.prompt_mask.sum(dim=1) + rollouts.completion_mask.sum(dim=1)).tolist()
    total, clip_fraction, kl = torch.zeros((), device=rollouts.completion_ids.device), 0.0, 0.0
    for rows in micro_batches(lengths, ctx.cfg.train.micro_batch_size):
        loss, stats = rl_loss(model, scored, ctx, rows, n_tokens)
        backward(scale * loss)
        total += loss.detach()
        clip_fraction, kl = clip_fraction + stats.clip_fraction, kl + stats.kl
    return float(total), GRPOStats(clip_fraction=clip_fraction, kl=kl)


def rollout_metrics(scored: ScoredRollouts, stats: GRPOStats, group_size: int) -> dict:
    rewards = scored.rewards
    return {
        "train/reward_mean": rewards.mean().item(), "train/reward_std": rewards.std().item(),
        "train/response_len": scored.rollouts.lengths.float().mean().item(),
        "train/kl": stats.kl, "train/clip_fraction": stats.clip_fraction,
        # groups whose rewards are all equal carry no learning signal: counted, not an error
        "train/zero_std_groups": int((rewards.view(-1, group_size).std(dim=1) == 0).sum()),
        "perf/gen_tokens_per_s": scored.gen_tokens / max(scored.gen_seconds, 1e-9),
        **({"rollout/logprob_gap": scored.logprob_gap} if scored.logprob_gap is not None else {}),
    }


def completion_rows(scored: ScoredRollouts, ctx: TrainContext, update: int) -> list[dict]:
    """The first group of the `update`-th update (counted from 1) for completions.jsonl, every
    `train.log_completions_every` updates; nothing in between."""
    every, group_size = ctx.cfg.train.log_completions_every, ctx.cfg.rl.num_generations
    if every <= 0 or (update - 1) % every != 0:
        return []
    return [{"prompt": p.question, "completion": c, "reward": r, "gold": p.answer, "split": "train"}
            for p, c, r in zip(scored.problems[:group_size], scored.rollouts.completions, scored.rewards.tolist())]
