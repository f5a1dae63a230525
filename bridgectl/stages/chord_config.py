"""The chord stage's config section `chord.*` and its checks (the update rule: chord.py, CHORD, arXiv
2508.11408). Torch-free: config composition reads it."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from bridgectl.errors import require


@dataclass
class ChordConfig:
    mu_peak: float = 0.5
    """Highest mu, the SFT weight in (1 - mu) L_grpo + mu L_sft (Trinity-RFT's mix_chord.yaml: 0.5)."""
    mu_valley: float = 0.02
    """mu after the decay, kept to the end of the stage (mix_chord.yaml: 0.02)."""
    mu_warmup_steps: int = 50
    """Updates over which mu rises linearly from 0 to mu_peak (mix_chord.yaml: 200; scaled by 1/4 to the
    150-update chord recipe)."""
    mu_decay_steps: int = 100
    """Updates over which mu then falls from mu_peak to mu_valley along a half cosine (mix_chord.yaml: 400; scaled
    by 1/4 likewise)."""
    phi: bool = False
    """CHORD-phi: weight each expert token's NLL by p (1 - p), p the model's probability of that token (detached)."""
    lr: float = 1.0e-4
    """Learning rate of the CHORD update (one optimizer for both terms; the RL rate, since mu starts at 0 and ends
    at the valley, where the update is nearly all GRPO)."""


def check(cfg: DictConfig) -> None:
    """chord.* values no run could use (checked for every config, whatever its recipe)."""
    chord = cfg.chord
    require(
        0 <= chord.mu_peak <= 1 and 0 <= chord.mu_valley <= 1,
        f"chord.mu_peak and chord.mu_valley must be in [0, 1], got {chord.mu_peak} and {chord.mu_valley}",
        "mu weighs SFT against RL in (1 - mu) L_grpo + mu L_sft: e.g. chord.mu_peak=0.5 chord.mu_valley=0.02",
    )
    require(
        chord.mu_warmup_steps >= 0 and chord.mu_decay_steps >= 0 and chord.lr > 0,
        "chord.mu_warmup_steps and chord.mu_decay_steps must be >= 0 and chord.lr positive",
        "e.g. chord.mu_warmup_steps=50 chord.mu_decay_steps=100 chord.lr=1e-4",
    )
