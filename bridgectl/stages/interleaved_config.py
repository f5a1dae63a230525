"""The interleaved stage's config section `interleaved.*` and its checks (the update rule: interleaved.py).
Torch-free: config composition reads it."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from bridgectl.errors import require


@dataclass
class InterleavedConfig:
    rl_steps: int = 1
    """RL updates per cycle of the interleaved stage."""
    sft_steps: int = 1
    """SFT updates per cycle of the interleaved stage."""


def check(cfg: DictConfig) -> None:
    """interleaved.* values no run could use (checked for every config, whatever its recipe)."""
    for key in ("rl_steps", "sft_steps"):
        value = cfg.interleaved[key]
        require(value > 0, f"interleaved.{key} must be positive, got {value}", f"e.g. interleaved.{key}=1")
