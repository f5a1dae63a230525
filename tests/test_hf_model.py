"""`model=hf`: a Llama-style model with a chat-template tokenizer, saved to a temporary directory, trains through
`rl`, `sft` and `bridge` on GSM8K- and MATH-shaped local files, as a user runs it from the command line."""

from __future__ import annotations

import json

import pytest
from hf_fixtures import CHAT_TEMPLATE, GSM8K_ROWS, MATH_ROWS, build_hf_model, write_jsonl
from peft.tuners.lora.layer import Linear as LoraLinear
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.config.compose import compose
from bridgectl.tasks.prompts import prompt_formatter
from bridgectl.training.setup import build_context

SMALL = [
    "train.threads=1",
    "train.max_steps=3",
    "train.eval_every=0",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "rl.max_completion_length=12",
    "sft.batch_size=2",
    "eval.n=2",
    "eval.max_new_tokens=12",
    "eval.batch_size=2",
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_hf_model(tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"gsm8k": write_jsonl(root / "gsm8k.jsonl", GSM8K_ROWS), "math": write_jsonl(root / "math.jsonl", MATH_ROWS)}


def overrides(hf_dir, data, task="gsm8k", *extra):
    return [
        "model=hf",
        f"model.name_or_path={hf_dir}",
        f"task={task}",
        f"task.path={data[task]}",
        f"task.eval_sets={{test:{data[task]}}}",
        *SMALL,
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, task",
    [
        ("rl", "gsm8k"),
        ("sft", "math"),
        ("bridge", "gsm8k"),
        ("chord", "gsm8k"),
        ("luffy", "gsm8k"),
        ("relift", "math"),
        ("hpt", "gsm8k"),
        ("srft", "math"),
        ("uft", "gsm8k"),
    ],
)
def test_recipes_train_an_hf_model_on_local_files(hf_dir, data, tmp_path, recipe, task):
    extra = ["model.finetune=lora"] if recipe == "bridge" else []
    result = CliRunner().invoke(
        app, ["run", *overrides(hf_dir, data, task, f"recipe={recipe}", *extra), "--out", str(tmp_path), "--name", "r"]
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "r"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["model"] == "hf" and summary["steps"] == 3
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    key = "train/sft_loss" if recipe == "sft" else "train/rl_loss"
    assert sum(key in m for m in metrics) == 3
    completions = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    # the chat template wraps every prompt (this tokenizer adds no BOS itself, so the template's BOS stays)
    # (uft's training prompts go on past the assistant tag with a prefix of the demonstration: its hint)
    ends = (lambda p: "<|assistant|>" in p) if recipe == "uft" else (lambda p: p.endswith("<|assistant|>"))
    assert completions and all(c["prompt"].startswith("<s><|user|>") and ends(c["prompt"]) for c in completions)
    assert (run / "checkpoints" / "final").is_dir()


def test_methods_that_need_paired_demonstrations_refuse_rl_data_without_traces(hf_dir, tmp_path):
    """luffy, relift, hpt, srft and uft train on each RL prompt's own demonstration: RL rows without a trace
    are refused before any training, exit 2, with a message that says why."""
    from bridgectl.stages import STAGES

    rows = [{"question": "What is 2 + 2?", "answer": "4"}, {"question": "What is 3 + 3?", "answer": "6"}]
    path = write_jsonl(tmp_path / "no_traces.jsonl", rows)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"question": "What is 1 + 1?", "trace": "1 + 1 = 2", "answer": "2"}])
    for recipe in ("luffy", "relift", "hpt", "srft", "uft"):
        assert STAGES[recipe].needs_traces
        result = CliRunner().invoke(
            app,
            [
                "run",
                "model=hf",
                f"model.name_or_path={hf_dir}",
                "task=jsonl",
                f"task.rl_path={path}",
                f"task.sft_path={sft}",
                f"task.eval_sets={{test:{path}}}",
                *SMALL,
                f"recipe={recipe}",
                "--out",
                str(tmp_path / "runs"),
                "--name",
                recipe,
            ],
        )
        assert result.exit_code == 2, (recipe, result.output)
        assert "demonstration" in result.output and "without a trace" in result.output, result.output
        assert not (tmp_path / "runs" / recipe).exists()  # nothing ran, nothing is kept


def test_sft_loss_falls_on_an_hf_model(hf_dir, data, tmp_path):
    cfg = compose(
        overrides(hf_dir, data, "gsm8k", "recipe=sft", "model.finetune=full", "sft.lr=3e-3", "sft.batch_size=4")
    )
    from bridgectl.stages.sft import SFTStage

    ctx = build_context(cfg, show_progress=False)
    stage = SFTStage(ctx, 30)
    losses = [stage.step().metrics["train/sft_loss"] for _ in range(30)]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5  # four examples, full fine-tuning: it memorises


def test_loading_details(hf_dir, data):
    ctx = build_context(compose(overrides(hf_dir, data, "gsm8k", "recipe=rl")), show_progress=False)
    tokenizer, model = ctx.policy.tokenizer, ctx.policy.model
    assert tokenizer.padding_side == "left"
    assert next(model.parameters()).dtype.is_floating_point and str(next(model.parameters()).dtype) == "torch.float32"
    # all-linear: every projection of every layer, not the output head
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # one BOS at the start of a templated prompt, not two
    prompt = ctx.task.sft[0].question
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id


def test_plain_prompt_without_a_chat_template(tmp_path):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(build_hf_model(tmp_path / "plain", with_chat_template=False))
    assert prompt_formatter(plain, use_chat_template=True)("What is 2+2?") == "What is 2+2?"
    plain.chat_template = CHAT_TEMPLATE
    assert prompt_formatter(plain, use_chat_template=False)("What is 2+2?") == "What is 2+2?"
    assert prompt_formatter(plain, use_chat_template=True)("What is 2+2?") == "<s><|user|>What is 2+2?\n<|assistant|>"
    # a tokenizer that adds BOS itself (Llama-style): the template's BOS text is dropped, so one BOS remains
    from tokenizers.processors import TemplateProcessing

    plain._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", plain.bos_token_id)])
    prompt = prompt_formatter(plain, use_chat_template=True)("What is 2+2?")
    assert prompt == "<|user|>What is 2+2?\n<|assistant|>"
    ids = plain(prompt)["input_ids"]
    assert ids[0] == plain.bos_token_id and plain.bos_token_id not in ids[1:]


@pytest.mark.parametrize(
    "args, message",
    [
        (["model=hf"], "model=hf needs model.name_or_path"),
        (["model=hf", "model.name_or_path=/nonexistent/model"], "does not exist or has no config.json"),
        (["model=hf", "model.dtype=float8"], "unknown model.dtype"),
        (
            ["task=gsm8k", "task.path=/nonexistent/train.jsonl", "task.eval_sets={test:/nonexistent/train.jsonl}"],
            "does not exist",
        ),
        (["task=jsonl", "task.prompt_template=no placeholder"], "no {question} placeholder"),
    ],
)
def test_bad_model_and_data_settings_exit_2_and_leave_no_run(tmp_path, args, message):
    result = CliRunner().invoke(app, ["run", *args, *SMALL, "--out", str(tmp_path), "--name", "bad"])
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output and message in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "bad").exists()
