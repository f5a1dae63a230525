"""The uft stage's config section `uft.*` and its checks (the update rule: uft.py, UFT, arXiv 2505.16984).
Torch-free: config composition reads it."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from bridgectl.errors import require


@dataclass
class UFTConfig:
    hint_start: float = 0.95
    """p at the first update: the expected share of each demonstration given as a hint (the reference's
    upper_prob=0.95)."""
    hint_end: float = 0.05
    """p at the end of the hint phase, reached along a half cosine (lower_prob=0.05); no hint after the phase."""
    hint_fraction_of_steps: float = 0.6
    """Share of the stage's updates that give hints (the reference's T_hint / T = 300 / 500); 0: never."""
    hint_chunks: int = 5
    """Equal token spans a demonstration is cut into (fewer when it is shorter); each is revealed with probability p,
    so a hint is a Binomial(hint_chunks, p) number of spans (the reference's min(5, len(hint)))."""
    sft_coef: float = 0.001
    """Weight of the hint tokens' NLL, -log pi(hint | question), added to the GRPO loss (the reference's
    sft_loss_coef=0.001)."""
    lr: float = 1.0e-4
    """Learning rate of the UFT update (the reference's 1e-6 on 0.5-3B models; the tiny task's RL rate)."""


def check(cfg: DictConfig) -> None:
    """uft.* values no run could use (checked for every config, whatever its recipe), and what the stage cannot
    honour when the recipe runs it."""
    uft = cfg.uft
    require(
        all(0 <= uft[key] <= 1 for key in ("hint_start", "hint_end", "hint_fraction_of_steps")),
        f"uft.hint_start, uft.hint_end and uft.hint_fraction_of_steps must be in [0, 1], got {uft.hint_start}, "
        f"{uft.hint_end} and {uft.hint_fraction_of_steps}",
        "they are shares of a demonstration and of the stage: e.g. uft.hint_start=0.95 uft.hint_end=0.05 "
        "uft.hint_fraction_of_steps=0.6",
    )
    require(
        uft.hint_chunks >= 1 and uft.sft_coef >= 0 and uft.lr > 0,
        "uft.hint_chunks must be >= 1, uft.sft_coef >= 0 and uft.lr positive",
        "e.g. uft.hint_chunks=5 uft.sft_coef=0.001 uft.lr=1e-4",
    )
    if "uft" in cfg.recipe.stages:
        require(
            cfg.rl.multi_objective_aggregation == "sum_then_normalize",
            "rl.multi_objective_aggregation=normalize_then_sum does not apply to the uft stage (it scores hint + "
            "completion again and makes its own advantages)",
            "drop rl.multi_objective_aggregation with uft",
        )
