"""Dataset tasks: `gsm8k`, `math` and `jsonl` (the user's own file), read through Hugging Face `datasets` from a Hub
name or a local jsonl/json/parquet path, and scored by math-verify (tasks/verify.py).

Each example becomes a `Problem(question, trace, answer)`:
  - gsm8k: `question`; the `answer` field holds the worked solution ending in `#### 42`: the trace is the solution
    without that line and without the `<<48/2=24>>` calculator notes, the gold answer is what follows `####`;
  - math: `problem`; `solution` is the trace; the gold answer is the `answer` field when the dataset has one
    (MATH-500 does), else the last `\\boxed{}` of the solution;
  - jsonl: field names from `task.question_field`, `task.trace_field` (optional: RL and evaluation need no trace)
    and `task.answer_field`.
The SFT completion is the trace followed by `The final answer is \\boxed{answer}.` unless the trace already boxes
it, so SFT teaches the format the verifier reads. Prompts are `task.prompt_template` (SimpleRL style by default)
around the question, then the model's chat template when its tokenizer has one (tasks/__init__.prompt_formatter).

SFT traces and RL prompts may come from different sources, as in the paper (traces distilled from a stronger
model, RL on verifiable problems): `task.sft_path` and `task.rl_path` override `task.path`; evaluation sets are
`task.eval_sets` ({split name: source}). Every source is checked when the run starts: a missing file, a malformed
jsonl line (reported with its line number), missing fields or an empty set exit 2 before training.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from bridgectl.errors import UserError
from bridgectl.tasks.verify import MathVerifier, gsm8k_gold, gsm8k_trace, last_boxed

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_FIELDS = {  # task -> (question, trace, answer) field names
    "gsm8k": ("question", "answer", "answer"),
    "math": ("problem", "solution", "answer"),
    "jsonl": ("question", "trace", "answer"),
}


@dataclass(frozen=True)
class Problem:
    question: str
    """The formatted prompt the model sees."""
    trace: str
    """Reasoning to imitate (empty when the source has none)."""
    answer: str
    """Gold final answer, as the verifier compares it."""

    @property
    def trace_completion(self) -> str:
        if not self.trace:
            return f"The final answer is \\boxed{{{self.answer}}}."
        if last_boxed(self.trace) is not None:
            return self.trace
        return f"{self.trace}\nThe final answer is \\boxed{{{self.answer}}}."


def check_jsonl(path: Path) -> int:
    """Every non-blank line must be a JSON object; the first bad line is reported with its number. Returns how
    many rows the file has."""
    rows = 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}, line {number}: not valid JSON ({error.msg})",
                                "each line of a .jsonl file must be one JSON object") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object",
                                'each line must look like {"question": ..., "answer": ...}')
            rows += 1
    return rows


def load_rows(source: str, split: str, subset: str | None) -> list[dict]:
    """Rows of a local jsonl/json/parquet file (or a directory of them) or of a Hub dataset's split."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    path = Path(source).expanduser()
    looks_local = path.suffix in LOCAL_FORMATS or source.startswith((".", "/", "~"))
    if path.exists() or looks_local:
        if not path.exists():
            raise UserError(f"dataset file {source} does not exist", "give a .jsonl, .json or .parquet path, "
                                                                      "or a Hub dataset name")
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_FORMATS) if path.is_dir() else [path]
        if not files or files[0].suffix not in LOCAL_FORMATS:
            raise UserError(f"{source}: no .jsonl, .json or .parquet file", "point task.path at such a file")
        counts = [check_jsonl(file) for file in files if file.suffix == ".jsonl"]  # bad lines reported by number
        if len(counts) == len(files) and sum(counts) == 0:
            raise UserError(f"dataset {source} is empty", "give a file with at least one example")
        try:
            dataset = datasets.load_dataset(LOCAL_FORMATS[files[0].suffix], data_files=[str(f) for f in files],
                                            split="train")
        except Exception as error:  # a parquet file that is not one, mixed schemas, ...
            raise UserError(f"could not read {source}: {type(error).__name__}: {error}",
                            "check the file's format") from None
    else:
        try:
            dataset = datasets.load_dataset(source, subset, split=split)
        except Exception as error:
            raise UserError(f"could not load dataset '{source}' (split {split}): {type(error).__name__}: {error}",
                            "give a local file, or a Hub name with network access (and task.subset, e.g. "
                            "main for gsm8k)") from None
    return list(dataset)


