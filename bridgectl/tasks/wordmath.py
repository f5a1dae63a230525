"""Built-in task `wordmath`: natural-language math word problems in GSM8K's format, generated, for real models.

A problem is a short story of `task.train_ops` (training), `task.test_ops` or `task.ood_ops` arithmetic steps on
one quantity, each step one sentence and one line of the worked answer, as GSM8K writes them:

    question   Mia has 12 apples. She finds 5 more apples. Then she gives 3 apples to a friend.
               How many apples does Mia have now?
    answer     After finding 5 more, Mia has 12 + 5 = <<12+5=17>>17 apples.
               After giving 3 away, Mia has 17 - 3 = <<17-3=14>>14 apples.
               #### 14

Why it exists: GSM8K itself is out of reach offline, and a 135M model is near 0% on it, where RL learns nothing;
the built-in `arith` task is for the tiny model, whose tokenizer has no words. These problems put a small
instruction-tuned model (SmolLM2-135M-Instruct) clearly above 0% and below its ceiling, at 64-160 tokens.

The rows go through the same loader, prompt formatting and math-verify reward as `task=gsm8k` (tasks/data.py):
the SFT demonstration is the worked answer without its `<<...>>` calculator notes and with its `#### N` line
kept, so SFT teaches the format the default prompt asks for.

Splits are fixed by a hash of the question text, so they never overlap: questions in buckets 0-9 (of 100) are
held out, the rest train. `test` holds held-out questions with the training step counts, `ood` held-out questions
with `task.ood_ops` steps (by default more than any training problem has). Operands are drawn from
2..`task.max_operand`; every intermediate quantity stays a positive integer (a step that would leave none, or a
share that does not divide evenly, is not drawn). Everything is deterministic: the same config gives the same
problems on every machine, whatever the run's seed (which only orders the training stream).
"""

from __future__ import annotations

import random
import zlib

from bridgectl.tasks.data import DatasetTask

HELD_OUT_BUCKETS = range(0, 10)
TRAIN_PROBLEMS = 4000
"""Distinct training problems generated (SFT and RL draw from the same pool, in their own seeded orders)."""
EVAL_PROBLEMS = 1000
"""Distinct problems generated per evaluation split (eval.n takes the first n)."""
GENERATOR_SEED = 2509

PEOPLE = [
    ("Mia", "she", "her"),
    ("Liam", "he", "his"),
    ("Ava", "she", "her"),
    ("Noah", "he", "his"),
    ("Zoe", "she", "her"),
    ("Omar", "he", "his"),
    ("Lena", "she", "her"),
    ("Ravi", "he", "his"),
    ("Sofia", "she", "her"),
    ("Jack", "he", "his"),
    ("Emma", "she", "her"),
    ("Ben", "he", "his"),
]
ITEMS = [
    ("apples", "bags"),
    ("marbles", "jars"),
    ("stickers", "packs"),
    ("pencils", "boxes"),
    ("cookies", "trays"),
    ("books", "shelves"),
    ("coins", "purses"),
    ("shells", "buckets"),
    ("cards", "decks"),
    ("eggs", "cartons"),
]
OTHERS = ["a friend", "a neighbor", "a classmate", "a cousin", "the teacher", "a stranger"]


def bucket_of(question: str) -> int:
    """Stable hash bucket in [0, 100) (Python's hash() is salted per process, crc32 is not)."""
    return zlib.crc32(question.encode()) % 100


