"""SRFT's update rule checked against an independent computation: the chunked entropies and the weights built on
them against a direct softmax over a tiny vocabulary, and one step's gradient against the combined loss written out
in the test (full-vocabulary log-softmax and entropy on a copy of the model, advantages by hand)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from gradient_checks import ScaledLogits, record_returns, record_updates
from transformers import LlamaConfig, LlamaForCausalLM

import bridgectl.core.logprobs as logprobs_module
import bridgectl.stages.srft as srft_module
from bridgectl.config.compose import compose
from bridgectl.core.logprobs import token_entropies
from bridgectl.core.rollout import positions
from bridgectl.stages import build_stage
from bridgectl.stages.srft import mean_entropy, rollout_coefficients, sft_weights
from bridgectl.training.setup import build_context

SMALL = [
    "rl.prompts_per_step=4",
    "rl.num_generations=4",
    "rl.max_completion_length=16",
    "train.threads=1",
    "optim.max_grad_norm=0",
]


# ---- entropies and weights -------------------------------------------------------------------------------------
def direct_entropies(model, input_ids, mask, first_scored, temperature):
    """-sum_v p_v log p_v at every position t >= first_scored from the whole [rows, tokens, vocabulary] softmax."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask)).logits
        logprobs = torch.log_softmax(logits[:, first_scored - 1 : -1].float() / temperature, dim=-1)
        return -(logprobs.exp() * logprobs).sum(dim=-1)


@pytest.mark.parametrize("wrapped", [False, True], ids=["chunked-head", "own-forward"])
def test_entropy_weights_equal_a_direct_computation(wrapped, monkeypatch):
    monkeypatch.setattr(logprobs_module, "LOGIT_CHUNK_ELEMENTS", 40 * 3)  # 3 tokens per chunk: several chunks
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=32,
            tie_word_embeddings=False,
        )
    )
    if wrapped:
        model = ScaledLogits(model)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 40, (3, 10), generator=generator)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :2] = 0  # left padding, as rollouts have
    scored = torch.rand(3, 6, generator=generator) > 0.3
    scored[:, 0] = True

    got = token_entropies(model, input_ids, mask, 4, scored, temperature=0.7)
    direct = direct_entropies(model, input_ids, mask, 4, 0.7)
    assert not got.requires_grad and got.shape == scored.shape
    torch.testing.assert_close(got, direct * scored, atol=1e-5, rtol=1e-5)
    assert (got[scored] > 0).all() and (got[scored] <= math.log(40) + 1e-5).all()

    # per-sequence mean over the scored tokens, and the weights built on it
    h = mean_entropy(got, scored)
    expected_h = torch.stack([direct[row][scored[row]].mean() for row in range(3)])
    torch.testing.assert_close(h, expected_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sft_weights(h, 0.5), 0.5 * torch.exp(-expected_h), atol=1e-5, rtol=1e-5)
    rewards = torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(
        rollout_coefficients(h, rewards, 0.1),
        torch.stack([0.1 * torch.exp(expected_h[0]), torch.tensor(-1.0), 0.1 * torch.exp(expected_h[2])]),
        atol=1e-5,
        rtol=1e-5,
    )


def test_weights_are_detached():
    h = torch.tensor([0.3, 1.2], requires_grad=True)
    assert not sft_weights(h, 0.5).requires_grad
    assert not rollout_coefficients(h, torch.tensor([1.0, 0.0]), 0.1).requires_grad


# ---- one step against the loss written out -------------------------------------------------------------------
def full_logprobs(model, input_ids, mask, first_scored, temperature):
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask)).logits
    logprobs = torch.log_softmax(logits[:, first_scored - 1 : -1].float() / temperature, dim=-1)
    return logprobs.gather(2, input_ids[:, first_scored:].unsqueeze(2)).squeeze(2)


def by_hand(members: list[float]) -> list[float]:
    mean = sum(members) / len(members)
    std = math.sqrt(sum((m - mean) ** 2 for m in members) / (len(members) - 1))
    return [(m - mean) / (std + 1e-4) for m in members]


@pytest.mark.parametrize("micro", [0, 3])
def test_one_step_gradient_equals_the_srft_loss_gradient(micro, monkeypatch):
    updates = record_updates(monkeypatch)
    sampled = record_returns(monkeypatch, srft_module, "sample_mixed_groups")
    cfg = compose(["recipe=srft", *SMALL, f"train.micro_batch_size={micro}", "srft.sft_coef=0.7", "srft.rl_coef=0.2"])
    ctx = build_context(cfg, show_progress=False)
    model = copy.deepcopy(ctx.policy.model)
    output = build_stage("srft", ctx, 3).step()
    monkeypatch.undo()
    mixed, temperature, G = sampled[-1], cfg.rl.temperature, 4
    rollouts, demos = mixed.scored.rollouts, mixed.demos
    assert rollouts.completion_ids.size(0) == 4 * (G - 1) and demos.input_ids.size(0) == 4

    # the demonstrations' advantages by hand: each group is its G - 1 rollouts and its demonstration
    on_rewards, demo_rewards = mixed.scored.rewards.tolist(), mixed.demo_rewards.tolist()
    demo_adv = torch.tensor(
        [by_hand(on_rewards[g * (G - 1) : (g + 1) * (G - 1)] + [demo_rewards[g]])[G - 1] for g in range(4)]
    )

    input_ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)
    mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1)
    first = rollouts.prompt_ids.size(1)
    on_mask = rollouts.completion_mask.float()
    on_h = (direct_entropies(model, input_ids, mask, first, temperature) * on_mask).sum(1) / on_mask.sum(1)
    correct = mixed.scored.rewards > 0
    assert correct.any() and (~correct).any()  # both kinds of rollout term are exercised
    on_coef = torch.where(correct, 0.2 * torch.exp(on_h), torch.tensor(-1.0))
    on_logp = full_logprobs(model, input_ids, mask, first, temperature)

    labels = (demos.labels[:, 1:] != -100).float()
    demo_h = (direct_entropies(model, demos.input_ids, demos.attention_mask, 1, temperature) * labels).sum(1)
    demo_h = demo_h / labels.sum(1)
    demo_logp = full_logprobs(model, demos.input_ids, demos.attention_mask, 1, temperature)

    n_all, n_demo = on_mask.sum() + labels.sum(), labels.sum()
    sft = (0.7 * torch.exp(-demo_h)[:, None] * -demo_logp * labels).sum() / n_demo
    rl_demo = (-demo_adv[:, None] * demo_logp.exp() * labels).sum() / n_all
    rl_self = (-on_coef[:, None] * on_logp * on_mask).sum() / n_all
    params = [q for q in model.parameters() if q.requires_grad]
    expected = torch.autograd.grad(sft + rl_demo + rl_self, params)

    assert len(updates) == 1 and len(updates[0][1]) == len(expected)
    for got, want in zip(updates[0][1], expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    m = output.metrics
    assert m["train/sft_loss"] == pytest.approx(sft.item(), rel=1e-4)
    assert m["train/rl_loss"] == pytest.approx((rl_demo + rl_self).item(), rel=1e-4, abs=1e-6)
    assert m["srft/sft_weight"] == pytest.approx((0.7 * torch.exp(-demo_h)).mean().item(), rel=1e-4)
