"""UFT (bridgectl/stages/uft.py) checked against independent computations:

    p(t)     the reference's cosine schedule, 0 after the hint phase
    hints    a Binomial(n, p) number of n equal token spans of the demonstration; the sampled prompt is the question
             followed by exactly that prefix, shared by the prompt's group
    update   d/dtheta [L_grpo(rollouts, rewarded on hint + completion) + sft_coef * -log pi(hint | question)]
    limits   no hint and sft_coef = 0: the `rl` stage, update for update

Gradients are those the update clips (a spy on core/optim.clip_gradients, with the weights they were taken at); the
expected ones come from a deep copy of the model set to those weights, on batches built here."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from gradient_checks import assert_same_gradients, record_returns, record_updates

import bridgectl.stages.uft as uft_module
from bridgectl.config.compose import compose
from bridgectl.core.advantages import group_advantages
from bridgectl.core.grpo import ScoredRollouts, rl_loss
from bridgectl.core.losses import SFTBatch, sft_loss
from bridgectl.errors import UserError
from bridgectl.stages.rl import RLStage
from bridgectl.stages.uft import UFTStage, hint_length, hint_probability
from bridgectl.tasks.arith import ArithTask
from bridgectl.training.setup import build_context

G = 4  # rollouts per prompt
SMALL = [
    "recipe=uft",
    "rl.prompts_per_step=4",
    f"rl.num_generations={G}",
    "rl.max_completion_length=16",
    "train.threads=1",
    "optim.max_grad_norm=0",
]


class Spy:
    """Records what each step sampled (as the stage called core/grpo.sample_and_score), the hint lengths drawn, and
    every update (core/optim.clip_gradients: the weights before it and the gradients it is made of)."""

    def __init__(self, monkeypatch) -> None:
        self.sampled = record_returns(monkeypatch, uft_module, "sample_and_score")
        self.lengths = record_returns(monkeypatch, uft_module, "hint_length")
        self.updates = record_updates(monkeypatch)


def make(overrides, monkeypatch, total_updates=3):
    ctx = build_context(compose([*SMALL, *overrides]), show_progress=False)
    spy = Spy(monkeypatch)
    return ctx, UFTStage(ctx, total_updates), spy


def model_at(ctx, params, weights):
    """A deep copy of the model with `params` set to `weights`, and those parameters of the copy."""
    model = copy.deepcopy(ctx.policy.model)
    name_of = {id(p): n for n, p in ctx.policy.model.named_parameters()}
    copies = dict(model.named_parameters())
    targets = [copies[name_of[id(p)]] for p in params]
    with torch.no_grad():
        for target, value in zip(targets, weights):
            target.copy_(value)
    return model, targets


def gradients_at(ctx, params, weights, loss_of):
    """d loss_of(model) / d params, on a deep copy of the model with `params` set to `weights`."""
    model, targets = model_at(ctx, params, weights)
    grads = torch.autograd.grad(loss_of(model), targets, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads)]


def demonstration_ids(ctx, problem) -> list[int]:
    return ctx.policy.tokenizer(problem.trace_completion, add_special_tokens=False)["input_ids"]


# ---- the schedule and the hint lengths -------------------------------------------------------------------------
def test_the_hint_schedule_is_the_reference_cosine_then_zero():
    defaults = compose(["recipe=uft"]).uft  # the reference's run.py / ppo_trainer.yaml values
    assert (
        defaults.hint_start,
        defaults.hint_end,
        defaults.hint_fraction_of_steps,
        defaults.hint_chunks,
        defaults.sft_coef,
    ) == (0.95, 0.05, 0.6, 5, 0.001)
    total, hint_steps = 50, 30  # T_hint = 0.6 * 50
    for update in range(total):
        t = update + 1  # the reference's timestep counts from 1
        expected = 0.05 + 0.5 * (0.95 - 0.05) * (1 + math.cos(math.pi * t / hint_steps)) if t <= hint_steps else 0.0
        assert hint_probability(defaults, update, total) == pytest.approx(expected, abs=1e-12)
    assert 0.94 < hint_probability(defaults, 0, total) < 0.95
    assert hint_probability(defaults, hint_steps - 1, total) == pytest.approx(0.05)  # t = T_hint: p_low
    assert hint_probability(defaults, hint_steps, total) == 0.0
    never = SimpleNamespace(hint_start=0.95, hint_end=0.05, hint_fraction_of_steps=0.0)
    assert all(hint_probability(never, update, total) == 0.0 for update in range(total))


def test_hint_lengths_are_a_binomial_number_of_equal_token_spans():
    generator = torch.Generator().manual_seed(0)
    assert hint_length(7, 5, 1.0, generator) == 7 and hint_length(0, 5, 0.5, generator) == 0
    state = generator.get_state()
    assert hint_length(7, 5, 0.0, generator) == 0
    assert torch.equal(generator.get_state(), state)  # p = 0 draws nothing (so no hint leaves the run as `rl`)
    spans = {round(k * 7 / 5): k for k in range(6)}  # cut points of 7 tokens in 5 spans: 0, 1, 3, 4, 6, 7
    draws = [hint_length(7, 5, 0.3, generator) for _ in range(4000)]
    assert set(draws) <= set(spans)
    assert sum(spans[d] for d in draws) / len(draws) == pytest.approx(5 * 0.3, abs=0.08)  # E[Binomial(5, 0.3)]
    assert {hint_length(3, 5, 0.5, generator) for _ in range(200)} == {0, 1, 2, 3}  # shorter: one token per span


def test_hinted_prompts_are_the_question_and_the_drawn_prefix_of_its_demonstration(monkeypatch):
    ctx, stage, spy = make([], monkeypatch)
    output = stage.step()
    tokenizer, scored = ctx.policy.tokenizer, spy.sampled[0]
    assert len(spy.lengths) == ctx.cfg.rl.prompts_per_step and 0 < sum(spy.lengths)  # p(1) ~ 0.95: long hints
    for k, length in enumerate(spy.lengths):
        group = scored.problems[k * G : (k + 1) * G]
        source = group[0].source
        prefix = tokenizer.decode(demonstration_ids(ctx, source)[:length]) if length else ""
        assert all(p.question == source.question + prefix and p.hint == prefix for p in group)
        assert source.trace_completion[:length] == prefix  # the character tokenizer: a prefix of the trace
    # the sampler was given the hinted prompts
    prompts = tokenizer.batch_decode(scored.rollouts.prompt_ids, skip_special_tokens=True)
    assert prompts == [p.question for p in scored.problems]
    assert output.metrics["uft/hint_prob"] == pytest.approx(hint_probability(ctx.cfg.uft, 0, 3))
    lengths = [len(demonstration_ids(ctx, p.source)) for p in scored.problems[::G]]
    assert output.metrics["uft/hint_fraction"] == pytest.approx(
        sum(h / n for h, n in zip(spy.lengths, lengths)) / len(lengths)
    )


# ---- the update ------------------------------------------------------------------------------------------------
def hint_nll_batch(ctx, problems, lengths) -> SFTBatch:
    """-log pi(hint | question), built here from token ids: the question's tokens then the demonstration's first
    `length` tokens, only the latter scored (no EOS)."""
    tokenizer = ctx.policy.tokenizer
    rows, labels = [], []
    for problem, length in zip(problems, lengths):
        prompt = tokenizer(problem.question)["input_ids"]
        hint = demonstration_ids(ctx, problem)[:length]
        rows.append(prompt + hint)
        labels.append([-100] * len(prompt) + hint)
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id
    return SFTBatch(
        torch.tensor([row + [pad] * (width - len(row)) for row in rows]),
        torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
        torch.tensor([label + [-100] * (width - len(label)) for label in labels]),
    )


@pytest.mark.parametrize("sft_coef", [0.5, 0.0])
def test_one_step_is_grpo_on_the_generated_tokens_plus_the_hint_nll(sft_coef, monkeypatch):
    # p = 0.5 in the hint phase (2 of 3 updates): hints of every length; the second update is checked, as the tiny
    # model completes the first step's hints without a mistake (no group is partly rewarded: no RL gradient)
    ctx, stage, spy = make([f"uft.sft_coef={sft_coef}", "uft.hint_start=0.5", "uft.hint_end=0.5"], monkeypatch)
    stage.step()
    output = stage.step()
    raw, lengths = spy.sampled[1], spy.lengths[ctx.cfg.rl.prompts_per_step :]
    # rewards of the completions alone came from sample_and_score; the stage rewards hint + completion
    rewards = torch.tensor(
        [ctx.task.reward(p.hint + c, p.answer) for p, c in zip(raw.problems, raw.rollouts.completions)]
    )
    scored = ScoredRollouts(raw.problems, raw.rollouts, rewards, group_advantages(rewards, G, "group"), 0.0)
    assert output.metrics["train/reward_mean"] == pytest.approx(rewards.mean().item())
    batch = hint_nll_batch(ctx, [p.source for p in raw.problems[::G]], lengths)
    assert batch.n_tokens == sum(lengths) > 0

    weights, grads = spy.updates[1]
    expected = gradients_at(
        ctx, stage.params, weights, lambda m: rl_loss(m, scored, ctx)[0] + sft_coef * sft_loss(m, batch)
    )
    assert_same_gradients(grads, expected)
    rl_only = gradients_at(ctx, stage.params, weights, lambda m: rl_loss(m, scored, ctx)[0])
    assert max(float(g.abs().max()) for g in rl_only) > 1e-3
    if sft_coef > 0:  # the hint term is there and is not negligible at this tolerance
        hint_only = gradients_at(ctx, stage.params, weights, lambda m: sft_coef * sft_loss(m, batch))
        assert max(float(g.abs().max()) for g in hint_only) > 1e-3
        before = model_at(ctx, stage.params, weights)[0]
        assert output.metrics["train/sft_loss"] == pytest.approx(sft_loss(before, batch).item(), rel=1e-5)
    else:
        assert "train/sft_loss" not in output.metrics


@pytest.mark.parametrize(
    "no_hint",
    [["uft.hint_fraction_of_steps=0"], ["uft.hint_start=0", "uft.hint_end=0"]],
    ids=["no-hint-phase", "zero-hint-share"],
)
def test_no_hint_and_no_hint_term_is_the_rl_stage(no_hint, monkeypatch):
    results = {}
    for kind in ("uft", "rl"):
        spy = Spy(monkeypatch)
        ctx = build_context(
            compose([*SMALL, *no_hint, "uft.sft_coef=0", "uft.lr=1e-4", "rl.lr=1e-4"]), show_progress=False
        )
        stage = UFTStage(ctx, 3) if kind == "uft" else RLStage(ctx, 3)
        metrics = [stage.step().metrics for _ in range(2)]
        results[kind] = (spy.updates, metrics, [p.detach().clone() for p in stage.params])
        monkeypatch.undo()
    (uft_updates, uft_metrics, uft_weights), (rl_updates, rl_metrics, rl_weights) = results["uft"], results["rl"]
    assert len(uft_updates) == len(rl_updates) == 2
    for (_, got), (_, expected) in zip(uft_updates, rl_updates):
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert all(torch.equal(a, b) for a, b in zip(uft_weights, rl_weights))
    for got, expected in zip(uft_metrics, rl_metrics):
        assert got["uft/hint_prob"] == 0.0 and got["uft/hint_fraction"] == 0.0
        assert {k: v for k, v in got.items() if k in expected and not k.startswith("perf/")} == {
            k: v for k, v in expected.items() if not k.startswith("perf/")
        }


def test_micro_batches_give_the_one_pass_gradients(monkeypatch):
    captured = {}
    for size in (0, 3):
        ctx, stage, spy = make(["uft.sft_coef=0.5", f"train.micro_batch_size={size}"], monkeypatch)
        stage.step()
        captured[size] = spy.updates
        monkeypatch.undo()
    assert len(captured[0]) == len(captured[3]) == 1
    assert_same_gradients(captured[3][0][1], captured[0][0][1])


def test_the_stage_needs_paired_demonstrations_and_valid_settings(monkeypatch):
    monkeypatch.setattr(ArithTask, "rl_has_traces", False)
    with pytest.raises(UserError, match="uft"):  # refused with the context, before weights load
        build_context(compose(SMALL), show_progress=False)
    for bad in (
        "uft.hint_start=1.5",
        "uft.hint_end=-0.1",
        "uft.hint_fraction_of_steps=2",
        "uft.hint_chunks=0",
        "uft.sft_coef=-1",
        "uft.lr=0",
    ):
        with pytest.raises(UserError, match="uft"):
            compose([*SMALL, bad])
