"""Built-in reasoning task `arith`: multi-step modular arithmetic with step-by-step traces.

A problem is a chain of single-digit operands joined by `+ - *` with the usual precedence, where every
intermediate result is reduced modulo `task.modulus` (10 by default):

    question   4+9*3-5*3=
    trace      9*3=7;5*3=5;4+7=1;1-5=6;#6      (products first, then left to right)
    direct     #6

Why modular: each trace step is one of a few hundred single-digit facts, while a direct answer needs the whole
composition. So a model that sometimes writes traces gets more right with them than without, which is what lets
RL from the base ("RL-zero") discover something (measured while designing the task: on natural arithmetic,
traces were no better than direct answers and RL stayed flat; docs/quickstart.md's "The built-in task and model" has
the measured base accuracies).

Splits are fixed by a hash of the question text, so they never overlap whatever the seed:
  - `test` bucket (10% of questions): greedy evaluation only, never seen in pretraining, SFT or RL;
  - `sft` bucket (45%): SFT examples (question, trace, answer);
  - `rl` bucket (45%): RL prompts (question, gold answer), disjoint from the SFT questions.
Evaluation splits: `test` draws test-bucket questions with `task.test_ops` operations; `ood` draws test-bucket
questions with `task.ood_ops` operations (longer than anything SFT or RL trains on).

The reward is 1 for a correct final answer and 0 otherwise (no format reward, as in the paper), from a verifier
that reads the last `#<integer>` marker out of free text. Reward functions of your own (task.reward_funcs,
tasks/rewards.py) receive each problem's question, answer and trace as keyword arguments.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Iterator

from bridgectl.tasks.rewards import StepReward

OPERATORS = "+-*"
TEST_BUCKETS = range(0, 10)  # hash buckets (of 100) held out for evaluation
SFT_BUCKETS = range(10, 55)
RL_BUCKETS = range(55, 100)
ANSWER_MARK = "#"
EVAL_SEED = 1234  # eval problems are the same for every run, whatever its seed


@dataclass(frozen=True)
class Problem:
    question: str  # e.g. "4+9*3-5*3=" (the prompt, ending in "=")
    trace: str  # e.g. "9*3=7;5*3=5;4+7=1;1-5=6;"
    answer: str  # e.g. "6"
    n_ops: int

    conversation = None  # reward functions get the question text as the prompt (tasks/rewards.py)

    @property
    def columns(self) -> dict:
        """The fields reward functions receive as keyword arguments (task.reward_funcs; tasks/rewards.py)."""
        return {"question": self.question, "answer": self.answer, "trace": self.trace}

    @property
    def trace_completion(self) -> str:
        return f"{self.trace}{ANSWER_MARK}{self.answer}"

    @property
    def direct_completion(self) -> str:
        return f"{ANSWER_MARK}{self.answer}"


def solve(operands: list[int], operators: list[str], modulus: int) -> tuple[str, int]:
    """Evaluates with precedence (all `*` first, left to right, then `+`/`-` left to right), reducing every
    intermediate result mod `modulus`. Returns the trace (one `a op b=c;` per operation) and the answer."""
    steps: list[str] = []
    values, pending_ops = [operands[0]], []
    for op, operand in zip(operators, operands[1:]):
        if op == "*":
            product = (values[-1] * operand) % modulus
            steps.append(f"{values[-1]}*{operand}={product};")
            values[-1] = product
        else:
            values.append(operand)
            pending_ops.append(op)
    result = values[0]
    for op, operand in zip(pending_ops, values[1:]):
        new = (result + operand) % modulus if op == "+" else (result - operand) % modulus
        steps.append(f"{result}{op}{operand}={new};")
        result = new
    return "".join(steps), result


def bucket_of(question: str) -> int:
    """Stable hash bucket in [0, 100) (Python's hash() is salted per process, crc32 is not)."""
    return zlib.crc32(question.encode()) % 100


def random_problem(rng: random.Random, n_ops: int, modulus: int, max_operand: int) -> Problem:
    operands = [rng.randint(1, max_operand) for _ in range(n_ops + 1)]
    operators = [rng.choice(OPERATORS) for _ in range(n_ops)]
    question = "".join(f"{a}{op}" for a, op in zip(operands, operators)) + f"{operands[-1]}="
    trace, answer = solve(operands, operators, modulus)
    return Problem(question=question, trace=trace, answer=str(answer), n_ops=n_ops)


def extract_answer(text: str) -> int | None:
    """The integer after the last answer mark (`#7`, `# 7`, `#### -12`) in free text, or None."""
    matches = re.findall(r"#+\s*(-?\d+)", text)
    return int(matches[-1]) if matches else None


def reward(completion: str, gold: str) -> float:
    """1.0 when the extracted final answer equals the gold answer, else 0.0 (no format reward)."""
    predicted = extract_answer(completion)
    return float(predicted is not None and predicted == int(gold))


class ArithTask:
    """Deterministic generators for every split of the `arith` task, configured by `TaskConfig`."""

    rl_has_traces = True  # every problem's trace is computed with it (solve)

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.modulus = cfg.modulus
        self.max_operand = cfg.max_operand
        self.step_reward = StepReward(self, cfg)
        """The reward RL trains on: the verifier, or task.reward_funcs' weighted sum (tasks/rewards.py)."""

    # ---- sampling from a hash bucket -------------------------------------------------------------------
    def _stream(self, rng: random.Random, ops_range, buckets) -> Iterator[Problem]:
        low, high = ops_range
        while True:
            problem = random_problem(rng, rng.randint(low, high), self.modulus, self.max_operand)
            if bucket_of(problem.question) in buckets:
                yield problem

    def sft_examples(self, seed: int) -> Iterator[Problem]:
        """Endless SFT examples (question, trace, answer) from the `sft` bucket."""
        return self._stream(random.Random(f"sft-{seed}"), self.cfg.train_ops, SFT_BUCKETS)

    def rl_prompts(self, seed: int) -> Iterator[Problem]:
        """Endless RL problems (question, gold answer) from the `rl` bucket, disjoint from the SFT questions."""
        return self._stream(random.Random(f"rl-{seed}"), self.cfg.train_ops, RL_BUCKETS)

    def pretrain_problems(self, seed: int) -> Iterator[Problem]:
        """Pretraining text: any question outside the test bucket (1-op facts are always allowed: they are the
        steps every trace is made of)."""
        rng = random.Random(f"pretrain-{seed}")
        low, high = self.cfg.pretrain_ops
        while True:
            problem = random_problem(rng, rng.randint(low, high), self.modulus, self.max_operand)
            if problem.n_ops == 1 or bucket_of(problem.question) not in TEST_BUCKETS:
                yield problem

    def eval_problems(self, split: str, n: int) -> list[Problem]:
        """`n` distinct held-out problems of a split, identical for every run."""
        ops_range = {"test": self.cfg.test_ops, "ood": self.cfg.ood_ops}[split]
        rng = random.Random(f"eval-{split}-{EVAL_SEED}")
        seen: dict[str, Problem] = {}
        for attempt, problem in enumerate(self._stream(rng, ops_range, TEST_BUCKETS)):
            seen.setdefault(problem.question, problem)
            if len(seen) == n:
                return list(seen.values())
            if attempt > 50 * n:  # the held-out space of this many operations is smaller than n
                raise ValueError(
                    f"only {len(seen)} distinct held-out '{split}' problems exist with "
                    f"{ops_range} operations; ask for fewer (eval.n) or more operations"
                )
        raise AssertionError("unreachable")

    @staticmethod
    def reward(completion: str, gold: str) -> float:
        return reward(completion, gold)

    @staticmethod
    def rewards(completions: list[str], golds: list[str]) -> list[float]:
        return [reward(completion, gold) for completion, gold in zip(completions, golds)]

    @staticmethod
    def answer_of(completion: str) -> int | None:
        """The final answer a completion gives (what maj@k votes on)."""
        return extract_answer(completion)

    SPLITS = ("test", "ood")

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return self.SPLITS
