"""The hpt stage's config section `hpt.*` and its checks (the update rule: hpt.py, HPT, arXiv 2509.04419).
Torch-free: config composition reads it."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from bridgectl.errors import require


@dataclass
class HPTConfig:
    gate: int = 0
    """A prompt with at most this many correct rollouts (of rl.num_generations) trains on its own demonstration
    (SFT) instead of GRPO (the reference's SWITCH_GATE=0); -1: never, which is the rl stage."""
    sft_coef: float = 1.0
    """Weight of the SFT term in L_grpo(other prompts) + sft_coef * L_sft(demonstrations) (SFT_LOSS_COEF=1.0)."""
    lr: float = 1.0e-4
    """Learning rate of the HPT update (one optimizer for both terms)."""


def check(cfg: DictConfig) -> None:
    """hpt.* values no run could use (checked for every config, whatever its recipe)."""
    hpt = cfg.hpt
    require(
        hpt.gate >= -1 and hpt.sft_coef >= 0 and hpt.lr > 0,
        "hpt.gate must be >= -1, hpt.sft_coef >= 0 and hpt.lr positive",
        "e.g. hpt.gate=0 (SFT for prompts none of whose rollouts is correct) hpt.sft_coef=1.0 hpt.lr=1e-4",
    )
