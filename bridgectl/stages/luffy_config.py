"""The luffy stage's config section `luffy.*` and its checks (the update rule: luffy.py, LUFFY, arXiv 2504.14945).
Torch-free: config composition reads it."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from bridgectl.errors import require


@dataclass
class LuffyConfig:
    off_policy: int = 1
    """Off-policy members per group: each prompt's group is rl.num_generations - off_policy rollouts plus this many
    copies of the prompt's demonstration (the reference's n_prefix=1); 0 is the rl stage."""
    gamma: float = 0.1
    """gamma of the policy shaping f(p) = p / (p + gamma) applied to the demonstration tokens' probabilities
    (paper: 0.1)."""
    std_normalize: bool = True
    """Divide each mixed group's centred rewards by their std: true keeps the GRPO form of the paper's equations.
    The paper's runs (its Sec. 4; the released script's algorithm.grpo_use_std=False) drop the std and the length
    normalisation, as Dr. GRPO does: set luffy.std_normalize=false for them. This key decides, not
    rl.scale_rewards (luffy refuses rl.scale_rewards batch and none)."""
    lr: float = 1.0e-4
    """Learning rate of the LUFFY update."""


def check(cfg: DictConfig) -> None:
    """luffy.* values no run could use (checked for every config, whatever its recipe)."""
    luffy = cfg.luffy
    require(
        0 <= luffy.off_policy < cfg.rl.num_generations,
        f"luffy.off_policy must be in [0, rl.num_generations), got {luffy.off_policy} with "
        f"rl.num_generations={cfg.rl.num_generations}",
        "each group keeps at least one on-policy rollout: e.g. luffy.off_policy=1 rl.num_generations=8",
    )
    require(
        luffy.gamma > 0 and luffy.lr > 0,
        "luffy.gamma and luffy.lr must be positive",
        "e.g. luffy.gamma=0.1 luffy.lr=1e-4",
    )


def pairs_demonstrations(cfg: DictConfig) -> bool:
    """Whether a luffy run trains on each RL prompt's own demonstration: only with off-policy group members."""
    return cfg.luffy.off_policy > 0
