"""The GRPO loss's KL term in both forms (core/policy_losses.grpo_loss): TRL 1.16's default, where each token's k3 term is
weighted by the importance ratio pi/pi_old (`rl.use_bias_correction_kl=true`), and the plain k3 term. Value and
gradient against a token-by-token computation written here from the formulas."""

from __future__ import annotations

import pytest
import torch

from bridgectl.core.policy_losses import grpo_loss


def by_hand(logprobs: list[list[float]], old, ref, advantages, mask, epsilon, beta, corrected) -> float:
    """dapo loss: sum over masked tokens of -min(r A, clip(r) A) + beta * k3 (* r when corrected), / tokens."""
    total, tokens = 0.0, 0
    for row, advantage in enumerate(advantages):
        for t, keep in enumerate(mask[row]):
            if not keep:
                continue
            logp = logprobs[row][t]
            r = (logp - old[row][t]).exp()
            surrogate = -torch.min(r * advantage, r.clamp(1 - epsilon, 1 + epsilon) * advantage)
            d = ref[row][t] - logp
            k3 = d.exp() - d - 1
            total = total + surrogate + beta * (k3 * r if corrected else k3)
            tokens += 1
    return total / tokens


@pytest.mark.parametrize("corrected", [True, False])
def test_kl_value_and_gradient_match_the_formula(corrected):
    generator = torch.Generator().manual_seed(0)
    shape = (3, 5)
    old = -torch.rand(shape, generator=generator) * 2
    ref = old + torch.randn(shape, generator=generator) * 0.3
    start = old + torch.randn(shape, generator=generator) * 0.4  # ratios away from 1, some outside the clip range
    advantages = torch.tensor([1.0, -0.5, 0.8])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    logprobs = start.clone().requires_grad_(True)
    loss, stats = grpo_loss(
        logprobs, old, advantages, mask, epsilon=0.2, beta=0.04, ref_logprobs=ref, bias_correction_kl=corrected
    )
    loss.backward()
    hand_logprobs = [[start[i, j].clone().requires_grad_(True) for j in range(shape[1])] for i in range(shape[0])]
    expected = by_hand(hand_logprobs, old, ref, advantages, mask.tolist(), 0.2, 0.04, corrected)
    expected.backward()
    hand_grad = torch.tensor([[0.0 if x.grad is None else float(x.grad) for x in row] for row in hand_logprobs])
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert torch.allclose(logprobs.grad, hand_grad, atol=1e-7)
    ratio = (start - old).exp()
    k3 = (ref - start).exp() - (ref - start) - 1
    logged = ((k3 * ratio if corrected else k3) * mask).sum() / mask.sum()
    assert stats.kl == pytest.approx(float(logged), rel=1e-6)


def test_the_two_forms_differ_off_policy_and_agree_on_policy():
    generator = torch.Generator().manual_seed(1)
    old = -torch.rand(2, 4, generator=generator)
    ref = old + 0.5
    mask = torch.ones(2, 4)
    advantages = torch.tensor([0.3, -0.3])

    def gradient(logprobs_start, corrected):
        logprobs = logprobs_start.clone().requires_grad_(True)
        loss, _ = grpo_loss(logprobs, old, advantages, mask, 0.2, 0.04, ref, bias_correction_kl=corrected)
        loss.backward()
        return loss.item(), logprobs.grad

    on_policy = [gradient(old, corrected) for corrected in (True, False)]
    assert on_policy[0][0] == pytest.approx(on_policy[1][0], rel=1e-6)  # r = 1: equal values ...
    assert not torch.allclose(on_policy[0][1], on_policy[1][1])  # ... but the ratio's own gradient adds k3
    # d/dlogp of (k3 * r) at r = 1 is dk3/dlogp + k3: the difference of the gradients is beta * k3 / tokens
    k3 = (ref - old).exp() - (ref - old) - 1
    assert torch.allclose(on_policy[0][1] - on_policy[1][1], 0.04 * k3 / mask.sum(), atol=1e-7)
    off = old + 0.1
    assert gradient(off, True)[0] != pytest.approx(gradient(off, False)[0], rel=1e-4)
