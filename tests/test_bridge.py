"""BRIDGE's update rule checked against gradients computed independently (plain SGD, so updates are exact):

    theta     -= alpha * [(1-lam) g_sft(theta, w) + lam g_rl(theta, w)]
    theta_hat -= alpha * g_rl(theta_hat, w)
    w         -= beta  * [(1-lam) g_sft_w + lam (g_rl_w(theta, w) - g_rl_w(theta_hat, w))]

The expected gradients come from separate deep copies of the model (theta, w) and (theta_hat, w), not from the
stage's shadow (whose theta_hat values the stage swaps into the model in place), on the very rollouts and SFT batch the stage used (recorded by a spy). The copies
run peft's own LoRA forward, while the stage runs the merged-weight forward (lora.forward=auto on the tiny model),
so these tests also check that the two compute the same gradients."""

from __future__ import annotations

import copy

import pytest
import torch

import bridgectl.stages.bridge as bridge_module
from bridgectl.config.compose import compose
from bridgectl.core.checkpoint import stage_state
from bridgectl.core.grpo import rl_loss
from bridgectl.core.logprobs import completion_logprobs
from bridgectl.core.lora_forward import set_lora_forward
from bridgectl.core.losses import sft_loss
from bridgectl.stages.bridge import BridgeStage
from bridgectl.training.setup import build_context

# 8 groups of 4: with fewer, every group of a step can score all-equal rewards (no RL gradient at all), which
# happened with 4 groups at seed 0 and would make the shadow-term checks vacuous
SMALL = [
    "rl.prompts_per_step=8",
    "rl.num_generations=4",
    "rl.max_completion_length=16",
    "sft.batch_size=4",
    "optim.max_grad_norm=0",
    "bridge.optimizer=sgd",
    "bridge.alpha=0.05",
    "bridge.beta=0.5",
    "train.threads=1",
    "lora.rank=4",
    "bridge.w_rank=2",
]


def make_stage(overrides, monkeypatch):
    cfg = compose(["recipe=bridge", *SMALL, *overrides])
    ctx = build_context(cfg, show_progress=False)
    stage = BridgeStage(ctx, total_updates=3)
    recorded = {}

    def spy(name, real):
        def wrapper(*args, **kwargs):
            recorded[name] = real(*args, **kwargs)
            return recorded[name]

        monkeypatch.setattr(bridge_module, name, wrapper)

    spy("sample_groups", bridge_module.sample_groups)
    spy("next_sft_batch", bridge_module.next_sft_batch)
    return ctx, stage, recorded


def snapshot(params: dict) -> dict:
    return {n: p.detach().clone() for n, p in params.items()}


def grads_of(loss, model, names):
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: g if g is not None else torch.zeros_like(params[n]) for n, g in zip(names, grads)}


def expected_gradients(ctx, stage, theta, w, theta_hat, recorded):
    """g_sft and g_rl at (theta, w), g_rl at (theta_hat, w), each from its own copy of the model."""

    def model_at(lower_values):
        model = copy.deepcopy(ctx.policy.model)
        assert set_lora_forward(model, merged=False) > 0  # peft's own forward, independent of the stage's
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, value in {**lower_values, **w}.items():
                params[n].copy_(value)
        return model

    joint, shadow = model_at(theta), model_at(theta_hat)
    names = list(theta) + list(w)
    g_sft = grads_of(sft_loss(joint, recorded["next_sft_batch"]), joint, names)
    g_rl = grads_of(rl_loss(joint, recorded["sample_groups"], ctx)[0], joint, names)
    g_hat = grads_of(rl_loss(shadow, recorded["sample_groups"], ctx)[0], shadow, names)
    return g_sft, g_rl, g_hat


