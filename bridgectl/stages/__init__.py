"""The stage registry: the one list of training stages that the runner, config composition and validation,
`bridgectl recipes`, checkpoint resume and `bridgectl eval --checkpoint` read.

A stage is its update rule, `<name>.py` in this folder (a subclass of stages/base.Stage, which states the contract:
built as `Stage(ctx, total_updates)`, a `step()` that returns a core.context.StepOutput, the optimizers it owns by
name and its state for checkpoints), its config section and checks, `<name>_config.py` beside it (a dataclass
with a docstring per field, and `check(cfg)`; torch-free), one entry in STAGES below, and a recipe YAML in
conf/recipe/ that lists stages. The entries hold no update code, only where the class lives, its config section,
and what the rest of the tool needs to know about it (named capabilities), so that reading this file (config
composition does, before anything heavy loads) imports neither torch nor the update rules.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

from omegaconf import DictConfig

from bridgectl.core.choices import SCALE_REWARDS
from bridgectl.stages import (
    bridge_config,
    chord_config,
    hpt_config,
    interleaved_config,
    luffy_config,
    mix_config,
    relift_config,
    srft_config,
    uft_config,
)


def always(cfg: DictConfig) -> bool:
    return True


def never(cfg: DictConfig) -> bool:
    return False


@dataclass(frozen=True, kw_only=True)
class StageInfo:
    module: str
    """Module under bridgectl.stages that defines the stage class."""
    cls: str
    """The stage class's name in that module."""
    rule: str
    """Its update rule in one line (bridgectl recipes, docs/methods/index.md)."""
    source: str
    """The paper it comes from (arXiv id) or what it is."""
    samples_rollouts: bool
    """Samples and scores RL rollouts (so it needs the frozen reference model when rl.beta > 0)."""
    needs_traces: bool
    """Trains on the task's reasoning traces (SFT examples, or demonstrations paired with RL prompts)."""
    config: Optional[type] = None
    """The dataclass of its own config section, named as the stage (`bridge.*`); None: it has none (sft and rl
    read the shared sft.* and rl.* sections)."""
    config_summary: str = ""
    """One line on its section (the schema's description of it)."""
    check: Optional[Callable[[DictConfig], None]] = None
    """Its section's checks (and its rules when the recipe runs it): raises UserError for values no run could use."""
    pairs_demonstrations: Callable[[DictConfig], bool] = never
    """Whether, with this config, it trains on each RL prompt's own demonstration, so every RL problem needs a trace
    (checked once, before any weights load: bridgectl/training/setup.build_context)."""
    num_iterations: bool = False
    """Takes rl.num_iterations updates per batch of rollouts (others refuse rl.num_iterations > 1)."""
    dynamic_sampling: bool = False
    """Samples its groups with core/grpo.sample_groups, so rl.filter_groups acts (others refuse it)."""
    own_token_mean: bool = False
    """Its loss is a token mean over its own rows (rollouts and demonstrations), so rl.loss_type must be dapo."""
    scale_rewards: tuple[str, ...] = SCALE_REWARDS
    """The rl.scale_rewards values it honours (others are refused)."""
    scale_rewards_reason: str = ""
    """Why it refuses the others (the error message's reason and hint)."""
    learning_rates: tuple[str, ...] = ()
    """The config keys of the learning rates its updates use (`bridgectl compare` sets them side by side)."""
    fsdp: bool = True
    """Runs with train.fsdp (its processes always run the same sharded passes)."""
    no_fsdp_reason: str = ""
    """Why not, when fsdp is False (the error message's reason)."""


_MIXED_GROUP_SCALING = "it normalises its mixed groups of rollouts and demonstrations itself"

