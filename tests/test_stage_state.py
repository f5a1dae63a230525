"""Stage state survives a checkpoint (core/checkpoint.py saves what a stage declares):

relift, stopped after a checkpoint that holds a non-empty buffer and resumed, has the buffer and the metrics of
a run never stopped (the real `bridgectl run --resume` path)
every registered stage, restored into a fresh stage from a checkpoint, equals the original in every attribute
(optimizers and schedulers by their state, tensors by value) and takes the same next step: state a stage kept
outside its state_dict would show here; a skipped load_state_dict does
checkpoints written before stage state was declared (flat attribute paths, optimizer pairs under their old
names, relift's buffer as stream positions) still load
an optimizer declared in a tuple, or saved state a stage has no load_state_dict for, is refused loudly"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import bridgectl.stages.relift as relift_module
from bridgectl.cli.app import app
from bridgectl.config.compose import compose
from bridgectl.core.checkpoint import (
    list_checkpoints,
    load_stage_state,
    read_checkpoint,
    restore,
    save_checkpoint,
    stage_state,
)
from bridgectl.core.context import TrainContext
from bridgectl.errors import NonFiniteError
from bridgectl.stages import STAGES, build_stage
from bridgectl.tasks.arith import ArithTask
from bridgectl.training.setup import build_context

SMALL = [
    "train.threads=1",
    "rl.prompts_per_step=2",
    "rl.num_generations=4",
    "rl.max_completion_length=8",
    "sft.batch_size=4",
    "relift.buffer_size=3",
    "interleaved.rl_steps=1",
    "interleaved.sft_steps=1",
]
BUDGET = 6  # updates each stage is built for (its schedules); the tests take fewer


def odd_answers_fail(completions, golds):
    """A reward of (completion, gold) alone, so a resumed run scores as the straight one: prompts whose answer is odd
    are never solved (relift's hardest prompts)."""
    return [float(int(gold) % 2 == 0 and len(completion) % 2 == 0) for completion, gold in zip(completions, golds)]


def clean(rows: list[dict]) -> list[dict]:
    """Metric rows without what depends on the clock."""
    return [{k: v for k, v in row.items() if not k.startswith("perf/") and k != "wall_s"} for row in rows]


# ---- relift through `bridgectl run --resume` ---------------------------------------------------------------------
def buffers(run: Path) -> dict[int, list]:
    """The relift buffer of each checkpoint of a run, by step."""
    return {
        read_checkpoint(path)[0]["step"]: read_checkpoint(path)[1]["stage"]["state"]["buffer"]
        for path in list_checkpoints(run / "checkpoints")
    }


@pytest.mark.slow
def test_relift_resumed_from_a_checkpoint_keeps_its_buffer_and_continues_as_the_uninterrupted_run(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(ArithTask, "rewards", staticmethod(odd_answers_fail))
    args = [
        "recipe=relift",
        *SMALL,
        "rl.prompts_per_step=4",
        "train.max_steps=6",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=3",
        "train.eval_every=0",
        "eval.n=4",
        "--out",
        str(tmp_path),
    ]
    straight = CliRunner().invoke(app, ["run", *args, "--name", "straight"])
    assert straight.exit_code == 0, straight.output

    real_step, calls = relift_module.ReliftStage.step, []

    def failing_at_step_3(stage):  # the run stops before step 3 updates anything: checkpoint step-2 is its last
        calls.append(1)
        if len(calls) == 3:
            raise NonFiniteError("stopped by the test")
        return real_step(stage)

    monkeypatch.setattr(relift_module.ReliftStage, "step", failing_at_step_3)
    stopped = CliRunner().invoke(app, ["run", *args, "--name", "stopped"])
    assert stopped.exit_code == 1, stopped.output
    assert buffers(tmp_path / "stopped").keys() == {2}
    monkeypatch.setattr(relift_module.ReliftStage, "step", real_step)
    resumed = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "stopped")])
    assert resumed.exit_code == 0, resumed.output

    kept, expected = buffers(tmp_path / "stopped"), buffers(tmp_path / "straight")
    assert kept[2] and kept[2] == expected[2]  # a buffer to keep, the straight run's at step 2
    assert kept[4] == expected[4]  # after the resume: what the uninterrupted run held at step 4
    rows = {
        name: clean([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
        for name in ("straight", "stopped")
    }
    assert rows["stopped"] == rows["straight"]
    sft_rounds = [row["relift/sft_updates"] for row in rows["straight"] if row["stage"] == "relift"]
    assert sum(sft_rounds[2:]) > 0  # the steps after the resume trained on buffered prompts


# ---- every stage: a restored stage equals the original ------------------------------------------------------------
def snapshot(value):
    """`value` as plain data to compare: optimizers and schedulers by their state_dict, tensors copied, a stage by
    its attributes (sub-stages too); the context is left out (each stage has its own, built from the same config)."""
    if isinstance(value, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
        return snapshot(value.state_dict())
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [snapshot(item) for item in value]
    if isinstance(value, TrainContext):
        return None
    if hasattr(value, "step") and hasattr(value, "__dict__"):  # a stage
        return {name: snapshot(item) for name, item in vars(value).items()}
    return value


def differences(got, expected, path: str = "stage") -> list[str]:
    """The paths at which two snapshots differ."""
    if isinstance(expected, torch.Tensor):
        same = isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.equal(got, expected)
        return [] if same else [path]
    if isinstance(expected, dict):
        if not isinstance(got, dict) or got.keys() != expected.keys():
            return [path]
        return [found for key in expected for found in differences(got[key], expected[key], f"{path}.{key}")]
    if isinstance(expected, list):
        if not isinstance(got, list) or len(got) != len(expected):
            return [path]
        return [found for i, (a, b) in enumerate(zip(got, expected)) for found in differences(a, b, f"{path}[{i}]")]
    return [] if got == expected else [path]


def stage_after_steps(kind: str, monkeypatch, steps: int = 2):
    """A `kind` stage on the tiny model after `steps` steps, with odd_answers_fail as the reward."""
    ctx = build_context(compose([f"recipe={kind}", *SMALL]), show_progress=False)
    monkeypatch.setattr(ctx.task, "rewards", odd_answers_fail)
    stage = build_stage(kind, ctx, BUDGET)
    for _ in range(steps):
        stage.step()
    return ctx, stage


def restored(kind: str, checkpoint: Path, monkeypatch):
    """A fresh `kind` stage, restored from `checkpoint` as a resumed run restores it."""
    meta, trainer, tensors = read_checkpoint(checkpoint)
    ctx = build_context(compose([f"recipe={kind}", *SMALL]), show_progress=False, skip=meta["consumed"])
    monkeypatch.setattr(ctx.task, "rewards", odd_answers_fail)
    stage = build_stage(kind, ctx, BUDGET)
    restore(ctx.policy.model, stage, ctx.sampling_generator, trainer, tensors)
    return stage


def save(ctx, stage, directory: Path) -> Path:
    return save_checkpoint(
        directory,
        2,
        ctx.policy.model,
        stage,
        ctx.sampling_generator,
        {"consumed": {"sft": ctx.sft_examples.consumed, "rl": ctx.rl_problems.consumed}},
        keep=1,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(STAGES))
def test_a_restored_stage_equals_the_original_in_every_attribute_and_takes_the_same_step(kind, tmp_path, monkeypatch):
    ctx, stage = stage_after_steps(kind, monkeypatch)
    checkpoint = save(ctx, stage, tmp_path)
    before = snapshot(stage)
    straight = stage.step().metrics
    resumed = restored(kind, checkpoint, monkeypatch)
    assert differences(snapshot(resumed), before) == []
    assert clean([resumed.step().metrics]) == clean([straight])
    if kind == "relift":
        assert before["buffer"], "relift's buffer should hold prompts at the checkpoint"


def test_a_stage_whose_state_is_not_restored_is_caught(tmp_path, monkeypatch):
    ctx, stage = stage_after_steps("relift", monkeypatch)
    checkpoint = save(ctx, stage, tmp_path)
    before = snapshot(stage)
    monkeypatch.setattr(relift_module.ReliftStage, "load_state_dict", lambda self, state: None)
    assert "stage.buffer" in differences(snapshot(restored("relift", checkpoint, monkeypatch)), before)


# ---- checkpoints written before stage state was declared ---------------------------------------------------------
LEGACY_PAIRS = {
    "relift": {"rl_opt": ("optimizer", "scheduler"), "sft_opt": ("sft_optimizer", "sft_scheduler")},
    "bridge": {
        "lower_opt": ("lower_optimizer", "lower_scheduler"),
        "upper_opt": ("upper_optimizer", "upper_scheduler"),
        "shadow_opt": ("shadow_optimizer", "shadow_scheduler"),
    },
}
"""The (optimizer, scheduler) attribute pairs of those stages then, as the attributes they became."""


def legacy_layout(kind: str, entry: dict, tensors: dict, ctx) -> tuple[dict, dict]:
    """A checkpoint's stage entry and tensors as they were written before stage state was declared: one flat dict
    of attribute path -> integer or optimizer/scheduler state, pairs as lists under their old names, relift's buffer
    as the positions of its problems in the RL stream (a tensor) and their count."""
    optimizers, state = dict(entry["optimizers"]), dict(entry["state"])
    flat = {
        old: [optimizers.pop(a), optimizers.pop(b)]
        for old, (a, b) in LEGACY_PAIRS.get(kind, {}).items()
        if a in optimizers
    }
    flat.update(optimizers)
    tensors = dict(tensors)
    if kind == "relift":
        stream = list(itertools.islice(ctx.task.rl_prompts(ctx.cfg.seed), ctx.rl_problems.consumed))
        position = {(p.question, p.trace_completion): i for i, p in enumerate(stream)}
        buffer = state.pop("buffer")
        slots = torch.full((BUDGET * ctx.cfg.rl.prompts_per_step,), -1, dtype=torch.long)
        slots[: len(buffer)] = torch.tensor([position[(d["question"], d["trace_completion"])] for d in buffer])
        tensors["stage/buffer/stream_index"] = slots
        state["buffered"] = len(buffer)
    for key, value in state.items():
        if isinstance(value, dict) and key == "rules":  # interleaved's sub-stages: `rules.rl.updates`
            flat.update({f"rules.{rule}.{name}": v for rule, values in value.items() for name, v in values.items()})
        elif isinstance(value, int):
            flat[key] = value
    if kind == "bridge":
        flat["total_updates"] = BUDGET  # an integer attribute the old walk saved too, now rebuilt from the config
    return flat, tensors


@pytest.mark.parametrize("kind", ["relift", "bridge", "interleaved", "rl"])
def test_a_checkpoint_written_before_stage_state_was_declared_still_loads(kind, tmp_path, monkeypatch):
    ctx, stage = stage_after_steps(kind, monkeypatch)
    checkpoint = save(ctx, stage, tmp_path)
    before = snapshot(stage)
    meta, trainer, tensors = read_checkpoint(checkpoint)
    trainer["stage"], tensors = legacy_layout(kind, trainer["stage"], tensors, ctx)
    assert "optimizers" not in trainer["stage"]
    fresh_ctx = build_context(compose([f"recipe={kind}", *SMALL]), show_progress=False, skip=meta["consumed"])
    fresh = build_stage(kind, fresh_ctx, BUDGET)
    restore(fresh_ctx.policy.model, fresh, fresh_ctx.sampling_generator, trainer, tensors)
    assert differences(snapshot(fresh), before) == []


# ---- refused loudly ----------------------------------------------------------------------------------------------
class _PairedStage:
    def __init__(self) -> None:
        self.ctx = None
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        self.pair = (optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))

    def optimizers(self) -> dict:
        return {"pair": self.pair}

    def step(self):
        raise NotImplementedError


class _CounterOnlyStage:
    def __init__(self) -> None:
        self.ctx = None

    def step(self):
        raise NotImplementedError


def test_state_a_checkpoint_would_miss_or_could_not_give_back_is_refused():
    with pytest.raises(
        TypeError,
        match=r"_PairedStage.optimizers\(\)\['pair'\] is a tuple: declare each optimizer "
        "and scheduler under a name of its own",
    ):
        stage_state(_PairedStage())
    with pytest.raises(
        TypeError,
        match=r"holds state \(updates\) for the _CounterOnlyStage, which has no "
        "load_state_dict",
    ):
        load_stage_state(_CounterOnlyStage(), {"optimizers": {}, "state": {"updates": 3}}, {})
