"""Stage `sft`: supervised fine-tuning on reasoning traces.

Paper Eq. 1: maximise J_SFT = E[log pi(r, y | x)] over (question x, trace r, answer y); here as the mean
negative log-likelihood of the trace and answer tokens (the question is not scored).
"""

from __future__ import annotations

from bridgectl.core.context import StepOutput, TrainContext, next_sft_batch
from bridgectl.core.losses import sft_backward
from bridgectl.core.optim import take_step
from bridgectl.stages.base import OptimizerStage


class SFTStage(OptimizerStage):
    """SFT (module docstring): one optimizer (sft.lr) and no other state (it counts no steps)."""

    name = "sft"

    def __init__(self, ctx: TrainContext, total_updates: int) -> None:
        super().__init__(ctx, ctx.cfg.sft.lr, total_updates)

    def step(self) -> StepOutput:
        ctx = self.ctx
        batch = next_sft_batch(ctx)
        loss = sft_backward(ctx.policy.model, batch, ctx.cfg.train.micro_batch_size)
        grad_norm = take_step(self.params, self.optimizer, self.scheduler, ctx.cfg.optim.max_grad_norm)
        return StepOutput(
            metrics={"train/sft_loss": loss, "train/grad_norm": grad_norm, "train/lr": self.scheduler.get_last_lr()[0]},
            train_tokens=batch.n_tokens,
        )
