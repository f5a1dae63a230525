"""The relift stage's config section `relift.*` and its checks (the update rule: relift.py, ReLIFT, arXiv
2506.07527). Torch-free: config composition reads it."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from bridgectl.errors import require


@dataclass
class ReliftConfig:
    buffer_size: int = 8
    """Hardest prompts (none of their rl.num_generations rollouts rewarded), kept with their demonstrations, that
    start an SFT round: each time the buffer holds this many, the oldest this many are trained on and leave (the
    reference's sft_data_size, 64 for 128 prompts per step; scaled to 8 for rl.prompts_per_step=16)."""
    sft_lr: float = 5.0e-4
    """Learning rate of the SFT updates, which have their own AdamW (the reference's optim.sft.lr, 1e-6 like its RL
    rate; the tiny task's SFT wants ~5e-4). The RL updates use rl.lr."""
    sft_epochs: int = 1
    """Passes over the buffered examples in one SFT round (the reference's sft_epochs=1)."""
    sft_mini_batch_size: int = 0
    """Examples per SFT update within a round (0: all buffer_size of them, one update per epoch, as the reference's
    sft_mini_batch_size = sft_data_size)."""


def check(cfg: DictConfig) -> None:
    """relift.* values no run could use (checked for every config, whatever its recipe)."""
    relift = cfg.relift
    require(
        relift.buffer_size >= 1 and relift.sft_epochs >= 1 and relift.sft_mini_batch_size >= 0 and relift.sft_lr > 0,
        "relift.buffer_size and relift.sft_epochs must be >= 1, "
        "relift.sft_mini_batch_size >= 0 and relift.sft_lr positive",
        "e.g. relift.buffer_size=8 relift.sft_epochs=1 relift.sft_mini_batch_size=0 relift.sft_lr=5e-4",
    )
