"""The built-in `wordmath` task (bridgectl/tasks/wordmath.py): GSM8K-format word problems whose worked answers are
right line by line, deterministic, held out by question text, and read through the gsm8k loader and verifier."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from bridgectl.config.compose import compose
from bridgectl.tasks.verify import gsm8k_gold
from bridgectl.tasks.wordmath import HELD_OUT_BUCKETS, WordMathTask, bucket_of, word_problems

CALCULATION = re.compile(r"<<([^=<>]+)=(\d+)>>(\d+)")


def test_every_line_of_every_worked_answer_computes_and_chains_to_the_final_answer():
    for steps in (1, 2, 3, 4):
        for row in word_problems(7, 300, [steps, steps], 12, held_out=False):
            lines = row["answer"].splitlines()
            assert len(lines) == steps + 1 and row["steps"] == steps  # one line per step, then `#### N`
            previous = None
            for line in lines[:-1]:
                ((expression, value, shown),) = CALCULATION.findall(line)
                assert int(eval(expression.replace("/", "//"))) == int(value) == int(shown) > 0
                if "/" in expression:
                    left, right = map(int, expression.split("/"))
                    assert left % right == 0  # shares divide evenly
                if previous is not None:  # each step starts from the previous step's result
                    assert int(re.split(r"[-+*/]", expression)[0]) == previous
                previous = int(value)
            assert gsm8k_gold(row["answer"]) == str(previous)


def test_problems_are_deterministic_distinct_and_held_out_by_question_text():
    first = word_problems(3, 500, [1, 2], 12, held_out=False)
    assert first == word_problems(3, 500, [1, 2], 12, held_out=False)
    assert first != word_problems(4, 500, [1, 2], 12, held_out=False)
    held_out = word_problems(3, 300, [1, 2], 12, held_out=True)
    assert len({row["question"] for row in first}) == 500
    assert all(bucket_of(row["question"]) not in HELD_OUT_BUCKETS for row in first)
    assert all(bucket_of(row["question"]) in HELD_OUT_BUCKETS for row in held_out)
    assert not {row["question"] for row in first} & {row["question"] for row in held_out}
    operands = [int(n) for row in first for n in re.findall(r"\d+", row["question"])]
    assert min(operands) >= 2 and max(operands) <= 12


@pytest.mark.slow
def test_too_few_distinct_problems_is_an_error_naming_the_knobs():
    with pytest.raises(ValueError, match="task.max_operand"):
        word_problems(0, 5000, [1, 1], 2, held_out=True)


@pytest.fixture(scope="module")
def task() -> WordMathTask:
    cfg = compose(["task=wordmath", "task.train_ops=[1,2]", "task.ood_ops=[3,3]"])
    return WordMathTask(cfg.task)


def test_splits_steps_and_prompt(task):
    assert task.eval_splits == ("test", "ood")
    ood = task.eval_problems("ood", 50)
    assert len(ood) == 50 and all(p.question.endswith("then end with the line #### <answer>.") for p in ood)
    assert all(len(re.findall(r"<<", row["answer"])) == 3 for row in task.rows("ood", "test")[:50])
    train_questions = {p.question for p in task.rl}
    assert not train_questions & {p.question for p in task.eval_problems("test", 1000)}


def test_sft_demonstration_keeps_the_answer_line_and_drops_calculator_notes(task):
    example = next(task.sft_examples(seed=0))
    completion = example.trace_completion
    assert completion.endswith(f"#### {example.answer}") and "<<" not in completion and "boxed" not in completion


def test_the_gsm8k_verifier_scores_worked_answers(task):
    problem = task.eval_problems("test", 1)[0]
    wrong = str(int(problem.answer) + 1)
    assert task.rewards(
        [f"So the answer is\n#### {problem.answer}", f"#### {wrong}"], [problem.answer, problem.answer]
    ) == [1.0, 0.0]


def test_task_config_composes_with_its_defaults():
    cfg = compose(["task=wordmath"])
    assert OmegaConf.to_container(cfg.task.ood_ops)[0] > OmegaConf.to_container(cfg.task.train_ops)[1]
