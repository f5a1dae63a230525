"""Greedy pass@1 (and sampled pass@k) evaluation of a policy on a task's held-out splits. Completions come from a
decoder: the model itself (model_decoder) or an inference engine holding the same weights
(core/vllm_rollout.VLLMRollouts.decoder, rollout.backend=vllm)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from bridgectl.core.rollout import Rollouts, generate

Decode = Callable[[list[str], int, Optional[float], Optional[torch.Generator]], Rollouts]
"""decode(prompts, max_new_tokens, temperature, generator): greedy completions when temperature is None, else
samples at that temperature drawn with `generator`."""


def model_decoder(model, tokenizer) -> Decode:
    """Decoding with `model` itself (KV-cached, core/rollout.generate), in eval mode for the duration."""
    def decode(prompts, max_new_tokens, temperature=None, generator=None) -> Rollouts:
        was_training = model.training
        model.eval()
        try:
            return generate(model, tokenizer, prompts, max_new_tokens, temperature=temperature or 1.0,
                            greedy=temperature is None, generator=generator)
        finally:
            model.train(was_training)
    return decode


@dataclass
class SplitResult:
    accuracy: float
    n: int
    mean_length: float  # completion tokens, EOS included
    samples: list[dict]  # a few (prompt, completion, reward) rows for completions.jsonl


def evaluate_split(decode: Decode, problems, rewards_fn, max_new_tokens: int, batch_size: int,
                   n_samples: int = 4) -> SplitResult:
    """Greedy decoding of every problem; accuracy is the mean verifier reward. `rewards_fn(completions, golds)`
    scores a batch."""
    rewards, lengths, samples = [], [], []
    with torch.no_grad():
        for start in range(0, len(problems), batch_size):
            chunk = problems[start:start + batch_size]
            rollouts = decode([p.question for p in chunk], max_new_tokens, None, None)
            chunk_rewards = rewards_fn(rollouts.completions, [p.answer for p in chunk])
            for problem, completion, reward in zip(chunk, rollouts.completions, chunk_rewards):
                rewards.append(reward)
                if len(samples) < n_samples:
                    samples.append({"prompt": problem.question, "completion": completion,
                                    "reward": reward, "gold": problem.answer})
            lengths.extend(rollouts.lengths.tolist())
    return SplitResult(accuracy=sum(rewards) / len(rewards), n=len(rewards),
                       mean_length=sum(lengths) / len(lengths), samples=samples)


@dataclass
class SampledResult:
    pass_at_k: float  # share of problems with at least one correct sample among k
    mean_at_k: float  # mean reward over all k samples of every problem
    k: int
    n: int


def sample_split(decode: Decode, problems, rewards_fn, k: int, temperature: float, max_new_tokens: int,
                 batch_size: int, generator: torch.Generator | None = None) -> SampledResult:
    """k samples per problem at `temperature`: pass@k (with n = k samples, the share of problems solved at least
    once) and mean@k (the mean reward of all samples)."""
    solved, total_reward = 0, 0.0
    per_batch = max(1, batch_size // k)
    with torch.no_grad():
        for start in range(0, len(problems), per_batch):
            chunk = problems[start:start + per_batch]
            rollouts = decode([p.question for p in chunk for _ in range(k)], max_new_tokens, temperature, generator)
            rewards = torch.tensor(rewards_fn(rollouts.completions, [p.answer for p in chunk for _ in range(k)]))
            by_problem = rewards.view(len(chunk), k)
            solved += int((by_problem.max(dim=1).values > 0).sum())
            total_reward += float(by_problem.sum())
    return SampledResult(pass_at_k=solved / len(problems), mean_at_k=total_reward / (len(problems) * k), k=k,
                         n=len(problems))


def evaluate_all(ctx, eval_problems: dict) -> dict:
    """{split: SplitResult} for every eval split of the task."""
    cfg = ctx.cfg.eval
    with decoding(ctx) as decode:
        return {split: evaluate_split(decode, problems, ctx.task.rewards, cfg.max_new_tokens, cfg.batch_size)
                for split, problems in eval_problems.items()}


@contextlib.contextmanager
def decoding(ctx):
    """What decodes a run's evaluations: the engine that samples its rollouts (rollout.backend=vllm), else the
    policy itself with LoRA merged (generation is faster, results the same)."""
    if ctx.rollout_engine is not None:
        yield ctx.rollout_engine.decoder(ctx.policy)
    else:
        with ctx.policy.merged_for_generation() as model:
            yield model_decoder(model, ctx.policy.tokenizer)


def eval_metrics(results: dict) -> dict:
    metrics = {}
    for split, result in results.items():
        metrics[f"eval/{split}/accuracy"] = result.accuracy
        metrics[f"eval/{split}/response_len"] = result.mean_length
    return metrics
