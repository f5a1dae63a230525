"""The srft stage's config section `srft.*` and its checks (the update rule: srft.py, SRFT, arXiv
2506.19767). Torch-free: config composition reads it."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from bridgectl.errors import require


@dataclass
class SRFTConfig:
    sft_coef: float = 0.5
    """c in the demonstrations' SFT weight c * exp(-H), H the policy's mean token entropy on that demonstration,
    detached (paper: 0.5)."""
    rl_coef: float = 0.1
    """c in the weight c * exp(H) of a correct rollout's log-likelihood term, H its mean token entropy, detached
    (paper: 0.1)."""
    lr: float = 1.0e-4
    """Learning rate of the SRFT update."""


def check(cfg: DictConfig) -> None:
    """srft.* values no run could use (checked for every config, whatever its recipe)."""
    srft = cfg.srft
    require(
        srft.sft_coef >= 0 and srft.rl_coef >= 0 and srft.lr > 0,
        "srft.sft_coef and srft.rl_coef must be >= 0 and srft.lr positive",
        "e.g. srft.sft_coef=0.5 srft.rl_coef=0.1 srft.lr=1e-4",
    )
