"""Compute accounting (core/flops.py, bridgectl/training/budget.py): the FLOP estimate equals a hand count of a tiny model's
matmuls, is within 10% of torch's own FLOP counter (torch.utils.flop_counter, which counts every matmul that runs,
backward included) on one step of every stage, with full weights and with LoRA; metrics.jsonl carries the step and
cumulative counters; and a compute budget stops every recipe at the same compute, within one step."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.config.compose import compose
from bridgectl.core import flops
from bridgectl.stages import STAGES, build_stage
from bridgectl.training.setup import build_context

SMALL = [
    "rl.prompts_per_step=2",
    "rl.num_generations=4",
    "sft.batch_size=8",
    "train.threads=1",
    "model.attn_implementation=eager",
]  # eager: torch's counter does not count the CPU SDPA kernel


def tiny_llama(vocab=40, hidden=16, intermediate=24, layers=2, heads=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=64,
            attn_implementation="eager",
        )
    )


def test_the_estimate_is_the_hand_count_of_the_matmuls():
    """2 layers of d=16 (q, k, v, o: 4 d^2; gate, up, down: 3 d x 24), vocab 40: a forward of 3 rows x 7 tokens
    with the head at 5 positions is 2 x 21 x (4 d^2 + 3 x 24 d) x 2 layers + 4 x 2 layers x 3 x 7 x 7 x d (Q K^T
    and A V) + 2 x d x 40 x 5; its backward with every weight training is twice the layers' and attention's and
    twice the head's; torch's counter agrees exactly on the forward."""
    model = tiny_llama()
    cost = flops.model_cost(model)
    per_layer = 4 * 16 * 16 + 3 * 16 * 24
    assert cost.forward == 2 * per_layer * 2 and cost.backward == 2 * cost.forward
    layers_and_attention = 2 * 21 * per_layer * 2 + 4 * 2 * 3 * 7 * 7 * 16
    head = 2 * 16 * 40 * 5
    assert flops.pass_flops(cost, 3, 7, 5, grad=False) == layers_and_attention + head
    assert flops.pass_flops(cost, 3, 7, 5, grad=True) == 3 * layers_and_attention + 3 * head
    ids = torch.randint(0, 40, (3, 7))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, logits_to_keep=5)
    assert counter.get_total_flops() == 2 * 21 * per_layer * 2 + 4 * 2 * 3 * 7 * 7 * 16 + 2 * 16 * 40 * 3 * 5
    # a frozen base with rank-4 adapters on every linear (peft's unmerged forward): the base's weight gradients
    # are gone, the adapters add 2 r (d_in + d_out) per linear and token, twice that again in the backward
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    cost = flops.model_cost(lora)
    low = sum(2 * 4 * (i + o) for i, o in [(16, 16)] * 4 + [(16, 24), (16, 24), (24, 16)]) * 2
    assert cost.forward == 2 * per_layer * 2 + low and cost.backward == 2 * per_layer * 2 + 2 * low


def one_step(overrides: list[str], kind: str) -> tuple[float, float, flops.Ledger]:
    """(our estimate, torch's count, the ledger) of one step of stage `kind`."""
    cfg = compose(overrides)
    ctx = build_context(cfg, show_progress=False)
    stage = build_stage(kind, ctx, 10)
    with flops.counting() as ledger, FlopCounterMode(display=False) as counter:
        stage.step()
    return ledger.flops, counter.get_total_flops(), ledger


RECIPE_OF = {"sft": "sft", "rl": "rl", "interleaved": "interleaved"}


# every stage with full weights; with LoRA (a frozen base: no weight gradients, the adapters' products) the stages
# whose passes differ in kind: SFT only, RL only, BRIDGE's three passes with two adapters, luffy's mixed groups
@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, finetune",
    [(kind, "full") for kind in STAGES] + [(kind, "lora") for kind in ("sft", "rl", "bridge", "luffy")],
)
def test_every_stages_step_is_within_ten_percent_of_torchs_counter(kind, finetune):
    ours, torchs, ledger = one_step([f"recipe={RECIPE_OF.get(kind, kind)}", f"model.finetune={finetune}", *SMALL], kind)
    assert torchs > 0 and abs(ours - torchs) <= 0.10 * torchs, (ours, torchs)
    assert (ledger.gen_flops > 0) == STAGES[kind].samples_rollouts and ledger.pass_tokens > 0


def test_a_real_architectures_step_with_kl_and_checkpointing_is_within_ten_percent(tmp_path):
    """The byte-level Llama fixture (a separable head over 400 tokens), LoRA unmerged, a reference pass for the KL
    term and gradient checkpointing (the layers run forward twice)."""
    from hf_fixtures import build_hf_model

    directory = build_hf_model(tmp_path / "m")
    ours, torchs, _ = one_step(
        [
            "recipe=rl",
            "model=hf",
            f"model.name_or_path={directory}",
            "task=arith",
            "lora.forward=unmerged",
            "rl.beta=0.04",
            "model.gradient_checkpointing=true",
            "rl.max_completion_length=12",
            "model.dtype=float32",
            *SMALL,
        ],
        "rl",
    )
    assert abs(ours - torchs) <= 0.10 * torchs, (ours, torchs)


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


