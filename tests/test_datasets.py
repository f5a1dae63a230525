"""Dataset tasks (gsm8k, math, jsonl) read small local files written here; the math-verify verifier accepts
equivalent answers and rejects wrong ones, off the main thread too; bad data exits 2 with a clear message."""

from __future__ import annotations

import threading

import pytest
from hf_fixtures import GSM8K_ROWS, MATH_ROWS, write_jsonl
from omegaconf import OmegaConf

from bridgectl.config.compose import compose
from bridgectl.errors import UserError
from bridgectl.tasks.data import DatasetTask
from bridgectl.tasks.verify import MathVerifier, gsm8k_gold, gsm8k_trace, last_boxed


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(timeout_s=5)
    yield v
    v.close()


@pytest.mark.parametrize(
    "gold, completion",
    [
        ("\\frac{1}{2}", "so the answer is \\boxed{0.5}"),  # fraction vs decimal
        ("\\frac{3}{4}", "Adding gives \\boxed{\\frac{6}{8}}."),  # unreduced fraction
        ("0.25", "The answer is 1/4"),  # plain text fraction
        ("10", "The side is \\boxed{10\\text{ cm}}."),  # units
        ("1000", "\\boxed{1,000}"),  # thousands separator
        ("x^2+1", "\\boxed{1+x^{2}}"),  # reordered expression
        ("\\sqrt{2}", "\\boxed{\\frac{2}{\\sqrt{2}}}"),  # equal after simplification
        ("7", "He has 3 + 4 = 7 apples. The final answer is 7"),  # last number, no box
    ],
)
def test_verifier_accepts_equivalent_forms(verifier, gold, completion):
    assert verifier.check(gold, completion) == 1.0


@pytest.mark.parametrize(
    "gold, completion",
    [
        ("\\frac{1}{2}", "\\boxed{0.52}"),
        ("5", "\\boxed{6}"),
        ("x^2+1", "\\boxed{x^2-1}"),
        ("7", "I do not know"),
        ("12", ""),
    ],
)
def test_verifier_rejects_wrong_answers(verifier, gold, completion):
    assert verifier.check(gold, completion) == 0.0


def test_verifier_works_off_the_main_thread_and_in_batches(verifier):
    results = []
    worker = threading.Thread(
        target=lambda: results.append(
            verifier.check_batch([("4", "\\boxed{4}"), ("4", "\\boxed{5}"), ("\\frac{1}{3}", "\\boxed{2/6}")])
        )
    )
    worker.start()
    worker.join()
    assert results == [[1.0, 0.0, 1.0]]


def test_gold_extraction():
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072"
    assert gsm8k_gold(solution) == "1072" and gsm8k_gold("no marker") is None
    assert gsm8k_trace(solution) == "Natalia sold 48/2 = 24 clips."
    assert last_boxed("a \\boxed{\\frac{a}{b}} then \\boxed{x^{2}}") == "x^{2}" and last_boxed("none") is None


def task_cfg(name: str, **fields):
    cfg = compose([f"task={name}"]).task
    OmegaConf.set_struct(cfg, False)  # eval_sets gains keys
    return OmegaConf.merge(cfg, fields)


def test_gsm8k_loader_reads_traces_and_answers(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    task = DatasetTask(task_cfg("gsm8k", path=str(train), eval_sets={"test": str(train)}))
    first = task.sft[0]
    assert first.answer == "7" and first.trace == "He has 3 + 4 = 7 apples."
    assert "How many apples" in first.question and "\\boxed{}" in first.question  # SimpleRL-style template
    assert first.trace_completion.endswith("The final answer is \\boxed{7}.")
    assert [p.answer for p in task.evals["test"]] == ["7", "24", "1000", "9"]
    # RL problems keep their row's trace: the demonstration paired with the prompt (luffy, hpt, relift, ...)
    assert task.rl_has_traces and task.rl[0].trace == first.trace
    assert task.rewards(["so \\boxed{24}", "it is 7"], ["24", "1000"]) == [1.0, 0.0]
    # endless, reshuffled each epoch, reproducible per seed
    stream = task.sft_examples(seed=3)
    epoch = [next(stream).answer for _ in range(8)]
    assert sorted(epoch[:4]) == sorted(epoch[4:]) == sorted(["7", "24", "1000", "9"])
    again = task.sft_examples(seed=3)
    assert [next(again).answer for _ in range(8)] == epoch


def test_math_loader_takes_the_answer_field_or_the_last_box(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    task = DatasetTask(task_cfg("math", path=str(path), eval_sets={"math500": str(path)}))
    assert [p.answer for p in task.sft] == ["\\frac{3}{4}", "32", "2"]
    assert task.sft[0].trace_completion == MATH_ROWS[0]["solution"]  # already boxed: kept as is
    assert task.eval_splits == ("math500",)
    assert task.reward("\\boxed{0.75}", task.sft[0].answer) == 1.0


def test_jsonl_with_named_fields_and_separate_sources(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"q": "1+1?", "why": "one and one", "a": "2"}])
    rl = write_jsonl(tmp_path / "rl.jsonl", [{"q": "2+2?", "a": "4"}, {"q": "3+3?", "a": "6"}])
    task = DatasetTask(
        task_cfg(
            "jsonl",
            sft_path=str(sft),
            rl_path=str(rl),
            eval_sets={"test": str(rl)},
            question_field="q",
            trace_field="why",
            answer_field="a",
            prompt_template="Q: {question}\nA:",
        ),
        format_prompt=lambda text: f"<user>{text}</user>",
    )
    assert task.sft[0].question == "<user>Q: 1+1?\nA:</user>"
    assert task.sft[0].trace_completion == "one and one\nThe final answer is \\boxed{2}."
    assert [p.answer for p in task.rl] == ["4", "6"] and all(p.trace == "" for p in task.rl)
    assert not task.rl_has_traces  # so stages that pair prompts with their demonstrations refuse this task


@pytest.mark.parametrize(
    "make, fields, message",
    [
        (lambda d: d / "missing.jsonl", {}, "does not exist"),
        (lambda d: write_jsonl(d / "empty.jsonl", []), {}, "is empty"),
        (
            lambda d: _text(d / "bad.jsonl", '{"question": "a", "answer": "1"}\n{"question": "b", "answer": \n'),
            {},
            "bad.jsonl, line 2: not valid JSON",
        ),
        (lambda d: _text(d / "list.jsonl", "[1, 2]\n"), {}, "line 1: a JSON list, not an object"),
        (
            lambda d: write_jsonl(d / "fields.jsonl", [{"prompt": "x", "solution": "1"}]),
            {},
            "has no field(s) question, trace, answer",
        ),
        (
            lambda d: write_jsonl(d / "ok.jsonl", [{"question": "x", "trace": "t", "answer": "1"}]),
            {"answer_field": "gold"},
            "has no field(s) gold",
        ),
    ],
)
def test_bad_data_is_a_clear_user_error(tmp_path, make, fields, message):
    path = make(tmp_path)
    with pytest.raises(UserError) as raised:
        DatasetTask(task_cfg("jsonl", path=str(path), eval_sets={"test": str(path)}, **fields))
    assert message in raised.value.message


def test_a_dataset_task_needs_sources_and_eval_sets(tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", [{"question": "x", "trace": "t", "answer": "1"}])
    with pytest.raises(UserError, match="no evaluation sets"):
        DatasetTask(task_cfg("jsonl", path=str(path)))
    with pytest.raises(UserError, match="needs a data source for sft and rl"):
        DatasetTask(task_cfg("jsonl", eval_sets={"test": str(path)}))


def _text(path, text):
    path.write_text(text)
    return path
