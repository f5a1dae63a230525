"""Greedy pass@1 (and sampled pass@k) evaluation of a policy on a task's held-out splits. Completions come from a
decoder: the model itself (model_decoder) or an inference engine holding the same weights
(core/vllm_rollout.VLLMRollouts.decoder, rollout.backend=vllm)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from bridgectl.core.rollout import Rollouts, generate

Decode = Callable[[list[str], int, Optional[float], Optional[torch.Generator]], Rollouts]
"""decode(prompts, max_new_tokens, temperature, generator): greedy completions when temperature is None, else
samples at that temperature drawn with `generator`."""


def model_decoder(model, tokenizer, end_ids: Collection[int] | None = None, pack_weights: bool = True) -> Decode:
    """Decoding with `model` itself (KV-cached, core/rollout.generate), in eval mode for the duration, stopping a
    row at any of `end_ids` (the policy's end_tokens.ids, as its rollouts stop; default the tokenizer's EOS);
    `pack_weights`: rollout.cpu_packed_weights (core/packed_linear.py)."""

    def decode(prompts, max_new_tokens, temperature=None, generator=None) -> Rollouts:
        was_training = model.training
        model.eval()
        try:
            return generate(
                model,
                tokenizer,
                prompts,
                max_new_tokens,
                temperature=temperature or 1.0,
                greedy=temperature is None,
                generator=generator,
                end_ids=end_ids,
                pack_weights=pack_weights,
            )
        finally:
            model.train(was_training)

    return decode


@dataclass
class SplitResult:
    accuracy: float
    n: int
    mean_length: float  # completion tokens, end token included
    samples: list[dict]  # a few (prompt, completion, reward) rows for completions.jsonl
    rewards: list[float] = field(default_factory=list)  # per problem, in the split's order (eval_problems.jsonl)
    problems: str = ""  # fingerprint of the split's questions: runs with equal fingerprints can be paired
    sampled: Optional[SampledResult] = None  # with eval.k > 0: pass@k, maj@k, mean@n from sampled answers
    completions: list[str] = field(default_factory=list)  # every greedy answer, in the split's order


def problems_fingerprint(problems) -> str:
    """A short hash of a split's questions in order: two evaluations saw the same problems exactly when it matches."""
    digest = hashlib.sha256()
    for problem in problems:
        digest.update(problem.question.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def evaluate_split(
    decode: Decode, problems, rewards_fn, max_new_tokens: int, batch_size: int, n_samples: int = 4
) -> SplitResult:
    """Greedy decoding of every problem; accuracy is the mean verifier reward. `rewards_fn(completions, golds)`
    scores a batch."""
    rewards, lengths, samples, completions = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            rollouts = decode([p.question for p in chunk], max_new_tokens, None, None)
            completions.extend(rollouts.completions)
            chunk_rewards = rewards_fn(rollouts.completions, [p.answer for p in chunk])
            for problem, completion, reward in zip(chunk, rollouts.completions, chunk_rewards):
                rewards.append(reward)
                if len(samples) < n_samples:
                    samples.append(
                        {"prompt": problem.question, "completion": completion, "reward": reward, "gold": problem.answer}
                    )
            lengths.extend(rollouts.lengths.tolist())
    return SplitResult(
        accuracy=sum(rewards) / len(rewards),
        n=len(rewards),
        mean_length=sum(lengths) / len(lengths),
        samples=samples,
        rewards=list(rewards),
        problems=problems_fingerprint(problems),
        completions=completions,
    )


# ---- sampled evaluation: pass@k, maj@k, mean@n ------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c are correct (Chen et al. 2021, arXiv
    2107.03374, eq. 1): 1 - C(n-c, k) / C(n, k), the chance that k of the n samples drawn without replacement
    include a correct one; computed as a product so that large n does not overflow. With k = n it is plain
    any-of-n."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n (k={k}, n={n})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def reported_ks(k: int) -> list[int]:
    """The k of a pass@k curve up to `k`: 1, 2, 4, ... and k itself."""
    ks, j = [], 1
    while j < k:
        ks.append(j)
        j *= 2
    return ks + [k]


def majority_correct(answers: list, rewards: list[float]) -> float:
    """maj@k of one problem from its k samples: the reward of the answer given most often (ties: the one given
    first), samples with no answer not voting; 0 when none has an answer. The answer's reward is that of its first
    sample (equal answers score equally)."""
    counts: dict = {}
    for answer, reward in zip(answers, rewards):
        if answer is not None:
            count, first_reward = counts.get(answer, (0, reward))
            counts[answer] = (count + 1, first_reward)
    if not counts:
        return 0.0
    return max(counts.values(), key=lambda entry: entry[0])[1]  # max keeps the first of equal counts


@dataclass
class SampledResult:
    n_samples: int  # samples per problem
    k: int  # largest k reported
    correct: list[int]  # per problem: how many of its n samples were right (reward > 0)
    majority: dict[int, list[float]]  # j -> per problem maj@j over its first j samples
    mean_reward: float  # mean@n: the mean reward of all samples (an estimate of sampled pass@1)

    def metrics(self) -> dict[str, float]:
        """pass@j (unbiased, from all n samples), maj@j (first j samples) for j in reported_ks(k); mean@n."""
        out = {}
        for j in reported_ks(self.k):
            out[f"pass@{j}"] = float(np.mean([pass_at_k(self.n_samples, c, j) for c in self.correct]))
            out[f"maj@{j}"] = float(np.mean(self.majority[j]))
        out[f"mean@{self.n_samples}"] = self.mean_reward
        return out