def word_problem(rng: random.Random, steps: int, max_operand: int) -> dict:
    """One problem of exactly `steps` arithmetic steps: {question, answer, steps}, `answer` in GSM8K's format."""
    name, subject, possessive = rng.choice(PEOPLE)
    items, containers = rng.choice(ITEMS)
    Subject = subject.capitalize()
    sentences, lines = [], []
    if rng.random() < 0.5:  # the first step is a product: boxes of items
        boxes, each = rng.randint(2, max_operand), rng.randint(2, max_operand)
        total = boxes * each
        sentences.append(f"{name} buys {boxes} {containers} of {items} with {each} {items} in each.")
        lines.append(f"{name} buys {boxes} * {each} = <<{boxes}*{each}={total}>>{total} {items}.")
        remaining = steps - 1
    else:  # the first step is a sum: what one has and what one finds
        have, more = rng.randint(2, max_operand), rng.randint(2, max_operand)
        total = have + more
        sentences.append(f"{name} has {have} {items}. {Subject} finds {more} more {items}.")
        lines.append(
            f"After finding {more} more, {name} has {have} + {more} = <<{have}+{more}={total}>>{total} {items}."
        )
        remaining = steps - 1
    question_end = f"How many {items} does {name} have now?"
    for index in range(remaining):
        last = index == remaining - 1
        kinds = ["add", "multiply"] + (["subtract"] if total > 3 else [])
        divisors = [k for k in range(2, 7) if total % k == 0 and total // k >= 2]
        if last and divisors:
            kinds.append("share")
        kind = rng.choice(kinds)
        then = rng.choice(["Then", "After that,", "Next,"])
        if kind == "add":
            more = rng.randint(2, max_operand)
            sentences.append(f"{then} {subject} gets {more} more {items} from {rng.choice(OTHERS)}.")
            lines.append(
                f"After getting {more} more, {name} has {total} + {more} = <<{total}+{more}="
                f"{total + more}>>{total + more} {items}."
            )
            total += more
        elif kind == "subtract":
            given = rng.randint(2, min(max_operand, total - 1))
            sentences.append(f"{then} {subject} gives {given} {items} to {rng.choice(OTHERS)}.")
            lines.append(
                f"After giving {given} away, {name} has {total} - {given} = <<{total}-{given}="
                f"{total - given}>>{total - given} {items}."
            )
            total -= given
        elif kind == "multiply":
            factor = rng.choice([2, 3])
            word = {2: "doubles", 3: "triples"}[factor]
            sentences.append(f"{then} {possessive} number of {items} {word}.")
            lines.append(
                f"After it {word}, {name} has {total} * {factor} = <<{total}*{factor}="
                f"{total * factor}>>{total * factor} {items}."
            )
            total *= factor
        else:
            share = rng.choice(divisors)
            sentences.append(f"{then} {subject} shares all of them equally among {share} friends.")
            lines.append(
                f"Each friend gets {total} / {share} = <<{total}/{share}={total // share}>>{total // share} {items}."
            )
            question_end = f"How many {items} does each friend get?"
            total //= share
    question = " ".join(sentences + [question_end])
    return {"question": question, "answer": "\n".join(lines + [f"#### {total}"]), "steps": steps}


def word_problems(seed: int, count: int, steps_range, max_operand: int, held_out: bool) -> list[dict]:
    """`count` distinct problems with a step count drawn from `steps_range` ([min, max]), all from the held-out
    hash buckets or all from the training ones; the same list for the same arguments."""
    rng = random.Random(f"wordmath-{seed}-{held_out}-{list(steps_range)}-{max_operand}")
    low, high = steps_range
    found: dict[str, dict] = {}
    for _ in range(200 * count):
        row = word_problem(rng, rng.randint(low, high), max_operand)
        if (bucket_of(row["question"]) in HELD_OUT_BUCKETS) == held_out:
            found.setdefault(row["question"], row)
            if len(found) == count:
                return list(found.values())
    raise ValueError(
        f"only {len(found)} distinct wordmath problems of {list(steps_range)} steps with operands up to "
        f"{max_operand} were found; use more steps or a larger task.max_operand"
    )


class WordMathTask(DatasetTask):
    """`wordmath`: generated rows instead of files; otherwise exactly a gsm8k dataset task."""

    keeps_answer_line = True
    SPLITS = ("test", "ood")

    def sources(self) -> tuple[str, str, dict[str, str]]:
        return "train", "train", {split: split for split in self.SPLITS}

    def rows(self, source: str, split: str) -> list[dict]:
        cfg = self.cfg
        if source == "train":
            return word_problems(GENERATOR_SEED, TRAIN_PROBLEMS, cfg.train_ops, cfg.max_operand, held_out=False)
        steps = cfg.test_ops if source == "test" else cfg.ood_ops
        return word_problems(GENERATOR_SEED, EVAL_PROBLEMS, steps, cfg.max_operand, held_out=True)
