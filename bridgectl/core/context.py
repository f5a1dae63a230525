"""What every stage is given: the policy, the task's data streams and the config. No recipe logic here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from omegaconf import DictConfig

from bridgectl.core.model import Policy


@dataclass
class TrainContext:
    cfg: DictConfig
    policy: Policy
    task: object
    """The task: eval problems and a `reward(completion, gold)` verifier."""
    device: torch.device
    sampling_generator: torch.Generator
    """Seeded generator for rollout sampling (reproducible runs)."""
    sft_examples: Iterator
    """Endless SFT problems (question, trace, answer)."""
    rl_problems: Iterator
    """Endless RL problems (question, gold answer)."""


@dataclass
class StepOutput:
    metrics: dict
    """Metric name -> value for metrics.jsonl (names from shared/design.md)."""
    train_tokens: int = 0
    """Completion tokens that received a gradient."""
    gen_tokens: int = 0
    """Tokens sampled for rollouts."""
    completions: list[dict] = field(default_factory=list)
    """Sampled rollouts for completions.jsonl (prompt, completion, reward)."""
