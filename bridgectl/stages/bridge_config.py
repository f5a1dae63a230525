"""The bridge stage's config section `bridge.*` and its checks (the update rule: bridge.py, BRIDGE, arXiv
2509.06948). Torch-free: config composition reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig

from bridgectl.errors import require


@dataclass
class BridgeConfig:
    lower: Optional[str] = None
    """What theta and theta_hat are, which model.finetune decides (the one key for what trains, in every recipe):
    full (the model's weights; the paper) or lora (an adapter of rank lora.rank over one frozen base). null follows
    model.finetune; full or lora must equal it (a mismatch is refused), kept so saved configs and scripts that
    name it still read."""
    lam: float = 0.5
    """lambda in [0, 1]: weight of RL (and of the cooperative gain) against SFT, Eq. 7 (paper: 0.5)."""
    lam_start: Optional[float] = None
    """With lam_end: ramp lambda linearly from lam_start to lam_end over the stage instead of constant lam."""
    lam_end: Optional[float] = None
    """End of the lambda ramp (see lam_start)."""
    alpha: float = 1.0e-4
    """Learning rate of the lower level theta and of the shadow theta_hat (paper's alpha)."""
    beta: float = 1.0e-3
    """Learning rate of the upper-level LoRA adapter w (paper's beta; not reported there)."""
    sft_scale: float = 1.0
    """Multiplies the SFT term at both levels (1 = paper; a deviation for scales where SFT and RL want
    different step sizes)."""
    w_rank: int = 8
    """Rank of the upper-level adapter w."""
    w_alpha: int = 16
    """LoRA alpha of w."""
    shadow: str = "persistent"
    """persistent (Algorithm 2: an RL-only copy trained alongside) or lookahead (Eq. 10: theta + one RL step)."""
    shadow_rollouts: bool = False
    """Also sample the shadow's own rollouts each step and log bridge/reward_gap (costs one more generation)."""
    optimizer: str = "adamw"
    """adamw, or sgd (plain theta -= lr * grad, for exact-update checks)."""
    upper: str = "cooperative"
    """The upper level: cooperative (w on the cooperative gain, Eqs. 11-12, the paper's method), joint (the
    paper's "w/o J_meta" ablation: w on the joint loss (1-lam) L_sft + lam L_rl only, no shadow) or none (no
    adapter w: theta alone on the fused loss)."""


def check(cfg: DictConfig) -> None:
    """bridge.* values no run could use (checked for every config, whatever its recipe), and the rules that hold
    when the recipe has a bridge stage."""
    bridge = cfg.bridge
    for key in ("lam", "lam_start", "lam_end"):
        value = bridge[key]
        require(
            value is None or 0.0 <= value <= 1.0,
            f"bridge.{key} must be in [0, 1], got {value}",
            "lambda weighs RL against SFT: e.g. bridge.lam=0.5",
        )
    require(
        (bridge.lam_start is None) == (bridge.lam_end is None),
        "bridge.lam_start and bridge.lam_end go together",
        "set both for a ramp, e.g. bridge.lam_start=0.2 bridge.lam_end=0.8, or neither",
    )
    require(bridge.alpha > 0, f"bridge.alpha must be positive, got {bridge.alpha}", "e.g. bridge.alpha=1e-4")
    require(
        bridge.beta > 0,
        f"bridge.beta must be positive, got {bridge.beta}",
        "bridge.beta is the learning rate of the LoRA adapter w, e.g. bridge.beta=1e-3 (the KL coefficient is rl.beta)",
    )
    require(
        bridge.lower in (None, "full", "lora"),
        f"unknown bridge.lower '{bridge.lower}'",
        "choose full or lora (or null: model.finetune decides)",
    )
    require(
        bridge.shadow in ("persistent", "lookahead"),
        f"unknown bridge.shadow '{bridge.shadow}'",
        "choose persistent (Algorithm 2) or lookahead (Eq. 10)",
    )
    require(
        bridge.upper in ("cooperative", "joint", "none"),
        f"unknown bridge.upper '{bridge.upper}'",
        "choose cooperative (BRIDGE), joint (w/o the cooperative gain) or none (no upper level)",
    )
    require(
        bridge.upper == "cooperative" or (bridge.shadow == "persistent" and not bridge.shadow_rollouts),
        f"bridge.upper={bridge.upper} has no shadow, so bridge.shadow=lookahead and bridge.shadow_rollouts do "
        "not apply",
        "drop them, or use bridge.upper=cooperative",
    )
    require(
        bridge.optimizer in ("adamw", "sgd"), f"unknown bridge.optimizer '{bridge.optimizer}'", "choose adamw or sgd"
    )
    require(
        not (bridge.shadow_rollouts and bridge.shadow == "lookahead"),
        "bridge.shadow_rollouts needs the persistent shadow",
        "drop bridge.shadow_rollouts or use bridge.shadow=persistent",
    )
    require(
        bridge.w_rank > 0 and bridge.sft_scale >= 0,
        "bridge.w_rank must be positive and bridge.sft_scale >= 0",
        "e.g. bridge.w_rank=8 bridge.sft_scale=1.0",
    )
    require(
        bridge.w_alpha > 0,
        f"bridge.w_alpha must be positive, got {bridge.w_alpha}",
        "w's update is scaled by w_alpha / w_rank: e.g. bridge.w_alpha=16",
    )
    if "bridge" not in cfg.recipe.stages:
        return
    require(
        bridge.lower is None or bridge.lower == cfg.model.finetune,
        f"bridge.lower={bridge.lower} but model.finetune={cfg.model.finetune}: model.finetune alone decides "
        "what trains, theta in BRIDGE included",
        f"set model.finetune={bridge.lower} (and drop bridge.lower, which follows it)",
    )
    if cfg.train.fsdp:
        require(
            cfg.recipe.stages[0] == "bridge" and bridge.shadow == "persistent",
            "train.fsdp runs the bridge stage as the first stage and with bridge.shadow=persistent only (w is "
            "added before sharding; the look-ahead shadow takes an RL gradient that sharded layers do not "
            "reduce)",
            "use bridge.shadow=persistent, or run without train.fsdp (plain data parallelism: --nproc N)",
        )