@pytest.mark.slow
@pytest.mark.parametrize("lower", ["full", "lora"])
@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_one_bridge_step_matches_the_paper_update(lower, lam, monkeypatch):
    ctx, stage, recorded = make_stage([f"model.finetune={lower}", f"bridge.lam={lam}"], monkeypatch)
    alpha, beta = ctx.cfg.bridge.alpha, ctx.cfg.bridge.beta
    if lower == "lora":  # theta is an adapter over a frozen base; no base weight is in theta
        assert stage.lower and all(".default." in n for n in stage.lower)
    else:
        assert any("embed_tokens" in n for n in stage.lower) and not any("lora_" in n for n in stage.lower)
    assert stage.upper and all(".w." in n for n in stage.upper)

    stage.step()  # after one step theta and theta_hat differ (unless lam = 1: then both took the same RL step)
    theta, w, theta_hat = snapshot(stage.lower), snapshot(stage.upper), snapshot(stage.shadow)
    divergence = max(float((theta[n] - theta_hat[n]).abs().max()) for n in theta)
    assert divergence > 1e-4 if lam < 1 else divergence < 1e-6  # equal up to float rounding
    stage.step()
    g_sft, g_rl, g_hat = expected_gradients(ctx, stage, theta, w, theta_hat, recorded)

    for n, before in theta.items():  # Eq. 8: fused SFT + RL gradient
        expected = before - alpha * ((1 - lam) * g_sft[n] + lam * g_rl[n])
        torch.testing.assert_close(stage.lower[n].detach(), expected, atol=1e-6, rtol=1e-4)
    for n, before in theta_hat.items():  # Algorithm 2: RL only
        torch.testing.assert_close(stage.shadow[n].detach(), before - alpha * g_hat[n], atol=1e-6, rtol=1e-4)

    shadow_term_size = 0.0  # how far a wrong sign (+g_hat) would move w from the expected value
    for n, before in w.items():  # Eq. 11: cooperative gain
        expected = before - beta * ((1 - lam) * g_sft[n] + lam * (g_rl[n] - g_hat[n]))
        torch.testing.assert_close(stage.upper[n].detach(), expected, atol=1e-6, rtol=1e-4)
        shadow_term_size = max(shadow_term_size, float((beta * lam * 2 * g_hat[n]).abs().max()))
    # the sign matters: with +g_hat instead of -g_hat the update would be off by 2 beta lam g_hat, far above
    # the tolerance used above
    assert shadow_term_size > 1e-3


def test_lambda_one_removes_sft_and_lambda_zero_removes_rl(monkeypatch):
    ctx, stage, recorded = make_stage(["bridge.lam=1.0"], monkeypatch)
    theta, w, theta_hat = snapshot(stage.lower), snapshot(stage.upper), snapshot(stage.shadow)
    stage.step()
    g_sft, g_rl, _ = expected_gradients(ctx, stage, theta, w, theta_hat, recorded)
    moved_by_sft = max(float(g.abs().max()) for g in g_sft.values())
    assert moved_by_sft > 0
    for n, before in theta.items():
        torch.testing.assert_close(
            stage.lower[n].detach(), before - ctx.cfg.bridge.alpha * g_rl[n], atol=1e-6, rtol=1e-4
        )

    ctx, stage, recorded = make_stage(["bridge.lam=0.0"], monkeypatch)
    theta, w, theta_hat = snapshot(stage.lower), snapshot(stage.upper), snapshot(stage.shadow)
    stage.step()
    g_sft, _, _ = expected_gradients(ctx, stage, theta, w, theta_hat, recorded)
    for n, before in w.items():
        torch.testing.assert_close(
            stage.upper[n].detach(), before - ctx.cfg.bridge.beta * g_sft[n], atol=1e-6, rtol=1e-4
        )


@pytest.mark.slow
def test_lookahead_shadow_is_one_rl_step_from_theta(monkeypatch):
    ctx, stage, recorded = make_stage(["bridge.shadow=lookahead", "bridge.lam=0.5"], monkeypatch)
    # the look-ahead variant keeps no persistent shadow: neither its weights nor its optimizer exist, and a
    # checkpoint holds none of them (only theta's and w's tensors and optimizers)
    assert stage.shadow == {} and stage.shadow_optimizer is None
    _, checkpoint_tensors = stage_state(stage)
    assert not [name for name in checkpoint_tensors if "shadow" in name]
    _, persistent, _ = make_stage(["bridge.lam=0.5"], monkeypatch)
    _, persistent_tensors = stage_state(persistent)
    assert [name for name in persistent_tensors if "shadow" in name]  # the check above can fail
    stage.step()  # the first step moves theta away from theta_0
    theta, w = snapshot(stage.lower), snapshot(stage.upper)
    stage.step()
    g_sft, g_rl, _ = expected_gradients(ctx, stage, theta, w, theta, recorded)
    lookahead = {n: theta[n] - ctx.cfg.bridge.alpha * g_rl[n] for n in theta}
    _, _, g_hat = expected_gradients(ctx, stage, theta, w, lookahead, recorded)
    lam, beta = 0.5, ctx.cfg.bridge.beta
    for n, before in w.items():
        expected = before - beta * ((1 - lam) * g_sft[n] + lam * (g_rl[n] - g_hat[n]))
        torch.testing.assert_close(stage.upper[n].detach(), expected, atol=1e-6, rtol=1e-4)


