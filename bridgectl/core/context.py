"""What every stage is given (TrainContext: the policy, the task's data streams and the config) and the plain
helpers around it (seeding, the device, SFT and demonstration batches). Building one for a recipe is
bridgectl/training/setup.py's job: the core knows no recipe."""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from omegaconf import DictConfig

from bridgectl.core import distributed
from bridgectl.core.losses import SFTBatch, make_sft_batch
from bridgectl.core.model import Policy
from bridgectl.errors import UserError


class CountingStream:
    """An endless data stream that counts what it handed out, so a resumed run can rebuild it from its seed and
    skip exactly that many items (data order and position, without pickling a generator), and how often it handed
    out each distinct problem (by its question), so a comparison can say whether two runs saw the same data."""

    def __init__(self, make: Callable[[], Iterator], skip: int = 0) -> None:
        self.consumed = 0
        self.uses: collections.Counter = collections.Counter()
        self._items = iter(make())
        for _ in range(skip):  # replayed, and counted as the interrupted run counted them
            next(self)

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._items)
        self.consumed += 1
        self.uses[getattr(item, "question", item)] += 1
        return item

    def usage(self) -> dict:
        """Items handed out, distinct problems among them, and how many times the most used one was."""
        return {"used": self.consumed, "distinct": len(self.uses), "max_uses": max(self.uses.values(), default=0)}


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


def require_paired_demonstrations(ctx: TrainContext, stage: str) -> None:
    """Stages that train on each RL prompt's own demonstration (luffy, relift, hpt, srft, uft) need every RL
    problem to carry a trace: the built-in task writes one for any problem, dataset tasks read the trace field of
    the same row. Exits 2 (UserError) before any training otherwise."""
    check_paired_demonstrations(ctx.task, ctx.cfg, stage)


def check_paired_demonstrations(task, cfg: DictConfig, stage: str) -> None:
    if not getattr(task, "rl_has_traces", False):
        raise UserError(
            f"stage '{stage}' trains on each RL prompt's own demonstration, but task {cfg.task.name} "
            "has RL problems without a trace",
            "use RL data whose rows carry a worked solution (task.trace_field names it; gsm8k answers "
            "and math solutions are traces), or a recipe without paired demonstrations (rl, mix, bridge)",
        )


def demonstration_batch(ctx: TrainContext, problems: list) -> SFTBatch:
    """The demonstrations (trace and answer) of `problems` as an SFT batch: prompt = the problem's question,
    completion = its trace_completion, tokenised as SFT examples are (ending with the policy's target end token)."""
    return make_sft_batch(
        ctx.policy.tokenizer,
        [p.question for p in problems],
        [p.trace_completion for p in problems],
        ctx.device,
        end_id=ctx.policy.end_tokens.target,
    )


def next_sft_batch(ctx: TrainContext) -> SFTBatch:
    """`sft.batch_size` fresh SFT examples, tokenised with the trace and answer as the completion (this rank's
    share of them under data parallelism), ending with the policy's target end token (core/end_tokens)."""
    problems = distributed.shard([next(ctx.sft_examples) for _ in range(ctx.cfg.sft.batch_size)])
    return make_sft_batch(
        ctx.policy.tokenizer,
        [p.question for p in problems],
        [p.trace_completion for p in problems],
        ctx.device,
        end_id=ctx.policy.end_tokens.target,
    )


@dataclass
class StepOutput:
    metrics: dict
    """Metric name -> value for metrics.jsonl (the names docs/guides/run-directory.md lists)."""
    train_tokens: int = 0
    """Completion tokens that received a gradient."""
    gen_tokens: int = 0
    """Tokens sampled for rollouts."""
    completions: list[dict] = field(default_factory=list)
    """Sampled rollouts for completions.jsonl (prompt, completion, reward)."""


def pick_device(name: str) -> torch.device:
    """auto: CUDA when available; under data parallelism each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", distributed.local_rank()) if name == "cuda" else torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
