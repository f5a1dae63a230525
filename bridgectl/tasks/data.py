"""Dataset tasks: `gsm8k`, `math` and `jsonl` (the user's own file), read through Hugging Face `datasets` from a Hub
name or a local jsonl/json/parquet path, and scored by math-verify (tasks/verify.py).

Each example becomes a `Problem(question, trace, answer)`:
  - gsm8k: `question`; the `answer` field holds the worked solution ending in `#### 42`: the trace is the solution
    without that line and without the `<<48/2=24>>` calculator notes, the gold answer is what follows `####`;
  - math: `problem`; `solution` is the trace; the gold answer is the `answer` field when the dataset has one
    (MATH-500 does), else the last `\\boxed{}` of the solution;
  - jsonl: field names from `task.question_field`, `task.trace_field` (optional: RL and evaluation need no trace)
    and `task.answer_field`;
  - conversational rows, TRL's formats, under any of the three: `messages` (a list of {role, content}) whose last
    assistant turn is the demonstration and whose turns before it are the prompt, or `prompt` as such a list
    (with an optional `completion`, a list of messages or a text, else the trace field as the demonstration). The
    conversation is used as written (task.prompt_template applies to question fields only). The gold answer is
    the answer field when the row has one, else the demonstration's `#### 42` line (GSM8K) or last \\boxed{};
    a demonstration with a `####` line is cleaned as GSM8K's solutions are. Malformed rows (messages that are
    not a list of {role, content}, no user turn, no assistant turn where SFT needs one) exit 2 naming the file
    and the row (jsonl: the line).
`task.system_prompt` puts a system turn before every prompt (rows with their own system turn keep theirs).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from bridgectl.errors import UserError
from bridgectl.tasks.prompts import plain_prompt
from bridgectl.tasks.rewards import StepReward
from bridgectl.tasks.verify import MathVerifier, gsm8k_gold, gsm8k_trace, last_boxed

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_FIELDS = {  # task -> (question, trace, answer) field names
    "gsm8k": ("question", "answer", "answer"),
    "math": ("problem", "solution", "answer"),
    "jsonl": ("question", "trace", "answer"),
    "wordmath": ("question", "answer", "answer"),  # generated GSM8K-format rows (tasks/wordmath.py)
}
GSM8K_FORMAT = ("gsm8k", "wordmath")  # tasks whose answer field is a worked solution ending in `#### 42`


@dataclass(frozen=True)
class Problem:
    question: str
    """The formatted prompt the model sees."""
    trace: str
    """Reasoning to imitate (empty when the source has none)."""
    answer: str
    """Gold final answer, as the verifier compares it."""
    conversation: list | None = field(default=None, compare=False)
    """Conversational rows: the prompt's messages, system turn included (what reward functions get as `prompts`);
    None for question rows."""
    columns: dict = field(default_factory=dict, compare=False)
    """The row's fields but `prompt` and `completion` (TRL's exclusions): reward functions' keyword arguments."""

    @property
    def trace_completion(self) -> str:
        if not self.trace:
            return f"The final answer is \\boxed{{{self.answer}}}."
        if last_boxed(self.trace) is not None or gsm8k_gold(self.trace) is not None:
            return self.trace  # the trace states its final answer already (\boxed{}, or a kept `#### 42` line)
        return f"{self.trace}\nThe final answer is \\boxed{{{self.answer}}}."


def check_jsonl(path: Path) -> int:
    """Every non-blank line must be a JSON object; the first bad line is reported with its number. Returns how
    many rows the file has."""
    rows = 0
    with path.open("rb") as handle:  # bytes, decoded line by line: a bad byte is reported with its line number
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(
                    f"{path}, line {number}: not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1})",
                    "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(
                    f"{path}, line {number}: not valid JSON ({error.msg})",
                    "each line of a .jsonl file must be one JSON object",
                ) from None
            if not isinstance(row, dict):
                raise UserError(
                    f"{path}, line {number}: a JSON {type(row).__name__}, not an object",
                    'each line must look like {"question": ..., "answer": ...}',
                )
            for key in ("messages", "prompt", "completion"):  # checked here: Arrow refuses mixed types unhelpfully
                shaped = key in row and (key == "messages" or isinstance(row[key], list))
                wrong = message_list_error(row[key]) if shaped else None
                if wrong:
                    raise UserError(f"{path}, line {number}: `{key}` {wrong}", MESSAGES_HINT)
            rows += 1
    return rows


MESSAGES_HINT = (
    'conversational rows look like {"messages": [{"role": "user", "content": "..."}, '
    '{"role": "assistant", "content": "... #### 42"}]} (or "prompt": [...] instead of "messages")'
)


def message_list_error(messages) -> str | None:
    """What is wrong with a list of chat messages, or None when every one is {role: str, content: str}."""
    if not isinstance(messages, list):
        return f"is {'null' if messages is None else 'a ' + type(messages).__name__}, not a list of messages"
    if not messages:
        return "is an empty list of messages"
    for position, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            return f"message {position} is not {{role, content}} with text values"
    return None


