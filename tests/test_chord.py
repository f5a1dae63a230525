"""CHORD's update (arXiv 2508.11408) checked against gradients computed independently:

    grad_t = (1 - mu_t) g_grpo + mu_t g_sft        mu_t: warm-up from 0, cosine decay, then the valley

g_grpo and g_sft (the plain NLL, or CHORD-phi's p(1-p)-weighted NLL with p detached) come from full float32
log-softmaxes over a copy of the model at the step's weights, on the very rollouts and SFT batch the stage used
(recorded by spies), while the stage runs them in micro-batches through the chunked log-probs. With
mu_peak = mu_valley = 0 the stage is exactly the rl stage."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from gradient_checks import full_completion_logprobs

import bridgectl.core.optim as optim_module
import bridgectl.stages.chord as chord_module
import bridgectl.stages.rl as rl_module
from bridgectl.config.compose import compose
from bridgectl.core.rollout import positions
from bridgectl.errors import UserError
from bridgectl.stages.chord import ChordStage, chord_mu
from bridgectl.stages.rl import RLStage
from bridgectl.training.setup import build_context

# 8 groups of 4, so that some group of a step has mixed rewards (an RL gradient); micro-batches of 3 rows
SMALL = [
    "rl.prompts_per_step=8",
    "rl.num_generations=4",
    "rl.max_completion_length=16",
    "sft.batch_size=4",
    "train.threads=1",
    "optim.max_grad_norm=0",
    "train.micro_batch_size=3",
]


# ---- the mu schedule ---------------------------------------------------------------------------------------------
def test_mu_warms_up_from_zero_decays_along_a_cosine_and_stays_at_the_valley():
    cfg = SimpleNamespace(mu_warmup_steps=4, mu_decay_steps=8, mu_peak=0.5, mu_valley=0.02)
    expected = {
        0: 0.0,
        1: 0.125,
        3: 0.375,  # linear warm-up from 0
        4: 0.5,
        6: 0.02 + 0.48 * (1 + math.cos(math.pi / 4)) / 2,
        8: 0.26,  # cosine from the peak
        11: 0.02 + 0.48 * (1 + math.cos(7 * math.pi / 8)) / 2,
        12: 0.02,
        13: 0.02,
        500: 0.02,
    }  # the valley after W + D updates, to the end
    assert [chord_mu(cfg, t) for t in expected] == pytest.approx(list(expected.values()), abs=1e-12)
    no_warmup = SimpleNamespace(mu_warmup_steps=0, mu_decay_steps=2, mu_peak=0.9, mu_valley=0.05)
    assert [chord_mu(no_warmup, t) for t in range(4)] == pytest.approx([0.9, 0.475, 0.05, 0.05], abs=1e-12)
    constant = SimpleNamespace(mu_warmup_steps=0, mu_decay_steps=0, mu_peak=0.1, mu_valley=0.1)  # CHORD-phi's mu
    assert [chord_mu(constant, t) for t in (0, 1, 99)] == [0.1, 0.1, 0.1]


def test_default_schedule_is_the_reference_one_scaled_to_the_recipe():
    cfg = compose(["recipe=chord"])
    chord = cfg.chord
    assert (chord.mu_peak, chord.mu_valley, chord.mu_warmup_steps, chord.mu_decay_steps) == (0.5, 0.02, 50, 100)
    assert chord.mu_warmup_steps + chord.mu_decay_steps == cfg.train.max_steps  # the valley as the stage ends
    with pytest.raises(UserError, match="chord.mu_peak"):
        compose(["recipe=chord", "chord.mu_peak=1.5"])


# ---- independent losses ------------------------------------------------------------------------------------------
def grpo_by_hand(model, scored, rl):
    rollouts = scored.rollouts
    logprobs = full_completion_logprobs(model, rollouts, rl.temperature)
    ratio = torch.exp(logprobs - rollouts.sampling_logprobs)
    advantage = scored.advantages.unsqueeze(1)
    per_token = -torch.min(ratio * advantage, ratio.clamp(1 - rl.epsilon, 1 + rl.epsilon) * advantage)
    mask = rollouts.completion_mask.float()
    return (per_token * mask).sum() / mask.sum()


def sft_by_hand(model, batch, phi: bool):
    """Token-mean NLL of the labelled tokens; with phi, each token's term weighted by p (1 - p), p detached."""
    mask = batch.attention_mask
    logits = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions(mask)).logits.float()
    labels = batch.labels[:, 1:]
    scored = labels != -100
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    weight = scored.float()
    if phi:
        probs = logprobs.detach().exp()
        weight = weight * probs * (1 - probs)
    return -(weight * logprobs).sum() / scored.sum()


