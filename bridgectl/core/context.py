"""What every stage is given: the policy, the task's data streams and the config. No recipe logic here."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig

from bridgectl.core import distributed
from bridgectl.core.losses import SFTBatch, make_sft_batch
from bridgectl.core.model import Policy


class CountingStream:
    """An endless data stream that counts what it handed out, so a resumed run can rebuild it from its seed and
    skip exactly that many items (data order and position, without pickling a generator)."""

    def __init__(self, make: Callable[[], Iterator], skip: int = 0) -> None:
        self.consumed = skip
        self._items = itertools.islice(make(), skip, None)

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._items)
        self.consumed += 1
        return item


@dataclass
class TrainContext:
    cfg: DictConfig
    policy: Policy
    task: object
    """The task: eval problems and a `reward(completion, gold)` verifier."""
    device: torch.device
    sampling_generator: torch.Generator
    """Seeded generator for rollout sampling (reproducible runs)."""
    sft_examples: CountingStream
    """Endless SFT problems (question, trace, answer)."""
    rl_problems: CountingStream
    """Endless RL problems (question, gold answer)."""
    rollout_engine: object | None = None
    """The inference engine that samples rollouts (rollout.backend=vllm: core/vllm_rollout.VLLMRollouts); None
    when the trained model samples them itself (hf)."""


def next_sft_batch(ctx: TrainContext) -> SFTBatch:
    """`sft.batch_size` fresh SFT examples, tokenised with the trace and answer as the completion (this rank's
    share of them under data parallelism)."""
    problems = distributed.shard([next(ctx.sft_examples) for _ in range(ctx.cfg.sft.batch_size)])
    return make_sft_batch(ctx.policy.tokenizer, [p.question for p in problems],
                          [p.trace_completion for p in problems], ctx.device)


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