def is_conversational(row: dict) -> bool:
    """TRL's conversational formats: a `messages` field, or a `prompt` that is a list of messages."""
    return row.get("messages") is not None or isinstance(row.get("prompt"), list)


def split_conversation(row: dict, where: str) -> tuple[list[dict], str | None]:
    """The prompt's messages and the demonstration (None when the row has none) of a conversational row."""
    messages = row.get("messages")
    if messages is not None:
        key, completion = "messages", None
    elif isinstance(row.get("prompt"), list):
        key, messages, completion = "prompt", row["prompt"], row.get("completion")
    else:
        raise UserError(
            f"{where}: neither a `messages` nor a `prompt` list of messages, in a conversational dataset", MESSAGES_HINT
        )
    for name, value in ((key, messages), ("completion", completion)):
        wrong = message_list_error(value) if name == key or isinstance(value, list) else None
        if wrong:
            raise UserError(f"{where}: `{name}` {wrong}", MESSAGES_HINT)
    demonstration = completion if isinstance(completion, str) else None
    if isinstance(completion, list):
        replies = [m["content"] for m in completion if m["role"] == "assistant"]
        demonstration = replies[-1] if replies else None
    if key == "messages":
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is not None:  # the last assistant turn is the demonstration, the turns before it the prompt
            messages, demonstration = messages[:last], messages[last]["content"]
    if not any(m["role"] == "user" for m in messages):
        raise UserError(f"{where}: the prompt has no user turn", MESSAGES_HINT)
    return [dict(role=m["role"], content=m["content"]) for m in messages], demonstration