BUDGET = [
    "train.max_steps=40",
    "rl.prompts_per_step=2",
    "rl.num_generations=4",
    "sft.batch_size=8",
    "eval.n=8",
    "train.threads=1",
    "train.eval_every=0",
]


@pytest.mark.slow
def test_a_flop_budget_stops_each_recipe_within_one_step_of_it(tmp_path):
    budget = 4e10
    spent, spent_flops = {}, {}
    for recipe in ("rl", "bridge", "two_stage"):
        result = CliRunner().invoke(
            app,
            [
                "run",
                f"recipe={recipe}",
                *BUDGET,
                f"train.budget_flops={budget}",
                "train.eval_every_compute=1.5e10",
                "--out",
                str(tmp_path),
                "--name",
                recipe,
            ],
        )
        assert result.exit_code == 0, result.output
        steps = [row for row in rows(tmp_path / recipe) if row["stage"] not in ("init", "final")]
        cumulative = [row["compute/cum_flops"] for row in steps]
        assert cumulative == sorted(cumulative) and all(row["compute/flops"] > 0 for row in steps)
        assert sum(row["compute/flops"] for row in steps) == cumulative[-1]
        assert cumulative[-1] >= budget > cumulative[-1] - max(row["compute/flops"] for row in steps)
        assert len(steps) < 40  # the budget, not train.max_steps, ended it
        # evaluations where the total passed each multiple of 1.5e10 (the last one is the final row's)
        evaluated = [row["compute/cum_flops"] for row in steps if "eval/test/accuracy" in row]
        assert [int(c // 1.5e10) for c in evaluated] == [1, 2]
        final = rows(tmp_path / recipe)[-1]
        assert final["stage"] == "final" and final["compute/cum_flops"] == cumulative[-1]
        summary = json.loads((tmp_path / recipe / "summary.json").read_text())
        assert summary["budget"] == {"unit": "flops", "value": budget, "spent": cumulative[-1], "reached": True}
        assert summary["flops"] == cumulative[-1]
        spent[recipe] = len(steps)
        spent_flops[recipe] = cumulative[-1]
    assert spent["bridge"] < spent["rl"]  # a BRIDGE update costs more: fewer of them at equal compute
    stages = [row["stage"] for row in rows(tmp_path / "two_stage") if row["stage"] not in ("init", "final")]
    assert "sft" in stages and "rl" in stages  # each stage spent its half

    # the equal-compute view: each run's test accuracy as last evaluated by 2e10 FLOPs (its step-0 value counts)
    from bridgectl.analysis import compare

    groups = {
        row.group: row
        for row in compare.compare(
            compare.load_runs([str(tmp_path)]), ["recipe"], "eval/test/accuracy", "rl", at_flops=2e10
        )
    }
    for recipe in ("rl", "bridge", "two_stage"):
        seen = [
            row["eval/test/accuracy"]
            for row in rows(tmp_path / recipe)
            if "eval/test/accuracy" in row and row["compute/cum_flops"] <= 2e10
        ]
        summary = groups[recipe].metrics["eval/test/accuracy@2e+10flops"]
        assert summary.mean == pytest.approx(seen[-1]) and summary.metric.header == "test acc @2e+10 FLOPs"
    assert groups["bridge"].time_to_target is not None and groups["rl"].flops == pytest.approx(spent_flops["rl"])
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "compare",
            str(tmp_path),
            "--baseline",
            "rl",
            "--at-flops",
            "2e10",
            "--format",
            "markdown",
            "--report",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "@2e+10 FLOPs" in " ".join(result.output.split()) and "equal-cost view" in " ".join(result.output.split())
    for name in ("accuracy_vs_flops.png", "frontier.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"![{name}]({name})" in (
            out / "report.md"
        ).read_text()


def test_fourteen_groups_get_distinct_looks_and_one_panel_per_family():
    """The 14 recipes of the paper study: no two share a colour and a line style, and the plot is split into
    the three recipe families, rl drawn in each as the reference."""
    from bridgectl.analysis.report import panels, styles

    recipes = [
        "sft",
        "rl",
        "two_stage",
        "interleaved",
        "mix",
        "bridge",
        "chord",
        "luffy",
        "relift",
        "hpt",
        "srft",
        "uft",
        "bridge_no_meta",
        "bridge_no_upper",
    ]
    looks = styles(recipes)
    assert len({(look["color"], look["linestyle"]) for look in looks.values()}) == 14
    layout = panels(recipes)
    assert [len(labels) for _, labels in layout] == [5, 4, 7] and all("rl" in labels for _, labels in layout)
    assert sorted(set(sum((labels for _, labels in layout), []))) == sorted(recipes)
    assert panels(recipes[:5]) == [("", sorted(recipes[:5]))]


def test_budgets_are_checked():
    from bridgectl.errors import UserError

    for overrides, said in [
        (["train.budget_flops=1e12", "train.budget_tokens=1e6"], "set one"),
        (["train.budget_flops=0"], "train.budget_flops must be positive"),
        (["train.eval_every_compute=1e9"], "no budget is set"),
    ]:
        with pytest.raises(UserError, match=said):
            compose(overrides)


def test_an_engines_sampling_is_counted_as_the_built_in_samplers_without_padding():
    """rollout.backend=vllm's accounting from the lengths (a prefill per prompt, a step per further token over its
    cache) equals the decoding loop's count for one row of the same lengths."""
    model = tiny_llama()
    cost = flops.model_cost(model)
    by_loop = flops.pass_flops(cost, 1, 5, 1, grad=False) + sum(
        flops.pass_flops(cost, 1, 1, 1, grad=False, context=5 + step) for step in range(1, 9)
    )
    with flops.counting() as ledger:
        flops.count_engine_sampling(model, [5], [9])
    assert ledger.gen_flops == pytest.approx(by_loop, rel=1e-12)


@pytest.mark.slow
def test_each_run_records_the_data_it_saw_and_compare_carries_it(tmp_path):
    """summary.json's `data`: SFT examples and RL prompts handed out, and how many distinct problems they were;
    rl draws rl.prompts_per_step prompts a step and no SFT example, sft sft.batch_size examples a step."""
    from bridgectl.analysis import compare

    small = [
        "train.max_steps=3",
        "rl.prompts_per_step=2",
        "rl.num_generations=4",
        "sft.batch_size=4",
        "eval.n=8",
        "train.threads=1",
        "train.eval_every=0",
    ]
    for recipe in ("rl", "sft"):
        result = CliRunner().invoke(app, ["run", f"recipe={recipe}", *small, "--out", str(tmp_path), "--name", recipe])
        assert result.exit_code == 0, result.output
    rl_data = json.loads((tmp_path / "rl" / "summary.json").read_text())["data"]
    sft_data = json.loads((tmp_path / "sft" / "summary.json").read_text())["data"]
    assert rl_data["rl"]["used"] == 6 and 1 <= rl_data["rl"]["distinct"] <= 6 and rl_data["sft"]["used"] == 0
    assert sft_data["sft"]["used"] == 12 and sft_data["rl"]["used"] == 0
    assert rl_data["rl"]["max_uses"] >= 1
    flat = {
        row.group: row.flat()
        for row in compare.compare(compare.load_runs([str(tmp_path)]), ["recipe"], "eval/test/accuracy", None)
    }
    assert flat["rl"]["data/rl/used"] == 6 and flat["sft"]["data/sft/used"] == 12


def test_a_budget_that_train_max_steps_cuts_short_is_said_and_recorded(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "run",
            "recipe=rl",
            *BUDGET,
            "train.max_steps=2",
            "train.budget_tokens=1e9",
            "--out",
            str(tmp_path),
            "--name",
            "r",
        ],
    )
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "Warning: train.max_steps=2 ended the run at" in said and "raise train.max_steps" in said
    budget = json.loads((tmp_path / "r" / "summary.json").read_text())["budget"]
    assert budget["unit"] == "tokens" and not budget["reached"] and budget["spent"] < 1e9


@pytest.mark.slow
def test_a_budgeted_run_killed_mid_stage_resumes_to_the_same_end(tmp_path):
    """two_stage at a FLOP budget, SIGKILLed in its RL stage after a checkpoint, resumed with --resume: the same
    steps, compute counters, evaluations at the same compute, and stop, as the run never stopped (the counters
    that decide where each stage ends are in the checkpoint)."""
    import signal
    import subprocess
    import sys

    from test_resume import metric_rows, start_run, wait_for_step

    settings = [
        "recipe=two_stage",
        *BUDGET,
        "train.budget_flops=3e10",
        "train.eval_every_compute=1e10",
        "train.checkpoint_every=1",
    ]
    straight = CliRunner().invoke(app, ["run", *settings, "--out", str(tmp_path), "--name", "straight"])
    assert straight.exit_code == 0, straight.output
    steps = [row for row in rows(tmp_path / "straight") if row["stage"] == "rl"]
    process = start_run(settings, tmp_path, "killed")
    wait_for_step(tmp_path / "killed", steps[1]["step"], process)  # in the RL stage, a checkpoint behind
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = subprocess.run(
        [sys.executable, "-m", "bridgectl.cli.app", "run", "--resume", str(tmp_path / "killed")],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert metric_rows(tmp_path / "killed") == metric_rows(tmp_path / "straight")