def sample_split(
    decode: Decode,
    problems,
    rewards_fn,
    answer_fn,
    k: int,
    n_samples: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> SampledResult:
    """`n_samples` (>= k) samples per problem at `temperature`, scored by `rewards_fn`; `answer_fn(completion)` is
    the final answer that maj@k votes on (None: no answer)."""
    if not 1 <= k <= n_samples:
        raise ValueError(f"sampled evaluation needs 1 <= k <= samples (k={k}, samples={n_samples})")
    correct, majority, total_reward = [], {j: [] for j in reported_ks(k)}, 0.0
    per_batch = max(1, batch_size // n_samples)
    with torch.no_grad():
        for start in range(0, len(problems), per_batch):
            chunk = problems[start : start + per_batch]
            rollouts = decode(
                [p.question for p in chunk for _ in range(n_samples)], max_new_tokens, temperature, generator
            )
            rewards = rewards_fn(rollouts.completions, [p.answer for p in chunk for _ in range(n_samples)])
            for index in range(len(chunk)):
                own = slice(index * n_samples, (index + 1) * n_samples)
                problem_rewards, completions = rewards[own], rollouts.completions[own]
                correct.append(sum(1 for r in problem_rewards if r > 0))
                total_reward += sum(problem_rewards)
                answers = [answer_fn(c) for c in completions]
                for j in majority:
                    majority[j].append(majority_correct(answers[:j], problem_rewards[:j]))
    return SampledResult(
        n_samples=n_samples,
        k=k,
        correct=correct,
        majority=majority,
        mean_reward=total_reward / (len(problems) * n_samples),
    )


def evaluate_all(ctx, eval_problems: dict, step: int = 0) -> dict:
    """{split: SplitResult} for every eval split of the task; with eval.k > 0 each also carries its sampled
    evaluation, drawn from a generator seeded by the run's seed and `step` (so a resumed run samples as an
    uninterrupted one, and training's own random streams are untouched)."""
    with decoding(ctx) as decode:
        return {
            split: evaluate_problems(
                decode, problems, ctx.task, ctx.cfg.eval, ctx.device, sample_seed=ctx.cfg.seed * 1_000_003 + step
            )
            for split, problems in eval_problems.items()
        }


def evaluate_problems(decode: Decode, problems, task, eval_cfg, device: torch.device, sample_seed: int) -> SplitResult:
    """Greedy evaluation of `problems` and, with eval.k > 0, the sampled one (eval.samples answers per problem at
    eval.temperature, drawn from a generator seeded with `sample_seed`): what training evaluations and
    `bridgectl eval` both compute for a split."""
    result = evaluate_split(decode, problems, task.rewards, eval_cfg.max_new_tokens, eval_cfg.batch_size)
    if eval_cfg.k > 0:
        result.sampled = sample_split(
            decode,
            problems,
            task.rewards,
            task.answer_of,
            eval_cfg.k,
            eval_cfg.samples or eval_cfg.k,
            eval_cfg.temperature,
            eval_cfg.max_new_tokens,
            eval_cfg.batch_size,
            torch.Generator(device=device).manual_seed(sample_seed),
        )
    return result


@contextlib.contextmanager
def decoding(ctx):
    """What decodes a run's evaluations: the engine that samples its rollouts (rollout.backend=vllm), else the
    policy itself with LoRA merged (generation is faster, results the same)."""
    if ctx.rollout_engine is not None:
        yield ctx.rollout_engine.decoder(ctx.policy)
    else:
        with ctx.policy.merged_for_generation() as model:
            yield model_decoder(
                model, ctx.policy.tokenizer, ctx.policy.end_tokens.ids, ctx.cfg.rollout.cpu_packed_weights
            )


def eval_metrics(results: dict) -> dict:
    metrics = {}
    for split, result in results.items():
        metrics[f"eval/{split}/accuracy"] = result.accuracy
        metrics[f"eval/{split}/response_len"] = result.mean_length
        if result.sampled is not None:
            metrics.update({f"eval/{split}/{name}": value for name, value in result.sampled.metrics().items()})
    return metrics


def problem_records(results: dict) -> list[dict]:
    """One eval_problems.jsonl row per split: the split's fingerprint and each problem's greedy reward, in order
    (and with eval.k, each problem's count of correct samples out of n and its maj@k), so that `bridgectl compare`
    can pair runs problem by problem."""
    rows = []
    for split, result in results.items():
        row = {"split": split, "problems": result.problems, "rewards": [_compact(r) for r in result.rewards]}
        if result.sampled is not None:
            row.update(
                samples=result.sampled.n_samples,
                correct=result.sampled.correct,
                **{f"maj@{result.sampled.k}": [_compact(r) for r in result.sampled.majority[result.sampled.k]]},
            )
        rows.append(row)
    return rows


def _compact(value: float):
    """1.0 -> 1: a verifier's 0/1 rewards take one character each in the file."""
    return int(value) if float(value).is_integer() else round(float(value), 6)
