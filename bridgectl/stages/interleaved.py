"""Stage `interleaved`: the paper's "naive alternating" baseline, RL updates and SFT updates in turn.

Each step is one update; a cycle is `interleaved.rl_steps` RL updates then `interleaved.sft_steps` SFT updates
(default 1:1, as in the paper). The two update rules keep their own optimizers and learning rates, so the
alternation does not mix Adam statistics of two different losses.
"""

from __future__ import annotations

from bridgectl.core.context import StepOutput, TrainContext
from bridgectl.stages.base import Optimizing, Stage
from bridgectl.stages.rl import RLStage
from bridgectl.stages.sft import SFTStage


class InterleavedStage(Stage):
    """RL and SFT updates in turn (module docstring): the two rules' optimizers, the step counter and the RL
    rule's own state."""

    name = "interleaved"

    def __init__(self, ctx: TrainContext, total_updates: int) -> None:
        self.ctx = ctx
        pattern = ["rl"] * ctx.cfg.interleaved.rl_steps + ["sft"] * ctx.cfg.interleaved.sft_steps
        self.schedule = [pattern[i % len(pattern)] for i in range(total_updates)]
        self.rules = {"rl": RLStage(ctx, self.schedule.count("rl")), "sft": SFTStage(ctx, self.schedule.count("sft"))}
        self.updates = 0

    def optimizers(self) -> dict[str, Optimizing]:
        """Each rule's optimizers and schedulers under `rules.<rule>.` (`rules.rl.optimizer`, ...)."""
        return {
            f"rules.{kind}.{name}": item
            for kind, rule in self.rules.items()
            for name, item in rule.optimizers().items()
        }

    def state_dict(self) -> dict:
        """The training state core/checkpoint.py saves besides the rules' optimizers and schedulers: the step
        counter and the RL rule's own (the SFT rule keeps none)."""
        return {"updates": self.updates, "rules": {"rl": self.rules["rl"].state_dict()}}

    def load_state_dict(self, state: dict) -> None:
        """Restores what state_dict returned (core/checkpoint.restore)."""
        self.updates = state["updates"]
        self.rules["rl"].load_state_dict(state["rules"]["rl"])

    def step(self) -> StepOutput:
        rule = self.schedule[self.updates % len(self.schedule)]
        self.updates += 1
        output = self.rules[rule].step()
        output.metrics["interleave/is_rl"] = float(rule == "rl")
        return output