STAGES: dict[str, StageInfo] = {
    "sft": StageInfo(
        module="sft",
        cls="SFTStage",
        samples_rollouts=False,
        needs_traces=True,
        rule="NLL of trace and answer tokens (sft.*)",
        source="supervised fine-tuning",
        learning_rates=("sft.lr",),
    ),
    "rl": StageInfo(
        module="rl",
        cls="RLStage",
        samples_rollouts=True,
        dynamic_sampling=True,
        needs_traces=False,
        rule="GRPO: clipped surrogate with group-normalised advantages (rl.*)",
        source="GRPO, arXiv 2402.03300",
        num_iterations=True,
        learning_rates=("rl.lr",),
    ),
    "interleaved": StageInfo(
        module="interleaved",
        cls="InterleavedStage",
        samples_rollouts=True,
        needs_traces=True,
        dynamic_sampling=True,
        rule="rl_steps RL updates then sft_steps SFT updates, in turn (interleaved.*)",
        source="naive alternating baseline, arXiv 2509.06948",
        num_iterations=True,
        learning_rates=("rl.lr", "sft.lr"),
        config=interleaved_config.InterleavedConfig,
        check=interleaved_config.check,
        config_summary="The alternation pattern of the interleaved stage.",
    ),
    "mix": StageInfo(
        module="mix",
        cls="MixStage",
        samples_rollouts=True,
        dynamic_sampling=True,
        needs_traces=True,
        rule="L_rl + mu L_sft, mu constant or linear (mix.*)",
        source="naive mixing baseline, arXiv 2509.06948",
        num_iterations=True,
        learning_rates=("mix.lr",),
        config=mix_config.MixConfig,
        check=mix_config.check,
        config_summary="Mixed-loss stage settings.",
    ),
    "bridge": StageInfo(
        module="bridge",
        cls="BridgeStage",
        samples_rollouts=True,
        needs_traces=True,
        dynamic_sampling=True,
        rule="bilevel: theta on L_rl + L_sft(w), w on the cooperative gain vs an RL-only shadow (bridge.*)",
        source="BRIDGE, arXiv 2509.06948",
        learning_rates=("bridge.alpha", "bridge.beta"),
        config=bridge_config.BridgeConfig,
        check=bridge_config.check,
        config_summary="BRIDGE (bilevel SFT + RL) settings.",
    ),
    "chord": StageInfo(
        module="chord",
        cls="ChordStage",
        samples_rollouts=True,
        needs_traces=True,
        dynamic_sampling=True,
        rule="(1 - mu) L_grpo + mu L_sft, mu warm-up then cosine decay, optional phi = p(1-p) token weights (chord.*)",
        source="CHORD, arXiv 2508.11408",
        num_iterations=True,
        learning_rates=("chord.lr",),
        config=chord_config.ChordConfig,
        check=chord_config.check,
        config_summary="CHORD stage settings: the mu schedule and the optional phi weighting.",
    ),
    "hpt": StageInfo(
        module="hpt",
        cls="HPTStage",
        samples_rollouts=True,
        needs_traces=True,
        rule="per prompt: GRPO on its rollouts, or SFT on its demonstration when at most hpt.gate are correct (hpt.*)",
        source="HPT, arXiv 2509.04419",
        pairs_demonstrations=always,
        learning_rates=("hpt.lr",),
        config=hpt_config.HPTConfig,
        check=hpt_config.check,
        config_summary="HPT stage settings: the per-prompt switch between GRPO and SFT.",
        fsdp=False,
        no_fsdp_reason="each process switches a different number of its prompts to SFT, so the "
        "processes would run different numbers of sharded forward passes",
    ),
    "luffy": StageInfo(
        module="luffy",
        cls="LuffyStage",
        samples_rollouts=True,
        needs_traces=True,
        rule="GRPO over groups of rollouts + the prompt's demonstration; demonstration tokens shaped "
        "-A p/(p+gamma), unclipped (luffy.*)",
        source="LUFFY, arXiv 2504.14945",
        learning_rates=("luffy.lr",),
        pairs_demonstrations=luffy_config.pairs_demonstrations,
        own_token_mean=True,
        scale_rewards=("group",),
        scale_rewards_reason=_MIXED_GROUP_SCALING + ": luffy.std_normalize=true (std) or false (none) decides",
        config=luffy_config.LuffyConfig,
        check=luffy_config.check,
        config_summary="LUFFY stage settings: demonstrations as off-policy group members, policy shaping.",
    ),
    "srft": StageInfo(
        module="srft",
        cls="SRFTStage",
        samples_rollouts=True,
        needs_traces=True,
        rule="0.5 exp(-H) SFT on demonstrations + demonstrations as off-policy RL + rollouts' signed "
        "NLL, correct ones weighted 0.1 exp(H) (srft.*)",
        source="SRFT, arXiv 2506.19767",
        learning_rates=("srft.lr",),
        pairs_demonstrations=always,
        own_token_mean=True,
        scale_rewards=("group", "none"),
        scale_rewards_reason=_MIXED_GROUP_SCALING,
        config=srft_config.SRFTConfig,
        check=srft_config.check,
        config_summary="SRFT stage settings: the entropy weights of its SFT and RL terms.",
    ),
    "relift": StageInfo(
        module="relift",
        cls="ReliftStage",
        samples_rollouts=True,
        needs_traces=True,
        rule="GRPO each step; prompts with no correct rollout join a buffer with their "
        "demonstrations, one SFT round per buffer_size of them (relift.*)",
        source="ReLIFT, arXiv 2506.07527",
        pairs_demonstrations=always,
        learning_rates=("rl.lr", "relift.sft_lr"),
        config=relift_config.ReliftConfig,
        check=relift_config.check,
        config_summary="ReLIFT stage settings: the buffer of hardest prompts and its SFT rounds.",
    ),
    "uft": StageInfo(
        module="uft",
        cls="UFTStage",
        samples_rollouts=True,
        needs_traces=True,
        rule="GRPO on rollouts continuing a cosine-annealed demonstration prefix + sft_coef NLL of that prefix (uft.*)",
        source="UFT, arXiv 2505.16984",
        pairs_demonstrations=always,
        learning_rates=("uft.lr",),
        config=uft_config.UFTConfig,
        check=uft_config.check,
        config_summary="UFT stage settings: the hint schedule and the hint's log-likelihood term.",
        fsdp=False,
        no_fsdp_reason="a process whose hints are all empty in a step has no hint term to "
        "differentiate, so the processes would run different numbers of "
        "sharded backward passes",
    ),
}


def paired_stage(cfg: DictConfig) -> str | None:
    """The first stage of the recipe that, with this config, trains on each RL prompt's own demonstration."""
    return next((kind for kind in cfg.recipe.stages if STAGES[kind].pairs_demonstrations(cfg)), None)


def stage_class(kind: str) -> type:
    """The class of stage `kind` (imported on first use)."""
    info = STAGES[kind]
    return getattr(importlib.import_module(f"bridgectl.stages.{info.module}"), info.cls)


def build_stage(kind: str, ctx, total_updates: int):
    """A stage of kind `kind` over `ctx` with a budget of `total_updates` steps."""
    return stage_class(kind)(ctx, total_updates)