def test_lambda_ramp_and_logged_quantities(monkeypatch):
    ctx, stage, recorded = make_stage(
        ["bridge.lam_start=0.2", "bridge.lam_end=0.8", "bridge.shadow_rollouts=true"], monkeypatch
    )
    outputs = [stage.step() for _ in range(3)]
    assert [o.metrics["bridge/lambda"] for o in outputs] == pytest.approx([0.2, 0.5, 0.8])
    for output in outputs:
        m = output.metrics
        assert m["bridge/coop_gain"] == pytest.approx(m["train/rl_loss_shadow"] - m["train/rl_loss"])
        for key in (
            "train/sft_loss",
            "train/reward_mean",
            "bridge/grad_norm_theta",
            "bridge/grad_norm_w",
            "bridge/grad_norm_theta_hat",
            "bridge/reward_gap",
            "bridge/shadow_clip_frac",
        ):
            assert key in m
        assert -1.0 <= m["bridge/reward_gap"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("lower", ["full", "lora"])
def test_ablation_upper_joint_trains_w_on_the_joint_loss_without_a_shadow(lower, monkeypatch):
    """bridge.upper=joint (the paper's "w/o J_meta"): theta as in BRIDGE (Eq. 8), w -= beta grad_w of the joint
    loss only: the cooperative gain's shadow term is gone, and so is the shadow."""
    lam = 0.5
    ctx, stage, recorded = make_stage(
        [f"model.finetune={lower}", "bridge.upper=joint", f"bridge.lam={lam}"], monkeypatch
    )
    assert stage.upper and stage.shadow == {} and stage.shadow_optimizer is None
    stage.step()  # a second step: theta has moved, so the check does not pass at theta_0 by accident
    theta, w = snapshot(stage.lower), snapshot(stage.upper)
    out = stage.step()
    assert "bridge/coop_gain" not in out.metrics and "train/rl_loss_shadow" not in out.metrics
    g_sft, g_rl, _ = expected_gradients(ctx, stage, theta, w, theta, recorded)
    alpha, beta = ctx.cfg.bridge.alpha, ctx.cfg.bridge.beta
    for n, before in theta.items():
        expected = before - alpha * ((1 - lam) * g_sft[n] + lam * g_rl[n])
        torch.testing.assert_close(stage.lower[n].detach(), expected, atol=1e-6, rtol=1e-4)
    moved = 0.0
    for n, before in w.items():
        expected = before - beta * ((1 - lam) * g_sft[n] + lam * g_rl[n])
        torch.testing.assert_close(stage.upper[n].detach(), expected, atol=1e-6, rtol=1e-4)
        moved = max(moved, float((expected - before).abs().max()))
    assert moved > 1e-4  # w did learn from the joint loss


def test_ablation_upper_none_has_no_adapter_w_and_trains_theta_on_the_fused_loss(monkeypatch):
    lam = 0.5
    # lower=lora: the independent copies run peft's own LoRA forward (with lower=full there would be no adapter)
    ctx, stage, recorded = make_stage(["bridge.upper=none", "model.finetune=lora", f"bridge.lam={lam}"], monkeypatch)
    assert stage.upper == {} and stage.shadow == {} and stage.upper_optimizer is None
    assert not any(".w." in n for n, _ in ctx.policy.model.named_parameters())
    theta = snapshot(stage.lower)
    stage.step()
    g_sft, g_rl, _ = expected_gradients(ctx, stage, theta, {}, theta, recorded)
    for n, before in theta.items():
        expected = before - ctx.cfg.bridge.alpha * ((1 - lam) * g_sft[n] + lam * g_rl[n])
        torch.testing.assert_close(stage.lower[n].detach(), expected, atol=1e-6, rtol=1e-4)


def test_ablation_settings_are_checked():
    from bridgectl.errors import UserError

    for bad in (
        ["bridge.upper=meta"],
        ["bridge.upper=joint", "bridge.shadow=lookahead"],
        ["bridge.upper=none", "bridge.shadow_rollouts=true"],
    ):
        with pytest.raises(UserError):
            compose(["recipe=bridge", *bad])


def test_shadow_clip_fraction_is_the_shadows_own(monkeypatch):
    """bridge/shadow_clip_frac is the clipped share of the shadow's tokens: once theta_hat has drifted from the
    theta that sampled, it equals the share recomputed by hand from theta_hat's ratios; the joint branch's own
    (on-policy at its pass) stays 0."""
    ctx, stage, recorded = make_stage(["bridge.lam=0.5"], monkeypatch)
    for _ in range(2):  # theta and theta_hat drift apart (theta takes SFT too)
        stage.step()
    theta_hat = snapshot(stage.shadow)
    out = stage.step()
    scored = recorded["sample_groups"]
    model = copy.deepcopy(ctx.policy.model)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in theta_hat.items():
            params[name].copy_(value)
        logprobs = completion_logprobs(model, scored.rollouts, ctx.cfg.rl.temperature)
    ratio = torch.exp(logprobs - scored.rollouts.sampling_logprobs)
    eps, advantage, mask = ctx.cfg.rl.epsilon, scored.advantages.unsqueeze(1), scored.rollouts.completion_mask
    clipped = ((ratio < 1 - eps) & (advantage < 0)) | ((ratio > 1 + eps) & (advantage > 0))
    expected = float((clipped.float() * mask).sum() / mask.sum())
    assert expected > 0  # the shadow has drifted far enough for clipping to act: the check can fail
    assert out.metrics["bridge/shadow_clip_frac"] == pytest.approx(expected, abs=1e-6)
    assert out.metrics["train/clip_fraction"] == 0.0
