"""LUFFY's update rule checked against an independent computation: the mixed groups' advantages on constructed
rewards, the shaping function and its gradient, one step's gradient against the loss written out in the test
(full-vocabulary log-softmax on a copy of the model, advantages by hand), and luffy.off_policy=0 giving exactly
the rl stage's gradient."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from gradient_checks import record_returns, record_updates

import bridgectl.stages.luffy as luffy_module
from bridgectl.config.compose import compose
from bridgectl.core.rollout import positions
from bridgectl.errors import UserError
from bridgectl.stages import build_stage
from bridgectl.stages.luffy import mixed_advantages, shaping
from bridgectl.training.setup import build_context

SMALL = [
    "rl.prompts_per_step=4",
    "rl.num_generations=4",
    "rl.max_completion_length=16",
    "train.threads=1",
    "optim.max_grad_norm=0",
]


# ---- advantages and shaping ------------------------------------------------------------------------------------
def by_hand(members: list[float], std_normalize: bool) -> list[float]:
    mean = sum(members) / len(members)
    std = math.sqrt(sum((m - mean) ** 2 for m in members) / (len(members) - 1))
    return [(m - mean) / (std + 1e-4) if std_normalize else m - mean for m in members]


@pytest.mark.parametrize("std_normalize", [True, False])
def test_mixed_group_advantages_on_constructed_rewards(std_normalize):
    # G = 4, one demonstration per group: rollouts [1,0,0] + demo 1; [0,0,0] + demo 1 (only the demonstration is
    # right); [1,1,1] + demo 0 (a wrong demonstration)
    on = torch.tensor([1.0, 0, 0, 0, 0, 0, 1, 1, 1])
    demo = torch.tensor([1.0, 1.0, 0.0])
    on_adv, demo_adv = mixed_advantages(on, demo, 1, std_normalize)
    groups = [[1, 0, 0, 1], [0, 0, 0, 1], [1, 1, 1, 0]]
    expected = [by_hand(g, std_normalize) for g in groups]
    torch.testing.assert_close(on_adv, torch.tensor([a for g in expected for a in g[:3]]))
    torch.testing.assert_close(demo_adv, torch.tensor([g[3] for g in expected]))
    if std_normalize:  # the lone correct demonstration: (1 - 1/4) / std([0,0,0,1]) = 0.75 / 0.5
        assert demo_adv[1].item() == pytest.approx(1.5, abs=1e-3)
        assert demo_adv[2] < 0 and (on_adv[6:] > 0).all()

    # two off-policy members per group (G = 4: two rollouts and two copies of the demonstration)
    on_adv, demo_adv = mixed_advantages(torch.tensor([1.0, 0, 0, 0]), torch.tensor([1.0, 0.0]), 2, std_normalize)
    first, second = by_hand([1, 0, 1, 1], std_normalize), by_hand([0, 0, 0, 0], std_normalize)
    torch.testing.assert_close(on_adv, torch.tensor(first[:2] + second[:2]))
    torch.testing.assert_close(demo_adv, torch.tensor([first[2], second[2]]))

    # no off-policy member: plain GRPO advantages, and zeros for the (absent) demonstrations
    on_adv, demo_adv = mixed_advantages(torch.tensor([1.0, 0, 0, 1]), torch.tensor([1.0]), 0, std_normalize)
    torch.testing.assert_close(on_adv, torch.tensor(by_hand([1, 0, 0, 1], std_normalize)))
    assert demo_adv.tolist() == [0.0]


def test_shaping_function_and_its_gradient():
    gamma = 0.1
    probs = torch.tensor([1e-3, 0.01, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    torch.testing.assert_close(shaping(probs, gamma), probs / (probs + gamma))
    assert shaping(torch.tensor(gamma), gamma).item() == pytest.approx(0.5)
    # d f(p) / d log p = gamma p / (p + gamma)^2: the weight of grad log p in the off-policy gradient
    logprobs = probs.log().requires_grad_(True)
    (grad,) = torch.autograd.grad(shaping(logprobs.exp(), gamma).sum(), logprobs)
    torch.testing.assert_close(grad, gamma * probs / (probs + gamma) ** 2)
    # largest (1/4) at p = gamma; unlike the plain ratio's weight p, it rises as p falls towards gamma and is
    # smaller than p for confident tokens
    assert grad[2].item() == pytest.approx(0.25) and grad.argmax().item() == 2
    assert grad[0] > probs[0] and grad[-1] < probs[-1]


def test_off_policy_must_leave_an_on_policy_rollout():
    with pytest.raises(UserError, match="luffy.off_policy"):
        compose(["recipe=luffy", "rl.num_generations=4", "luffy.off_policy=4"])
    compose(["recipe=luffy", "rl.num_generations=4", "luffy.off_policy=3"])


# ---- one step against the loss written out -------------------------------------------------------------------
def capture_step(overrides: list[str], kind: str, monkeypatch):
    """One step of a fresh `kind` stage: the gradients it clips (cloned before the optimizer uses them), the model
    as it was before the step, the sampled mixed groups (luffy only) and the config."""
    updates = record_updates(monkeypatch)
    mixed = record_returns(monkeypatch, luffy_module, "sample_mixed_groups")
    cfg = compose([f"recipe={kind}", *SMALL, *overrides])
    ctx = build_context(cfg, show_progress=False)
    before = copy.deepcopy(ctx.policy.model)
    build_stage(kind, ctx, 3).step()
    monkeypatch.undo()
    assert len(updates) == 1
    return updates[0][1], before, mixed[-1] if mixed else None, cfg


def full_logprobs(model, input_ids, mask, first_scored, temperature):
    """log pi(x_t | x_<t) for t >= first_scored from a float32 log-softmax over the whole vocabulary."""
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask)).logits
    logprobs = torch.log_softmax(logits[:, first_scored - 1 : -1].float() / temperature, dim=-1)
    return logprobs.gather(2, input_ids[:, first_scored:].unsqueeze(2)).squeeze(2)


@pytest.mark.parametrize("off_policy,micro,std", [(1, 0, True), (2, 3, False)])
def test_one_step_gradient_equals_the_luffy_loss_gradient(off_policy, micro, std, monkeypatch):
    grads, model, mixed, cfg = capture_step(
        [
            f"luffy.off_policy={off_policy}",
            f"train.micro_batch_size={micro}",
            f"luffy.std_normalize={std}",
            "luffy.gamma=0.2",
        ],
        "luffy",
        monkeypatch,
    )
    G, k, gamma, eps, temperature = 4, off_policy, 0.2, cfg.rl.epsilon, cfg.rl.temperature
    rollouts, demos = mixed.scored.rollouts, mixed.demos
    assert rollouts.completion_ids.size(0) == 4 * (G - k) and demos.input_ids.size(0) == 4

    # advantages by hand from the recorded rewards: each group is its G - k rollouts and k copies of its demo
    on_rewards, demo_rewards = mixed.scored.rewards.tolist(), mixed.demo_rewards.tolist()
    assert all(r == 1.0 for r in demo_rewards)  # the built-in task's demonstrations are correct
    on_adv, demo_adv = [], []
    for g in range(4):
        members = by_hand(on_rewards[g * (G - k) : (g + 1) * (G - k)] + [demo_rewards[g]] * k, std)
        on_adv += members[: G - k]
        demo_adv.append(members[G - k])
    on_adv, demo_adv = torch.tensor(on_adv), torch.tensor(demo_adv)

    # on-policy tokens: the clipped surrogate; off-policy tokens: -A p / (p + gamma), k members each
    input_ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)
    mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1)
    on_logp = full_logprobs(model, input_ids, mask, rollouts.prompt_ids.size(1), temperature)
    ratio = torch.exp(on_logp - rollouts.sampling_logprobs)
    surrogate = torch.min(ratio * on_adv[:, None], ratio.clamp(1 - eps, 1 + eps) * on_adv[:, None])
    on_mask = rollouts.completion_mask.float()
    labels = demos.labels[:, 1:] != -100
    demo_logp = full_logprobs(model, demos.input_ids, demos.attention_mask, 1, temperature)
    p = demo_logp.exp()
    n_tokens = on_mask.sum() + k * labels.sum()
    loss = (-(surrogate * on_mask).sum() + k * (-demo_adv[:, None] * p / (p + gamma) * labels).sum()) / n_tokens
    params = [q for q in model.parameters() if q.requires_grad]
    expected = torch.autograd.grad(loss, params, retain_graph=True)

    assert len(grads) == len(expected)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # the off-policy term matters: without it the gradient would be far from the one taken
    off_only = torch.autograd.grad(
        k * (-demo_adv[:, None] * p / (p + gamma) * labels).sum() / n_tokens, params, allow_unused=True
    )
    assert max(float(g.abs().max()) for g in off_only if g is not None) > 1e-3


def test_no_off_policy_member_is_exactly_the_rl_stage(monkeypatch):
    luffy_grads, _, mixed, _ = capture_step(["luffy.off_policy=0"], "luffy", monkeypatch)
    rl_grads, _, _, _ = capture_step([], "rl", monkeypatch)
    assert mixed.demos is None and mixed.scored.rollouts.completion_ids.size(0) == 16
    assert not torch.all(mixed.scored.advantages == 0)  # a real RL gradient, not a vacuous one
    assert len(luffy_grads) == len(rl_grads)
    for got, want in zip(luffy_grads, rl_grads):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_train_tokens_count_every_copy_of_a_demonstration(monkeypatch):
    """StepOutput.train_tokens, the completion tokens that received a gradient: the rollouts' and k times each
    demonstration's (its k copies are k members of the group, weighted as k rows)."""
    mixed = record_returns(monkeypatch, luffy_module, "sample_mixed_groups")
    ctx = build_context(compose(["recipe=luffy", *SMALL, "luffy.off_policy=2"]), show_progress=False)
    output = build_stage("luffy", ctx, 3).step()
    groups = mixed[-1]
    assert groups.copies == 2 and groups.demos.n_tokens > 0
    assert output.train_tokens == groups.scored.gen_tokens + 2 * groups.demos.n_tokens
