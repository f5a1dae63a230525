"""Stage `rl`: reinforcement learning from verifiable rewards, GRPO-style.

Paper Eq. 2: maximise J_RL = E[R(y_hat, y)] - KL(pi || pi_ref), R = 1 for a correct final answer, else 0 (Eq. 3,
no format reward). Each step, in the order:

    prompts   <- `rl.prompts_per_step` problems, each repeated `rl.num_generations` times (a group)
    rollouts  <- sample pi at `rl.temperature` (LoRA merged while sampling; `rl.top_p`, `top_k`, `min_p` truncate),
                 stop at any end token (EOS, the generation config's, the chat template's turn end)
    rewards   <- verifier(completion, gold)
    A         <- (R - mean_group) / std_group                      (`rl.scale_rewards=group`; or batch, none)
    repeat `rl.num_iterations` times (TRL's num_iterations, GRPO's mu, arXiv 2402.03300 Algorithm 1):
        loss  <- clipped surrogate with pi / pi_sampling (clip at `rl.epsilon`, `rl.epsilon_high`), + beta KL,
                 reduced by `rl.loss_type` (core/policy_losses.py)
        one optimizer update

The first update of a batch has ratio 1 (TRL's num_iterations=1 is that update alone), so clipping only acts from
the second one on, or when the sampling policy differs from the trained one (BRIDGE's shadow scores the same
rollouts off-policy). The ratio's denominator stays the sampling policy's log-probs for every update, as TRL's
old_per_token_logps (computed once per batch); the learning-rate schedule counts every update.
"""

from __future__ import annotations

from bridgectl.core.context import StepOutput, TrainContext
from bridgectl.core.grpo import (
    Update,
    completion_rows,
    iterate_updates,
    rl_backward,
    rollout_metrics,
    sample_groups,
    trained_tokens,
)
from bridgectl.core.optim import take_step
from bridgectl.stages.base import CountingStage


class RLStage(CountingStage):
    """GRPO (module docstring): one optimizer (rl.lr), its step counter as its state."""

    name = "rl"

    def __init__(self, ctx: TrainContext, total_updates: int) -> None:
        # `total_updates` counts steps (batches of rollouts); the optimizer takes rl.num_iterations updates in each
        super().__init__(ctx, ctx.cfg.rl.lr, total_updates * ctx.cfg.rl.num_iterations)

    def step(self) -> StepOutput:
        ctx, rl = self.ctx, self.ctx.cfg.rl
        scored = sample_groups(ctx)

        def one_update() -> Update:
            loss, stats = rl_backward(ctx.policy.model, scored, ctx)  # micro-batched (train.micro_batch_size)
            grad_norm = take_step(self.params, self.optimizer, self.scheduler, ctx.cfg.optim.max_grad_norm)
            return Update(rl_loss=loss, stats=stats, sft_loss=None, grad_norm=grad_norm)

        metrics, stats = iterate_updates(rl.num_iterations, one_update)
        self.updates += 1
        metrics.update(
            {**rollout_metrics(scored, stats, rl.num_generations, ctx), "train/lr": self.scheduler.get_last_lr()[0]}
        )
        return StepOutput(
            metrics=metrics,
            train_tokens=rl.num_iterations * trained_tokens(scored, ctx),
            gen_tokens=scored.gen_tokens,
            completions=completion_rows(scored, ctx, self.updates),
        )