class DatasetTask:
    """A task read from datasets; same interface as ArithTask (sft_examples, rl_prompts, eval_problems, reward,
    eval_splits). `format_prompt` turns a question into the prompt text (template + chat template)."""

    def __init__(self, cfg, format_prompt: Callable[[str], str] = lambda q: q) -> None:
        self.cfg, self.format_prompt = cfg, format_prompt
        self.verifier = MathVerifier(timeout_s=cfg.verify_timeout_s)
        question, trace, answer = DEFAULT_FIELDS[cfg.name]
        self.fields = (cfg.question_field or question, cfg.trace_field or trace, cfg.answer_field or answer)
        if not cfg.eval_sets:
            raise UserError(f"task {cfg.name} has no evaluation sets",
                            "give task.eval_sets={test: path/to/test.jsonl} (a split name per source)")
        sources = {"sft": cfg.sft_path or cfg.path, "rl": cfg.rl_path or cfg.path}
        missing = [use for use, source in sources.items() if not source]
        if missing:
            raise UserError(f"task {cfg.name} needs a data source for {' and '.join(missing)}",
                            "give task.path=FILE_OR_HUB_NAME (or task.sft_path / task.rl_path)")
        self.sft = self._problems(sources["sft"], cfg.train_split, need_trace=True)
        self.rl = self._problems(sources["rl"], cfg.train_split, need_trace=False)
        self.rl_has_traces = all(problem.trace for problem in self.rl)
        """Every RL problem carries its demonstration (methods that pair a prompt with its own trace need it)."""
        self.evals = {split: self._problems(source, cfg.eval_split, need_trace=False)
                      for split, source in cfg.eval_sets.items()}

    def _problems(self, source: str, split: str, need_trace: bool) -> list[Problem]:
        rows = load_rows(source, split, self.cfg.subset)
        if not rows:
            raise UserError(f"dataset {source} is empty", "give a file with at least one example")
        question_field, trace_field, answer_field = self.fields
        needed = [question_field] + ([trace_field] if need_trace else [])
        if self.cfg.name != "math":  # MATH falls back to the solution's last \boxed{} for the answer
            needed.append(answer_field)
        absent = [f for f in dict.fromkeys(needed) if f not in rows[0]]
        if absent:
            raise UserError(f"dataset {source} has no field(s) {', '.join(absent)} (its fields: "
                            f"{', '.join(rows[0])})", "name the fields with task.question_field, "
                            "task.trace_field and task.answer_field")
        problems = []
        for index, row in enumerate(rows):
            problem = self._problem(row, need_trace)
            if problem is None:
                raise UserError(f"dataset {source}, example {index}: no gold answer could be read",
                                "gsm8k answers end in '#### <answer>'; math solutions contain \\boxed{...} or the "
                                "rows have an answer field")
            problems.append(problem)
        return problems

    def _problem(self, row: dict, need_trace: bool) -> Problem | None:
        question_field, trace_field, answer_field = self.fields
        question = self.format_prompt(self.cfg.prompt_template.format(question=str(row[question_field])))
        trace = str(row.get(trace_field) or "")
        if self.cfg.name == "gsm8k":
            answer = gsm8k_gold(str(row[answer_field]))
            trace = gsm8k_trace(trace) if trace_field == answer_field else trace
        elif self.cfg.name == "math":
            answer = str(row[answer_field]) if row.get(answer_field) not in (None, "") else last_boxed(trace)
        else:
            answer = str(row[answer_field]) if row.get(answer_field) not in (None, "") else None
        if answer is None:
            return None
        return Problem(question=question, trace=trace.strip(), answer=answer)  # a trace is kept wherever a row has one

    @staticmethod
    def _endless(problems: list[Problem], rng: random.Random) -> Iterator[Problem]:
        """Epochs of the examples, each in a fresh seeded order."""
        while True:
            order = list(problems)
            rng.shuffle(order)
            yield from order

    def sft_examples(self, seed: int) -> Iterator[Problem]:
        return self._endless(self.sft, random.Random(f"sft-{seed}"))

    def rl_prompts(self, seed: int) -> Iterator[Problem]:
        return self._endless(self.rl, random.Random(f"rl-{seed}"))

    def eval_problems(self, split: str, n: int) -> list[Problem]:
        """The first `n` examples of an evaluation set (all of them when it has fewer), the same for every run."""
        return self.evals[split][:n]

    def reward(self, completion: str, gold: str) -> float:
        return self.verifier.check(gold, completion)

    def rewards(self, completions: list[str], golds: list[str]) -> list[float]:
        """Many checks in one round trip to the verifier's helper process."""
        return self.verifier.check_batch(list(zip(golds, completions)))

    @staticmethod
    def answer_of(completion: str) -> str | None:
        """The final answer a completion gives, for maj@k's vote: its last \\boxed{} (spaces removed), else its
        last number (thousands separators removed). Votes group equal strings; the verifier still scores them."""
        boxed = last_boxed(completion)
        if boxed is not None:
            return re.sub(r"\s+", "", boxed)
        numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", completion)
        return numbers[-1].replace(",", "") if numbers else None

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return tuple(self.cfg.eval_sets)
