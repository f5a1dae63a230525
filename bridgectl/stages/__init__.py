"""The stage registry: the one list of training stages that the runner, config validation, `bridgectl recipes`,
checkpoint resume and `bridgectl eval --checkpoint` read.

A stage is one file in this folder (a class built as `Stage(ctx, total_updates)` with a `step()` that returns a
core.context.StepOutput) plus one entry in STAGES below; a recipe is a YAML file in conf/recipe/ that lists stages.
The entries hold no code, only where the class lives and what the rest of the tool needs to know about it, so
that reading this file (config validation does, before anything heavy loads) imports neither torch nor the stages.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class StageInfo:
    module: str
    """Module under bridgectl.stages that defines the stage class."""
    cls: str
    """The stage class's name in that module."""
    samples_rollouts: bool
    """Samples and scores RL rollouts (so it needs the frozen reference model when rl.beta > 0)."""
    needs_traces: bool
    """Trains on the task's reasoning traces (SFT examples, or demonstrations paired with RL prompts)."""
    rule: str
    """Its update rule in one line (bridgectl recipes, the README's recipe table)."""
    source: str
    """The paper it comes from (arXiv id) or what it is."""


STAGES: dict[str, StageInfo] = {
    "sft": StageInfo("sft", "SFTStage", False, True,
                     "NLL of trace and answer tokens (sft.*)", "supervised fine-tuning"),
    "rl": StageInfo("rl", "RLStage", True, False,
                    "GRPO: clipped surrogate with group-normalised advantages (rl.*)", "GRPO, arXiv 2402.03300"),
    "interleaved": StageInfo("interleaved", "InterleavedStage", True, True,
                             "rl_steps RL updates then sft_steps SFT updates, in turn (interleave.*)",
                             "naive alternating baseline, arXiv 2509.06948"),
    "mix": StageInfo("mix", "MixStage", True, True,
                     "L_rl + mu L_sft, mu constant or linear (mix.*)", "naive mixing baseline, arXiv 2509.06948"),
    "bridge": StageInfo("bridge", "BridgeStage", True, True,
                        "bilevel: theta on L_rl + L_sft(w), w on the cooperative gain vs an RL-only shadow "
                        "(bridge.*)", "BRIDGE, arXiv 2509.06948"),
}


def stage_class(kind: str) -> type:
    """The class of stage `kind` (imported on first use)."""
    info = STAGES[kind]
    return getattr(importlib.import_module(f"bridgectl.stages.{info.module}"), info.cls)


def build_stage(kind: str, ctx, total_updates: int):
    """A stage of kind `kind` over `ctx` with a budget of `total_updates` steps."""
    return stage_class(kind)(ctx, total_updates)
