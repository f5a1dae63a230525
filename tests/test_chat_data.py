"""Conversational datasets (tasks/data.py), TRL's formats: `messages` whose last assistant turn is the
demonstration, or `prompt` as a list of messages; task.system_prompt; the chat template applied to the
conversation; malformed rows exit 2 naming the file and the row."""

from __future__ import annotations

import json

import pytest
from hf_fixtures import GSM8K_ROWS, build_hf_model, write_jsonl
from omegaconf import OmegaConf
from transformers import AutoTokenizer
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.config.compose import Config
from bridgectl.errors import UserError
from bridgectl.tasks.data import DatasetTask
from bridgectl.tasks.prompts import prompt_formatter

SMALL = [
    "train.threads=1",
    "train.max_steps=2",
    "train.eval_every=0",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "rl.max_completion_length=12",
    "sft.batch_size=2",
    "eval.n=2",
    "eval.max_new_tokens=12",
    "eval.batch_size=2",
    "train.log_completions_every=1",
]
CHAT_ROWS = [
    {"messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]}
    for row in GSM8K_ROWS
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_hf_model(tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    return AutoTokenizer.from_pretrained(hf_dir)


def task_of(tokenizer, name="gsm8k", **settings) -> DatasetTask:
    cfg = OmegaConf.structured(Config).task
    cfg.name = name
    for key, value in settings.items():
        cfg[key] = value
    return DatasetTask(cfg, prompt_formatter(tokenizer, use_chat_template=True))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["rl", "sft", "bridge"])
def test_a_conversational_gsm8k_file_trains_through_the_cli(hf_dir, tokenizer, tmp_path, recipe):
    """Every prompt the run logged is the chat template applied to the row's turns before the demonstration, with
    the system prompt first: written out by hand from the fixture's template, and equal to what the tokenizer's
    apply_chat_template gives for those messages."""
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    extra = ["model.finetune=lora"] if recipe == "bridge" else []
    result = CliRunner().invoke(
        app,
        [
            "run",
            f"recipe={recipe}",
            "model=hf",
            f"model.name_or_path={hf_dir}",
            "task=gsm8k",
            f"task.path={path}",
            f"task.eval_sets={{test:{path}}}",
            "task.system_prompt=Answer briefly.",
            *SMALL,
            *extra,
            "--out",
            str(tmp_path),
            "--name",
            "r",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    by_hand = {f"<s><|system|>Answer briefly.\n<|user|>{row['question']}\n<|assistant|>" for row in GSM8K_ROWS}
    templated = {
        tokenizer.apply_chat_template(
            [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": row["question"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for row in GSM8K_ROWS
    }
    assert by_hand == templated
    logged = [json.loads(line) for line in (tmp_path / "r" / "completions.jsonl").read_text().splitlines()]
    assert logged and {c["prompt"] for c in logged} <= by_hand
    if recipe != "sft":
        assert any(c["split"] == "train" for c in logged)
        assert {c["gold"] for c in logged} <= {"7", "24", "1000", "9"}  # from each demonstration's #### line


def test_gold_answer_trace_and_columns_of_a_messages_row(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS[:1])
    task = task_of(tokenizer, path=str(path), eval_sets={"test": str(path)})
    problem = task.sft[0]
    assert problem.answer == "7"  # the demonstration's #### line
    assert problem.trace == "He has 3 + 4 = 7 apples."  # without the calculator note and the #### line
    assert problem.trace_completion == "He has 3 + 4 = 7 apples.\nThe final answer is \\boxed{7}."
    assert problem.question == f"<s><|user|>{GSM8K_ROWS[0]['question']}\n<|assistant|>"
    assert problem.conversation == [{"role": "user", "content": GSM8K_ROWS[0]["question"]}]
    assert problem.columns == CHAT_ROWS[0]  # reward functions get the row's `messages` as a keyword argument


def test_prompt_lists_multi_turn_prompts_and_the_rows_own_system_turn(tokenizer, tmp_path):
    rows = [
        # TRL's prompt-completion format, the gold answer in its own field
        {
            "prompt": [{"role": "user", "content": "What is 2^5?"}],
            "completion": [{"role": "assistant", "content": "2^5 = \\boxed{32}"}],
            "answer": "32",
        },
        # several turns: everything before the last assistant turn is the prompt; the row's system turn is kept
        {
            "messages": [
                {"role": "system", "content": "Be exact."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "What is 3+3?"},
                {"role": "assistant", "content": "3+3 = 6\n#### 6"},
            ]
        },
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    task = task_of(
        tokenizer, name="jsonl", path=str(path), eval_sets={"test": str(path)}, system_prompt="Answer briefly."
    )
    first, second = task.sft
    assert first.question == "<s><|system|>Answer briefly.\n<|user|>What is 2^5?\n<|assistant|>"
    assert (first.answer, first.trace) == ("32", "2^5 = \\boxed{32}") and "prompt" not in first.columns
    assert second.question == (
        "<s><|system|>Be exact.\n<|user|>Hi\n<|assistant|>Hello.\n<|user|>What is 3+3?\n<|assistant|>"
    )
    assert (second.answer, second.trace) == ("6", "3+3 = 6")


def test_rows_without_a_demonstration_serve_rl_but_not_sft(tokenizer, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "What is 2+2?"}], "answer": "4"}]
    path = write_jsonl(tmp_path / "rl.jsonl", rows)
    task = task_of(
        tokenizer,
        name="jsonl",
        rl_path=str(path),
        sft_path=str(write_jsonl(tmp_path / "sft.jsonl", CHAT_ROWS)),
        eval_sets={"test": str(path)},
    )
    assert task.rl[0].answer == "4" and task.rl[0].trace == "" and not task.rl_has_traces
    with pytest.raises(UserError, match=r"rl.jsonl, row 0: no assistant turn to learn from"):
        task_of(tokenizer, name="jsonl", path=str(path), eval_sets={"test": str(path)})


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": "What is 2+2?"}, "line 2: `messages` is a str, not a list of messages"),
        ({"messages": [{"role": "user"}]}, "line 2: `messages` message 0 is not {role, content} with text values"),
        ({"messages": []}, "line 2: `messages` is an empty list of messages"),
        (
            {"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "#### 3"}]},
            "row 1: the prompt has no user turn",
        ),
        ({"question": "What is 1+1?", "answer": "#### 2"}, "row 1: neither a `messages` nor a `prompt` list"),
        (
            {"messages": [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "two"}]},
            "row 1: no gold answer could be read",
        ),
    ],
)
def test_malformed_rows_are_refused_with_the_file_and_the_row(tokenizer, tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [CHAT_ROWS[0], row])
    with pytest.raises(UserError) as raised:
        task_of(tokenizer, path=str(path), eval_sets={"test": str(path)})
    assert str(path) in raised.value.message and message in raised.value.message


def test_a_byte_that_is_not_utf8_is_refused_with_its_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "latin1.jsonl", CHAT_ROWS[:1])
    path.write_bytes(path.read_bytes() + '{"question": "Caf\u00e9?", "answer": "#### 1"}\n'.encode("latin-1"))
    with pytest.raises(UserError) as raised:
        task_of(tokenizer, path=str(path), eval_sets={"test": str(path)})
    assert "line 2: not UTF-8 text (byte 0xe9 at column 18)" in raised.value.message and raised.value.hint


def test_a_malformed_row_exits_2_through_the_cli_and_leaves_no_run(hf_dir, tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [CHAT_ROWS[0], {"messages": [{"role": "assistant", "content": "#### 3"}]}]
    )
    result = CliRunner().invoke(
        app,
        [
            "run",
            "recipe=rl",
            "model=hf",
            f"model.name_or_path={hf_dir}",
            "task=gsm8k",
            f"task.path={path}",
            f"task.eval_sets={{test:{path}}}",
            *SMALL,
            "--out",
            str(tmp_path),
            "--name",
            "r",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output and "row 1: the prompt has no user turn" in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()


def test_conversations_need_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    plain = AutoTokenizer.from_pretrained(build_hf_model(tmp_path / "plain", with_chat_template=False))
    with pytest.raises(UserError, match="need the tokenizer's chat template"):
        task_of(plain, path=str(path), eval_sets={"test": str(path)})
