"""Stage `rl`: reinforcement learning from verifiable rewards, GRPO-style.

Paper Eq. 2: maximise J_RL = E[R(y_hat, y)] - KL(pi || pi_ref), R = 1 for a correct final answer, else 0 (Eq. 3,
no format reward). One update per step, in the order:

    prompts   <- `rl.prompts_per_step` problems, each repeated `rl.num_generations` times (a group)
    rollouts  <- sample pi at `rl.temperature` (LoRA merged while sampling), stop at EOS
    rewards   <- verifier(completion, gold)
    A         <- (R - mean_group) / std_group                      (`rl.scale_rewards=group`)
    loss      <- clipped surrogate with pi / pi_sampling, + beta KL, token-averaged (core/losses.py)

With one update per batch the ratio is 1 at the update (TRL's num_iterations=1), so clipping only acts when the
sampling policy differs from the trained one (BRIDGE's shadow scores the same rollouts off-policy).
"""

from __future__ import annotations

from bridgectl.core.context import StepOutput, TrainContext
from bridgectl.core.grpo import completion_rows, rl_backward, rollout_metrics, sample_groups
from bridgectl.core.optim import make_optimizer, take_step


class RLStage:
    name = "rl"

    def __init__(self, ctx: TrainContext, total_updates: int) -> None:
        self.ctx = ctx
        self.params = ctx.policy.trainable_parameters()
        self.optimizer, self.scheduler = make_optimizer(self.params, ctx.cfg.rl.lr, ctx.cfg.optim, total_updates)
        self.updates = 0

    def step(self) -> StepOutput:
        ctx, rl = self.ctx, self.ctx.cfg.rl
        scored = sample_groups(ctx)
        loss, stats = rl_backward(ctx.policy.model, scored, ctx)  # micro-batched (train.micro_batch_size)
        grad_norm = take_step(self.params, self.optimizer, self.scheduler, ctx.cfg.optim.max_grad_norm)
        self.updates += 1

        metrics = {"train/rl_loss": loss, **rollout_metrics(scored, stats, rl.num_generations),
                   "train/grad_norm": grad_norm, "train/lr": self.scheduler.get_last_lr()[0]}
        return StepOutput(metrics=metrics, train_tokens=scored.gen_tokens, gen_tokens=scored.gen_tokens,
                          completions=completion_rows(scored, ctx, self.updates))