def load_rows(source: str, split: str, subset: str | None) -> list[dict]:
    """Rows of a local jsonl/json/parquet file (or a directory of them) or of a Hub dataset's split."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    path = Path(source).expanduser()
    looks_local = path.suffix in LOCAL_FORMATS or source.startswith((".", "/", "~"))
    if path.exists() or looks_local:
        if not path.exists():
            raise UserError(
                f"dataset file {source} does not exist", "give a .jsonl, .json or .parquet path, or a Hub dataset name"
            )
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_FORMATS) if path.is_dir() else [path]
        if not files or files[0].suffix not in LOCAL_FORMATS:
            raise UserError(f"{source}: no .jsonl, .json or .parquet file", "point task.path at such a file")
        counts = [check_jsonl(file) for file in files if file.suffix == ".jsonl"]  # bad lines reported by number
        if len(counts) == len(files) and sum(counts) == 0:
            raise UserError(f"dataset {source} is empty", "give a file with at least one example")
        try:
            dataset = datasets.load_dataset(
                LOCAL_FORMATS[files[0].suffix], data_files=[str(f) for f in files], split="train"
            )
        except Exception as error:  # a parquet file that is not one, mixed schemas, ...
            raise UserError(
                f"could not read {source}: {type(error).__name__}: {error}", "check the file's format"
            ) from None
    else:
        try:
            dataset = datasets.load_dataset(source, subset, split=split)
        except Exception as error:
            raise UserError(
                f"could not load dataset '{source}' (split {split}): {type(error).__name__}: {error}",
                "give a local file, or a Hub name with network access (and task.subset, e.g. main for gsm8k)",
            ) from None
    return list(dataset)


class DatasetTask:
    """A task read from datasets; same interface as ArithTask (sft_examples, rl_prompts, eval_problems, reward,
    eval_splits). `format_prompt` turns a question into the prompt text (template + chat template)."""

    keeps_answer_line = False
    """Whether the SFT demonstration keeps a GSM8K solution's `#### 42` line (else it ends with a \\boxed answer)."""

    def __init__(self, cfg, format_prompt: Callable[[str | list[dict]], str] = plain_prompt) -> None:
        self.cfg, self.format_prompt = cfg, format_prompt
        self.verifier = MathVerifier(timeout_s=cfg.verify_timeout_s)
        self.step_reward = StepReward(self, cfg)
        """The reward RL trains on: the verifier, or task.reward_funcs' weighted sum (tasks/rewards.py)."""
        question, trace, answer = DEFAULT_FIELDS[cfg.name]
        self.fields = (cfg.question_field or question, cfg.trace_field or trace, cfg.answer_field or answer)
        sft_source, rl_source, eval_sources = self.sources()
        self.sft = self._problems(sft_source, cfg.train_split, need_trace=True)
        self.rl = self._problems(rl_source, cfg.train_split, need_trace=False)
        self.rl_has_traces = all(problem.trace for problem in self.rl)
        """Every RL problem carries its demonstration (methods that pair a prompt with its own trace need it)."""
        self.evals = {
            split: self._problems(source, cfg.eval_split, need_trace=False) for split, source in eval_sources.items()
        }
        self.eval_split_names = tuple(eval_sources)

    def sources(self) -> tuple[str, str, dict[str, str]]:
        """Where SFT examples, RL prompts and each evaluation split come from (checked: none may be missing)."""
        cfg = self.cfg
        if not cfg.eval_sets:
            raise UserError(
                f"task {cfg.name} has no evaluation sets",
                "give task.eval_sets={test: path/to/test.jsonl} (a split name per source)",
            )
        sources = {"sft": cfg.sft_path or cfg.path, "rl": cfg.rl_path or cfg.path}
        missing = [use for use, source in sources.items() if not source]
        if missing:
            raise UserError(
                f"task {cfg.name} needs a data source for {' and '.join(missing)}",
                "give task.path=FILE_OR_HUB_NAME (or task.sft_path / task.rl_path)",
            )
        return sources["sft"], sources["rl"], dict(cfg.eval_sets)

    def rows(self, source: str, split: str) -> list[dict]:
        return load_rows(source, split, self.cfg.subset)

    def _problems(self, source: str, split: str, need_trace: bool) -> list[Problem]:
        rows = self.rows(source, split)
        if not rows:
            raise UserError(f"dataset {source} is empty", "give a file with at least one example")
        if is_conversational(rows[0]):  # fields are checked row by row: the answer may be in the demonstration
            return [
                self._conversation_problem(row, f"dataset {source}, row {index}", need_trace)
                for index, row in enumerate(rows)
            ]
        question_field, trace_field, answer_field = self.fields
        needed = [question_field] + ([trace_field] if need_trace else [])
        if self.cfg.name != "math":  # MATH falls back to the solution's last \boxed{} for the answer
            needed.append(answer_field)
        absent = [f for f in dict.fromkeys(needed) if f not in rows[0]]
        if absent:
            raise UserError(
                f"dataset {source} has no field(s) {', '.join(absent)} (its fields: {', '.join(rows[0])})",
                "name the fields with task.question_field, task.trace_field and task.answer_field",
            )
        problems = []
        for index, row in enumerate(rows):
            problem = self._problem(row, need_trace)
            if problem is None:
                raise UserError(
                    f"dataset {source}, example {index}: no gold answer could be read",
                    "gsm8k answers end in '#### <answer>'; math solutions contain \\boxed{...} or the "
                    "rows have an answer field",
                )
            problems.append(problem)
        return problems

    def _problem(self, row: dict, need_trace: bool) -> Problem | None:
        question_field, trace_field, answer_field = self.fields
        text = self.cfg.prompt_template.format(question=str(row[question_field]))
        system = self.cfg.system_prompt
        question = self.format_prompt(
            text if system is None else [{"role": "system", "content": system}, {"role": "user", "content": text}]
        )
        trace = str(row.get(trace_field) or "")
        if self.cfg.name in GSM8K_FORMAT:
            answer = gsm8k_gold(str(row[answer_field]))
            trace = gsm8k_trace(trace) if trace_field == answer_field else trace
            if self.keeps_answer_line and trace and answer is not None:
                trace = f"{trace}\n#### {answer}"
        elif self.cfg.name == "math":
            answer = str(row[answer_field]) if row.get(answer_field) not in (None, "") else last_boxed(trace)
        else:
            answer = str(row[answer_field]) if row.get(answer_field) not in (None, "") else None
        if answer is None:
            return None
        # a trace is kept wherever a row has one
        return Problem(question=question, trace=trace.strip(), answer=answer, columns=reward_columns(row))

    def _conversation_problem(self, row: dict, where: str, need_trace: bool) -> Problem:
        prompt, demonstration = split_conversation(row, where)
        _, trace_field, answer_field = self.fields
        if self.cfg.system_prompt is not None and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": self.cfg.system_prompt}, *prompt]
        if demonstration is None and isinstance(row.get(trace_field), str):
            demonstration = row[trace_field]  # e.g. a gsm8k `answer` beside a `prompt` list
        if need_trace and not demonstration:
            raise UserError(
                f"{where}: no assistant turn to learn from (SFT needs a demonstration)",
                "end `messages` with the assistant's answer, or give SFT data with one (task.sft_path)",
            )
        demonstration = demonstration or ""
        gold = row.get(answer_field)
        answer = None
        if gold not in (None, ""):
            answer = gsm8k_gold(str(gold)) if self.cfg.name in GSM8K_FORMAT else str(gold)
        if answer is None:
            answer = gsm8k_gold(demonstration) or last_boxed(demonstration)
        if answer is None:
            raise UserError(
                f"{where}: no gold answer could be read",
                f"give the rows an `{answer_field}` field, or "
                "end the assistant's demonstration with '#### <answer>' or \\boxed{<answer>}",
            )
        trace = gsm8k_trace(demonstration) if gsm8k_gold(demonstration) is not None else demonstration
        return Problem(
            question=self.format_prompt(prompt),
            trace=trace.strip(),
            answer=answer,
            conversation=prompt,
            columns=reward_columns(row),
        )

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
        return self.eval_split_names


def reward_columns(row: dict) -> dict:
    """The row's fields reward functions get as keyword arguments: all but `prompt` and `completion`, which TRL
    passes as `prompts` and `completions` instead (trl/trainer/grpo_trainer.py)."""
    return {key: value for key, value in row.items() if key not in ("prompt", "completion")}
