"""Stage `mix`: single-level mixed loss L_rl + mu * L_sft (the paper's later "naive mixing" baseline, CHORD-mu
style), one optimizer, one update per step on shared weights.

mu is constant (`mix.mu`) or decays linearly from `mix.mu` to `mix.mu_end` over the stage, so training can lean on
demonstrations early and on rewards later. With `rl.num_iterations` = n > 1 a step takes n updates on its one batch
of rollouts and SFT examples, as the rl stage does with its rollouts (the ratio's denominator stays the sampling
policy's).
"""

from __future__ import annotations

from bridgectl.core.context import StepOutput, TrainContext, next_sft_batch
from bridgectl.core.grpo import (
    Update,
    completion_rows,
    iterate_updates,
    rl_backward,
    rollout_metrics,
    sample_groups,
    trained_tokens,
)
from bridgectl.core.losses import sft_backward
from bridgectl.core.optim import take_step
from bridgectl.stages.base import CountingStage


def linear_mu(cfg, update: int, total_updates: int) -> float:
    """mu at the stage's update `update` (from 0): `mix.mu`, or a straight line from `mix.mu` at the first update to
    `mix.mu_end` at the last of `total_updates`."""
    if cfg.mu_end is None:
        return cfg.mu
    return cfg.mu + (cfg.mu_end - cfg.mu) * update / max(1, total_updates - 1)


class MixStage(CountingStage):
    """L_rl + mu L_sft (module docstring): one optimizer (mix.lr), its step counter as its state."""

    name = "mix"

    def __init__(self, ctx: TrainContext, total_updates: int) -> None:
        # `total_updates` counts steps; the optimizer takes rl.num_iterations updates in each
        super().__init__(ctx, ctx.cfg.mix.lr, total_updates * ctx.cfg.rl.num_iterations)
        self.total_updates = total_updates  # mu's line spans the stage

    def step(self) -> StepOutput:
        ctx, rl = self.ctx, self.ctx.cfg.rl
        mu = linear_mu(ctx.cfg.mix, self.updates, self.total_updates)
        scored = sample_groups(ctx)
        batch = next_sft_batch(ctx)

        def one_update() -> Update:
            # the gradient of L_rl + mu L_sft, accumulated from the micro-batches of each (train.micro_batch_size)
            loss_rl, stats = rl_backward(ctx.policy.model, scored, ctx)
            loss_sft = sft_backward(ctx.policy.model, batch, ctx.cfg.train.micro_batch_size, scale=mu)
            grad_norm = take_step(self.params, self.optimizer, self.scheduler, ctx.cfg.optim.max_grad_norm)
            return Update(rl_loss=loss_rl, stats=stats, sft_loss=loss_sft, grad_norm=grad_norm)

        metrics, stats = iterate_updates(rl.num_iterations, one_update)
        self.updates += 1
        metrics.update(
            {
                "mix/mu": mu,
                **rollout_metrics(scored, stats, rl.num_generations, ctx),
                "train/lr": self.scheduler.get_last_lr()[0],
            }
        )
        train_tokens = rl.num_iterations * (trained_tokens(scored, ctx) + batch.n_tokens)
        return StepOutput(
            metrics=metrics,
            train_tokens=train_tokens,
            gen_tokens=scored.gen_tokens,
            completions=completion_rows(scored, ctx, self.updates),
        )