def grads(loss, model):
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


# ---- the stage -----------------------------------------------------------------------------------------------------
def recording(real, into: list):
    def wrapper(ctx):
        into.append(real(ctx))
        return into[-1]

    return wrapper


def run(stage_cls, module, overrides, steps, monkeypatch):
    """`steps` updates of a fresh stage: the gradients each update clipped (what it is made of), the model before
    each update, and the rollouts and SFT batches each update used."""
    captured, models, recorded = [], [], {"sample_groups": [], "next_sft_batch": []}

    def clip(params, *args, **kwargs):
        captured.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params])
        return real_clip(params, *args, **kwargs)

    real_clip = optim_module.clip_gradients
    monkeypatch.setattr(optim_module, "clip_gradients", clip)
    for name in recorded:
        if hasattr(module, name):
            monkeypatch.setattr(module, name, recording(getattr(module, name), recorded[name]))
    ctx = build_context(compose(overrides), show_progress=False)
    stage = stage_cls(ctx, 4)
    outputs = []
    for _ in range(steps):
        models.append(copy.deepcopy(ctx.policy.model))
        outputs.append(stage.step())
    monkeypatch.undo()
    return ctx, captured, models, recorded, outputs


@pytest.mark.parametrize("phi", [False, True], ids=["chord-mu", "chord-phi"])
def test_each_update_is_the_mu_weighted_sum_of_the_grpo_and_sft_gradients(phi, monkeypatch):
    schedule = ["chord.mu_warmup_steps=0", "chord.mu_decay_steps=2", "chord.mu_peak=0.8", "chord.mu_valley=0.2"]
    ctx, captured, models, recorded, outputs = run(
        ChordStage, chord_module, ["recipe=chord", *SMALL, *schedule, f"chord.phi={str(phi).lower()}"], 2, monkeypatch
    )
    rl = ctx.cfg.rl
    for step, mu in enumerate([0.8, 0.5]):  # mu_0 = peak, mu_1 = halfway down the cosine
        assert outputs[step].metrics["chord/mu"] == pytest.approx(mu)
        model, scored, batch = models[step], recorded["sample_groups"][step], recorded["next_sft_batch"][step]
        g_rl = grads(grpo_by_hand(model, scored, rl), model)
        g_sft = grads(sft_by_hand(model, batch, phi), model)
        assert max(float(g.abs().max()) for g in g_rl) > 1e-3  # the RL term is not vacuous
        for got, rl_grad, sft_grad in zip(captured[step], g_rl, g_sft):
            torch.testing.assert_close(got, (1 - mu) * rl_grad + mu * sft_grad, atol=1e-6, rtol=1e-4)
        if phi:  # the weighting matters: the plain NLL's gradient is far from phi's
            g_plain = grads(sft_by_hand(model, batch, False), model)
            assert max(float((a - b).abs().max()) for a, b in zip(g_plain, g_sft)) > 1e-3
        with torch.no_grad():
            expected_loss = float(sft_by_hand(model, batch, phi))
        assert outputs[step].metrics["train/sft_loss"] == pytest.approx(expected_loss, rel=1e-4)


def test_zero_mu_is_exactly_the_rl_stage(monkeypatch):
    same_lr = ["rl.lr=1e-4", "chord.lr=1e-4"]
    ctx, chord_grads, _, _, outputs = run(
        ChordStage,
        chord_module,
        ["recipe=chord", *SMALL, *same_lr, "chord.mu_peak=0", "chord.mu_valley=0"],
        2,
        monkeypatch,
    )
    _, rl_grads, _, _, _ = run(RLStage, rl_module, ["recipe=rl", *SMALL, *same_lr], 2, monkeypatch)
    assert len(chord_grads) == len(rl_grads) == 2
    for chord_step, rl_step in zip(chord_grads, rl_grads):
        assert all(torch.equal(a, b) for a, b in zip(chord_step, rl_step))
    assert ctx.sft_examples.consumed == 0  # no SFT batch is drawn when mu = 0
    assert all("train/sft_loss" not in output.metrics for output in outputs)
