"""What a stage is: the contract every update rule of bridgectl/stages/ keeps, and the shared pieces of it.

A stage is built as `Stage(ctx, total_updates)` (stages/__init__.build_stage) over the run's TrainContext with a
budget of `total_updates` steps, and then:

    step()               one training step: sample, score, take its update(s); returns a core.context.StepOutput
    optimizers()         every optimizer and LR scheduler it owns, by the name a checkpoint saves its state under
    state_dict()         what else it keeps from one step to the next and cannot rebuild from the config: the step
                         counter, BRIDGE's shadow theta_hat, relift's buffer (plain values and tensors)
    load_state_dict(s)   puts back what state_dict returned

The parameters are the model's (saved with it), and everything else (the config, the context, schedules derived
from them, the budget) is rebuilt when the stage is built; core/checkpoint.py saves and restores exactly the two
declared parts, through its Checkpointable protocol (the core cannot import this module: tests/test_layers.py).
tests/test_stage_contract.py checks that every registered stage is a Stage and declares every optimizer and
scheduler it holds; tests/test_stage_state.py that a restored stage equals the original in every attribute.

The shared pieces: OptimizerStage, one optimizer and its scheduler over the policy's trainable parameters (sft),
and CountingStage, that and the step counter `updates` as its state (rl, mix, chord, hpt, luffy, srft, uft, relift).
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

from bridgectl.core.context import StepOutput, TrainContext
from bridgectl.core.optim import make_optimizer

Optimizing = torch.optim.Optimizer | torch.optim.lr_scheduler.LRScheduler
"""An optimizer or a learning-rate scheduler: what optimizers() names."""


class Stage(abc.ABC):
    """A training stage (module docstring): its step, the optimizers and schedulers it owns, and its state."""

    name: ClassVar[str]
    """The stage's name in the registry (stages/__init__.STAGES) and in the recipes."""
    ctx: TrainContext
    """The run's training context (model, task, data streams, config)."""

    @abc.abstractmethod
    def step(self) -> StepOutput:
        """One training step: its metrics, the tokens it trained on and generated, the completions to log."""

    @abc.abstractmethod
    def optimizers(self) -> dict[str, Optimizing]:
        """Every optimizer and LR scheduler of the stage, by the name its state is saved under in trainer.pt (those
        names are the checkpoint format: keep them)."""

    def state_dict(self) -> dict:
        """The stage's state besides its parameters, optimizers and schedulers (module docstring): none here."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores what state_dict returned; a stage that keeps none refuses any (it would be dropped)."""
        if state:
            raise TypeError(
                f"the checkpoint holds state ({', '.join(sorted(state))}) for the {type(self).__name__}, "
                "which keeps none"
            )


class OptimizerStage(Stage):
    """A stage with one optimizer (AdamW, optim.*) and its scheduler over the policy's trainable parameters."""

    def __init__(self, ctx: TrainContext, lr: float, scheduled_updates: int) -> None:
        """`lr`: the stage's learning rate; `scheduled_updates`: the optimizer updates the schedule spans (the
        stage's budget of steps, times the updates each step takes)."""
        self.ctx = ctx
        self.params = ctx.policy.trainable_parameters()
        self.optimizer, self.scheduler = make_optimizer(self.params, lr, ctx.cfg.optim, scheduled_updates)

    def optimizers(self) -> dict[str, Optimizing]:
        """The optimizer and its scheduler, saved as `optimizer` and `scheduler`."""
        return {"optimizer": self.optimizer, "scheduler": self.scheduler}


class CountingStage(OptimizerStage):
    """An OptimizerStage that counts its steps in `updates` (what its schedules of mu, hints and the like read, and
    the step of the completions it logs), its state in checkpoints."""

    def __init__(self, ctx: TrainContext, lr: float, scheduled_updates: int) -> None:
        """As OptimizerStage, with no step taken yet."""
        super().__init__(ctx, lr, scheduled_updates)
        self.updates = 0

    def state_dict(self) -> dict:
        """The step counter."""
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        """Restores the step counter."""
        self.updates = state["updates"]
