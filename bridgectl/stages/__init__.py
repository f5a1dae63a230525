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
    pairs_demonstrations: bool = False
    """Trains on each RL prompt's own demonstration, so every RL problem needs a trace (checked before loading
    weights: core/context.build_context)."""


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
    "chord": StageInfo("chord", "ChordStage", True, True,
                       "(1 - mu) L_grpo + mu L_sft, mu warm-up then cosine decay, optional phi = p(1-p) token "
                       "weights (chord.*)", "CHORD, arXiv 2508.11408"),
    "hpt": StageInfo("hpt", "HPTStage", True, True,
                     "per prompt: GRPO on its rollouts, or SFT on its demonstration when at most hpt.gate are "
                     "correct (hpt.*)", "HPT, arXiv 2509.04419", pairs_demonstrations=True),
    "luffy": StageInfo("luffy", "LuffyStage", True, True,
                       "GRPO over groups of rollouts + the prompt's demonstration; demonstration tokens shaped "
                       "-A p/(p+gamma), unclipped (luffy.*)", "LUFFY, arXiv 2504.14945", pairs_demonstrations=True),
    "srft": StageInfo("srft", "SRFTStage", True, True,
                      "0.5 exp(-H) SFT on demonstrations + demonstrations as off-policy RL + rollouts' signed NLL, "
                      "correct ones weighted 0.1 exp(H) (srft.*)", "SRFT, arXiv 2506.19767", pairs_demonstrations=True),
    "relift": StageInfo("relift", "ReliftStage", True, True,
                        "GRPO each step; prompts with no correct rollout join a buffer with their demonstrations, "
                        "one SFT round per buffer_size of them (relift.*)", "ReLIFT, arXiv 2506.07527",
                        pairs_demonstrations=True),
    "uft": StageInfo("uft", "UFTStage", True, True,
                     "GRPO on rollouts continuing a cosine-annealed demonstration prefix + sft_coef NLL of that "
                     "prefix (uft.*)", "UFT, arXiv 2505.16984", pairs_demonstrations=True),
}


def stage_class(kind: str) -> type:
    """The class of stage `kind` (imported on first use)."""
    info = STAGES[kind]
    return getattr(importlib.import_module(f"bridgectl.stages.{info.module}"), info.cls)


def build_stage(kind: str, ctx, total_updates: int):
    """A stage of kind `kind` over `ctx` with a budget of `total_updates` steps."""
    return stage_class(kind)(ctx, total_updates)
