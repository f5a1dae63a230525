"""ReLIFT (bridgectl/stages/relift.py) checked against independent computations:

    buffer   <- exactly the prompts none of whose rollouts is rewarded (constructed rewards), oldest first
    when the buffer holds relift.buffer_size: SFT updates whose gradients are sft_loss's on the oldest examples
    (one per mini-batch and epoch), the rest of the buffer kept
    an unreachable buffer_size: the `rl` stage, update for update
    a checkpoint keeps the buffer: a stage restored from it continues exactly as the one never stopped

Gradients are those the update rules clip (a spy on core/optim.clip_gradients, with the weights they were taken at);
the expected ones come from a deep copy of the model set to those weights."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from gradient_checks import assert_same_gradients, record_returns, record_updates

import bridgectl.stages.relift as relift_module
from bridgectl.config.compose import compose
from bridgectl.core.checkpoint import read_checkpoint, restore, save_checkpoint
from bridgectl.core.context import demonstration_batch
from bridgectl.core.grpo import rl_loss
from bridgectl.core.losses import sft_loss
from bridgectl.errors import UserError
from bridgectl.stages.relift import Demonstration, ReliftStage
from bridgectl.stages.rl import RLStage
from bridgectl.tasks.arith import ArithTask
from bridgectl.training.setup import build_context

G = 4  # rollouts per prompt
SMALL = [
    "recipe=relift",
    "rl.prompts_per_step=4",
    f"rl.num_generations={G}",
    "rl.max_completion_length=16",
    "train.threads=1",
    "optim.max_grad_norm=0",
]
# constructed rewards, by prompt of each step: prompts 0 and 3 are never solved (the hardest), 1 once, 2 always
PATTERN = [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]


def patterned(completions, golds):
    assert len(completions) == len(PATTERN) * G
    return [float(reward) for group in PATTERN for reward in group]


class Spy:
    """Records what each step sampled (core/grpo.sample_and_score as the stage calls it) and every update a stage
    makes (core/optim.clip_gradients: the weights before the update and the gradients it is made of)."""

    def __init__(self, monkeypatch) -> None:
        self.sampled = record_returns(monkeypatch, relift_module, "sample_and_score")
        self.updates = record_updates(monkeypatch)


def make(overrides, monkeypatch, rewards=patterned, total_updates=3):
    ctx = build_context(compose([*SMALL, *overrides]), show_progress=False)
    if rewards is not None:
        monkeypatch.setattr(ctx.task, "rewards", rewards)
    spy = Spy(monkeypatch)
    return ctx, ReliftStage(ctx, total_updates), spy


def gradients_at(ctx, params, weights, loss_of):
    """d loss_of(model) / d params, on a deep copy of the model with `params` set to `weights`."""
    model = copy.deepcopy(ctx.policy.model)
    name_of = {id(p): n for n, p in ctx.policy.model.named_parameters()}
    copies = dict(model.named_parameters())
    targets = [copies[name_of[id(p)]] for p in params]
    with torch.no_grad():
        for target, value in zip(targets, weights):
            target.copy_(value)
    grads = torch.autograd.grad(loss_of(model), targets, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads)]


def prompts_of(scored):
    return scored.problems[::G]


def demonstrations(problems):
    """What the buffer keeps of each problem: its question and demonstration."""
    return [Demonstration(p.question, p.trace_completion) for p in problems]


def test_the_buffer_collects_exactly_the_prompts_no_rollout_solves(monkeypatch):
    ctx, stage, spy = make(["relift.buffer_size=100"], monkeypatch)
    outputs = [stage.step() for _ in range(2)]
    first, second = (prompts_of(scored) for scored in spy.sampled)
    assert stage.buffer == demonstrations([first[0], first[3], second[0], second[3]])
    # the RL stream's prompts 0, 3, 4 and 7, oldest first
    stream = list(itertools.islice(ctx.task.rl_prompts(ctx.cfg.seed), 8))
    assert demonstrations([stream[i] for i in (0, 3, 4, 7)]) == stage.buffer
    assert [o.metrics["relift/hard_prompts"] for o in outputs] == [2, 2]
    assert [o.metrics["relift/buffer_size"] for o in outputs] == [2, 4]
    assert [o.metrics["relift/sft_updates"] for o in outputs] == [0, 0]
    assert len(spy.updates) == 2 and all("train/sft_loss" not in o.metrics for o in outputs)  # RL updates only


@pytest.mark.parametrize("epochs,mini_batch", [(1, 0), (2, 2)], ids=["one-update", "two-epochs-of-two-batches"])
def test_a_full_buffer_starts_an_sft_round_with_the_gradient_of_sft_loss(epochs, mini_batch, monkeypatch):
    ctx, stage, spy = make(
        ["relift.buffer_size=3", f"relift.sft_epochs={epochs}", f"relift.sft_mini_batch_size={mini_batch}"], monkeypatch
    )
    first = stage.step()  # 2 hardest prompts: below the buffer size
    assert first.metrics["relift/sft_updates"] == 0 and len(spy.updates) == 1
    second = stage.step()  # 4 hardest prompts: the 3 oldest make an SFT round, the 4th stays
    hardest = [*prompts_of(spy.sampled[0])[0::3], *prompts_of(spy.sampled[1])[0::3]]
    assert stage.buffer == demonstrations(hardest[3:])  # the RL stream's prompt 7

    chunks = [hardest[:3]] if mini_batch == 0 else [hardest[:2], hardest[2:3]]
    sft_updates = spy.updates[2:]  # after step 1's and step 2's RL updates
    assert len(sft_updates) == epochs * len(chunks) == second.metrics["relift/sft_updates"]
    assert second.metrics["relift/sft_updates_total"] == len(sft_updates)
    for (weights, grads), problems in zip(sft_updates, chunks * epochs):
        expected = gradients_at(ctx, stage.params, weights, lambda m: sft_loss(m, demonstration_batch(ctx, problems)))
        assert_same_gradients(grads, expected)
    # the same step's RL update: the GRPO gradient of its rollouts
    weights, grads = spy.updates[1]
    assert_same_gradients(grads, gradients_at(ctx, stage.params, weights, lambda m: rl_loss(m, spy.sampled[1], ctx)[0]))
    # two optimizers: the SFT updates at relift.sft_lr, the RL updates at rl.lr
    assert stage.sft_optimizer.param_groups[0]["lr"] == second.metrics["relift/sft_lr"] == ctx.cfg.relift.sft_lr
    assert stage.optimizer.param_groups[0]["lr"] == second.metrics["train/lr"] == ctx.cfg.rl.lr
    assert "train/sft_loss" in second.metrics


def test_an_unreachable_buffer_size_is_the_rl_stage(monkeypatch):
    results = {}
    for kind in ("relift", "rl"):
        spy = Spy(monkeypatch)
        ctx = build_context(compose([*SMALL, "relift.buffer_size=1000000"]), show_progress=False)
        stage = ReliftStage(ctx, 3) if kind == "relift" else RLStage(ctx, 3)
        metrics = [stage.step().metrics for _ in range(2)]
        weights = [p.detach().clone() for p in stage.params]
        results[kind] = (spy.updates, metrics, weights)
        monkeypatch.undo()
    (relift_updates, relift_metrics, relift_weights), (rl_updates, rl_metrics, rl_weights) = (
        results["relift"],
        results["rl"],
    )
    assert len(relift_updates) == len(rl_updates) == 2
    for (_, got), (_, expected) in zip(relift_updates, rl_updates):
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert all(torch.equal(a, b) for a, b in zip(relift_weights, rl_weights))
    for got, expected in zip(relift_metrics, rl_metrics):
        assert {k: v for k, v in got.items() if k in expected and not k.startswith("perf/")} == {
            k: v for k, v in expected.items() if not k.startswith("perf/")
        }


def test_micro_batches_give_the_one_pass_gradients(monkeypatch):
    captured = {}
    for size in (0, 2):
        ctx, stage, spy = make(["relift.buffer_size=3", f"train.micro_batch_size={size}"], monkeypatch)
        for _ in range(2):
            stage.step()
        captured[size] = spy.updates
        monkeypatch.undo()
    assert len(captured[0]) == len(captured[2]) == 3  # two RL updates and one SFT update
    for (_, whole), (_, split) in zip(captured[0], captured[2]):
        assert_same_gradients(split, whole)


def test_a_resumed_stage_keeps_the_buffer_and_continues_exactly(tmp_path, monkeypatch):
    def rewards(completions, golds):  # a function of (completion, gold): prompts with an odd answer never succeed
        return [float(int(gold) % 2 == 0 and len(completion) % 2 == 0) for completion, gold in zip(completions, golds)]

    overrides = [*SMALL, "relift.buffer_size=3"]
    ctx, stage, _ = make(["relift.buffer_size=3"], monkeypatch, rewards=rewards, total_updates=5)
    for _ in range(2):
        stage.step()
    checkpoint = save_checkpoint(
        tmp_path,
        2,
        ctx.policy.model,
        stage,
        ctx.sampling_generator,
        {"consumed": {"sft": ctx.sft_examples.consumed, "rl": ctx.rl_problems.consumed}},
        keep=1,
    )
    saved_buffer = list(stage.buffer)
    straight = [stage.step().metrics for _ in range(3)]

    meta, trainer, tensors = read_checkpoint(checkpoint)
    assert len(trainer["stage"]["state"]["buffer"]) == len(saved_buffer) > 0  # the test needs a buffer to keep
    resumed_ctx = build_context(compose(overrides), show_progress=False, skip=meta["consumed"])
    monkeypatch.setattr(resumed_ctx.task, "rewards", rewards)
    resumed = ReliftStage(resumed_ctx, 5)
    restore(resumed_ctx.policy.model, resumed, resumed_ctx.sampling_generator, trainer, tensors)
    assert resumed.buffer == saved_buffer  # the same problems, as the checkpoint holds them
    again = [resumed.step().metrics for _ in range(3)]

    def clean(rows):
        return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]

    assert clean(again) == clean(straight)
    assert sum(row["relift/sft_updates"] for row in again) > 0  # the kept buffer was trained on
    assert resumed.buffer == stage.buffer
    assert all(torch.equal(a, b) for a, b in zip(resumed.params, stage.params))


def test_the_stage_needs_paired_demonstrations_and_valid_settings(monkeypatch):
    monkeypatch.setattr(ArithTask, "rl_has_traces", False)
    with pytest.raises(UserError, match="relift"):  # refused with the context, before weights load
        build_context(compose(SMALL), show_progress=False)
    for bad in ("relift.buffer_size=0", "relift.sft_lr=0", "relift.sft_epochs=0", "relift.sft_mini_batch_size=-1"):
        with pytest.raises(UserError, match="relift"):
            compose([*SMALL, bad])
