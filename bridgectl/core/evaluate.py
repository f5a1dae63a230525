"""Greedy pass@1 evaluation of a policy on a task's held-out splits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bridgectl.core.rollout import generate


@dataclass
class SplitResult:
    accuracy: float
    n: int
    mean_length: float  # completion tokens, EOS included
    samples: list[dict]  # a few (prompt, completion, reward) rows for completions.jsonl


def evaluate_split(model, tokenizer, problems, reward_fn, max_new_tokens: int, batch_size: int,
                   n_samples: int = 4) -> SplitResult:
    """Greedy decoding of every problem; accuracy is the mean verifier reward."""
    was_training = model.training
    model.eval()
    rewards, lengths, samples = [], [], []
    with torch.no_grad():
        for start in range(0, len(problems), batch_size):
            chunk = problems[start:start + batch_size]
            rollouts = generate(model, tokenizer, [p.question for p in chunk], max_new_tokens, greedy=True)
            for problem, completion in zip(chunk, rollouts.completions):
                rewards.append(reward_fn(completion, problem.answer))
                if len(samples) < n_samples:
                    samples.append({"prompt": problem.question, "completion": completion,
                                    "reward": rewards[-1], "gold": problem.answer})
            lengths.extend(rollouts.lengths.tolist())
    model.train(was_training)
    return SplitResult(accuracy=sum(rewards) / len(rewards), n=len(rewards),
                       mean_length=sum(lengths) / len(lengths), samples=samples)
