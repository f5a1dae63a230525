"""Tasks: where RL problems, SFT traces, evaluation sets and the verifier come from. `arith` (tasks/arith.py, for
the tiny model) and `wordmath` (tasks/wordmath.py, GSM8K-format word problems for real models) are built in;
gsm8k, math and jsonl read files or Hub datasets (tasks/data.py)."""

from __future__ import annotations

from omegaconf import DictConfig


def make_task(cfg: DictConfig, tokenizer=None):
    """The task of `cfg`; dataset tasks read and check their sources here, before any model weights load. Their
    prompts are formatted with `tokenizer` (the base model's: models/sources.load_task passes it), which the
    built-in arith task does without."""
    from bridgectl.tasks.arith import ArithTask

    if cfg.task.name == "arith":
        return ArithTask(cfg.task)
    from bridgectl.tasks.data import DatasetTask
    from bridgectl.tasks.prompts import prompt_formatter, prompts_use_chat_template
    from bridgectl.tasks.wordmath import WordMathTask

    if tokenizer is None:
        raise ValueError(f"task {cfg.task.name} formats its prompts with the base model's tokenizer: pass it")
    task_class = WordMathTask if cfg.task.name == "wordmath" else DatasetTask
    return task_class(cfg.task, prompt_formatter(tokenizer, prompts_use_chat_template(cfg.task)))


def task_eval_splits(task_cfg) -> tuple[str, ...]:
    """Names of a task's evaluation splits, without loading its data."""
    from bridgectl.tasks.arith import ArithTask
    from bridgectl.tasks.wordmath import WordMathTask

    built_in = {"arith": ArithTask.SPLITS, "wordmath": WordMathTask.SPLITS}
    return built_in.get(task_cfg.name, tuple(task_cfg.eval_sets))
