"""The mix stage's config section `mix.*` and its checks (the update rule: mix.py). Torch-free: config
composition reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig

from bridgectl.errors import require


@dataclass
class MixConfig:
    mu: float = 0.5
    """Weight of the SFT loss in L_rl + mu * L_sft (start value when mu_end is set)."""
    mu_end: Optional[float] = None
    """When set, mu decays linearly from mu to mu_end over the stage."""
    lr: float = 2.0e-4
    """Learning rate of the mixed update."""


def check(cfg: DictConfig) -> None:
    """mix.* values no run could use (checked for every config, whatever its recipe)."""
    mix = cfg.mix
    require(
        mix.mu >= 0 and (mix.mu_end is None or mix.mu_end >= 0) and mix.lr > 0,
        "mix.mu and mix.mu_end must be >= 0 and mix.lr positive",
        "e.g. mix.mu=0.5 mix.mu_end=0.05 mix.lr=2e-4",
    )
