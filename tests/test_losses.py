"""GRPO advantages and policy loss, and the SFT loss, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from bridgectl.core.advantages import group_advantages
from bridgectl.core.losses import make_sft_batch, sft_loss
from bridgectl.core.policy_losses import grpo_loss

# ---- group_advantages --------------------------------------------------------------------------------------
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])


def test_group_advantages_unscaled_by_hand():
    # group means 0.5, 1.0, 0.25
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0, -0.25, -0.25, 0.75, -0.25])
    assert torch.allclose(group_advantages(REWARDS, 4, "none"), expected, atol=1e-7)


def test_group_advantages_scaled_by_hand():
    # group 1: deviations +-0.5, sample std sqrt(4 * 0.25 / 3) = 1/sqrt(3)  -> +-0.5 * sqrt(3)
    # group 3: deviations (-.25, -.25, .75, -.25), sample std sqrt(0.75 / 3) = 0.5  -> (-.5, -.5, 1.5, -.5)
    h = 0.5 * math.sqrt(3)
    expected = torch.tensor([h, -h, -h, h, 0.0, 0.0, 0.0, 0.0, -0.5, -0.5, 1.5, -0.5])
    assert torch.allclose(group_advantages(REWARDS, 4, "group"), expected, atol=1e-3)


def test_group_advantages_zero_mean_unit_std_per_group():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.rand(5 * 6, generator=generator) * 3
    advantages = group_advantages(rewards, 6, "group").view(5, 6)
    assert torch.allclose(advantages.mean(dim=1), torch.zeros(5), atol=1e-5)
    assert torch.allclose(advantages.std(dim=1), torch.ones(5), atol=1e-3)
    # each group is normalised on its own: scaling one group's rewards does not change any advantage
    scaled = rewards.view(5, 6).clone()
    scaled[2] *= 10
    assert torch.allclose(group_advantages(scaled.reshape(-1), 6, "group").view(5, 6), advantages, atol=1e-3)


def test_group_advantages_groups_are_consecutive_rows():
    rewards = torch.tensor([0.0, 1.0, 2.0, 10.0, 20.0, 30.0])
    advantages = group_advantages(rewards, 3, "none")
    assert torch.allclose(advantages, torch.tensor([-1.0, 0.0, 1.0, -10.0, 0.0, 10.0]))


def test_group_advantages_all_equal_group_is_zero():
    for scale in ("group", "none"):
        advantages = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), 3, scale)
        assert torch.equal(advantages, torch.zeros(6))
        assert torch.isfinite(advantages).all()


# ---- grpo_loss ---------------------------------------------------------------------------------------------
def _batch():
    """3 completions of lengths 4, 1, 3 (right padding) with random log-probs."""
    generator = torch.Generator().manual_seed(1)
    logprobs = (-torch.rand(3, 4, generator=generator) * 3).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]])
    return logprobs, mask


def test_grpo_on_policy_gradient_is_minus_advantage_over_token_count():
    logprobs, mask = _batch()
    advantages = torch.tensor([1.5, -0.5, 2.0])
    loss, stats = grpo_loss(logprobs, logprobs.detach(), advantages, mask, epsilon=0.2)
    loss.backward()
    n_tokens = 8  # 4 + 1 + 3
    expected = torch.zeros(3, 4)
    for i in range(3):
        for t in range(4):
            if mask[i, t]:
                expected[i, t] = -advantages[i] / n_tokens
    assert torch.allclose(logprobs.grad, expected, atol=1e-7)
    assert stats.clip_fraction == 0.0
    assert stats.kl == 0.0
    # ratio is 1 everywhere, so the loss is minus the token-weighted mean advantage
    assert loss.item() == pytest.approx(-(1.5 * 4 - 0.5 * 1 + 2.0 * 3) / 8)


def test_grpo_token_level_averaging_weighs_long_completions_more():
    # one long completion (6 tokens, A=+1) and one short one (1 token, A=-1), on-policy
    logprobs = torch.full((2, 6), -1.0, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    loss, _ = grpo_loss(logprobs, logprobs.detach(), torch.tensor([1.0, -1.0]), mask, epsilon=0.2)
    token_level = -(1.0 * 6 + (-1.0) * 1) / 7  # sum over all tokens / number of tokens
    per_sequence = -(1.0 + (-1.0)) / 2  # what per-sequence averaging would give
    assert loss.item() == pytest.approx(token_level)
    assert loss.item() != pytest.approx(per_sequence)


def test_grpo_padding_values_do_not_matter():
    logprobs, mask = _batch()
    old = logprobs.detach() + torch.tensor([[0.1, -0.1, 0.05, 0.0], [0.0, 0.0, 0.0, 0.0], [0.2, -0.3, 0.1, 0.0]])
    advantages = torch.tensor([1.0, -1.0, 0.5])
    loss, stats = grpo_loss(logprobs, old, advantages, mask, epsilon=0.2)
    # garbage in padded positions (huge ratios) must change neither the loss nor the clip fraction
    noisy = logprobs.detach().clone()
    noisy_old = old.clone()
    noisy[mask == 0] = 5.0
    noisy_old[mask == 0] = -5.0
    loss2, stats2 = grpo_loss(noisy, noisy_old, advantages, mask, epsilon=0.2)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)
    assert stats2.clip_fraction == pytest.approx(stats.clip_fraction)


def _reference_surrogate_grad(delta: float, advantage: float, epsilon: float, n_tokens: int) -> float:
    """d/d logp of -min(r A, clip(r) A) / n, by cases: zero on the clipped side, -A r / n elsewhere."""
    ratio = math.exp(delta)
    if (ratio > 1 + epsilon and advantage > 0) or (ratio < 1 - epsilon and advantage < 0):
        return 0.0
    return -advantage * ratio / n_tokens


def test_grpo_clipping_gradients_and_clip_fraction():
    epsilon = 0.2
    # per-token log-ratio: far above 1+eps, far below 1-eps, inside, exactly on-policy; last column is padding
    deltas = torch.tensor([0.5, -0.5, 0.1, 0.0, 3.0])
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -1.0]] * 2)
    logprobs = (old + deltas).clone().requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1, 0]] * 2)
    advantages = torch.tensor([1.0, -2.0])
    loss, stats = grpo_loss(logprobs, old, advantages, mask, epsilon=epsilon)
    loss.backward()

    n_tokens = 8
    expected_grad = torch.tensor(
        [
            [
                _reference_surrogate_grad(float(d), float(a), epsilon, n_tokens) * int(m)
                for d, m in zip(deltas, mask_row)
            ]
            for a, mask_row in zip(advantages, mask)
        ]
    )
    assert torch.allclose(logprobs.grad, expected_grad, atol=1e-6)
    # spelled out: A>0 with r>1+eps and A<0 with r<1-eps are the clipped (zero-gradient) tokens ...
    assert logprobs.grad[0, 0] == 0.0 and logprobs.grad[1, 1] == 0.0
    # ... while the opposite sides keep their gradient
    assert logprobs.grad[0, 1] < 0 and logprobs.grad[1, 0] > 0
    # exactly those two tokens count as clipped (not the padded one with an enormous ratio)
    assert stats.clip_fraction == pytest.approx(2 / n_tokens)

    # loss value, token by token: -min(r A, clip(r) A)
    total = 0.0
    for a, mask_row in zip(advantages.tolist(), mask.tolist()):
        for d, m in zip(deltas.tolist(), mask_row):
            r = math.exp(d)
            total += m * -min(r * a, min(max(r, 1 - epsilon), 1 + epsilon) * a)
    assert loss.item() == pytest.approx(total / n_tokens, rel=1e-6)


def test_grpo_kl_term_by_hand():
    logprobs, mask = _batch()
    generator = torch.Generator().manual_seed(2)
    ref = logprobs.detach() + torch.randn(3, 4, generator=generator) * 0.5
    beta = 0.3
    zero = torch.zeros(3)  # no policy-gradient term: the loss is the KL term only
    loss, stats = grpo_loss(logprobs, logprobs.detach(), zero, mask, epsilon=0.2, beta=beta, ref_logprobs=ref)
    values = []
    for i in range(3):
        for t in range(4):
            if mask[i, t]:
                x = float(ref[i, t] - logprobs[i, t].detach())
                values.append(math.exp(x) - x - 1)
    kl = sum(values) / len(values)
    assert kl > 0
    assert stats.kl == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(beta * kl, rel=1e-5)


def test_grpo_kl_is_zero_when_reference_equals_policy():
    logprobs, mask = _batch()
    advantages = torch.tensor([1.0, -1.0, 0.5])
    plain, _ = grpo_loss(logprobs, logprobs.detach(), advantages, mask, epsilon=0.2)
    with_kl, stats = grpo_loss(
        logprobs, logprobs.detach(), advantages, mask, epsilon=0.2, beta=0.5, ref_logprobs=logprobs.detach().clone()
    )
    assert stats.kl == pytest.approx(0.0, abs=1e-7)
    assert with_kl.item() == pytest.approx(plain.item(), abs=1e-7)


def test_grpo_kl_needs_reference():
    logprobs, mask = _batch()
    with pytest.raises(ValueError):
        grpo_loss(logprobs, logprobs.detach(), torch.zeros(3), mask, epsilon=0.2, beta=0.1)


# ---- SFT ---------------------------------------------------------------------------------------------------
PROMPTS = ["4+9*3-5*3=", "1+2="]
COMPLETIONS = ["9*3=7;5*3=5;4+7=1;1-5=6;#6", "#3"]


def test_make_sft_batch_masks_prompt_and_appends_eos(tokenizer):
    batch = make_sft_batch(tokenizer, PROMPTS, COMPLETIONS, "cpu")
    vocab = tokenizer.get_vocab()
    bos, eos, pad = vocab["<s>"], vocab["</s>"], vocab["<pad>"]
    width = 1 + len(PROMPTS[0]) + len(COMPLETIONS[0]) + 1  # BOS + characters + EOS, the longest row
    assert batch.input_ids.shape == (2, width)
    for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        prompt_ids = [bos] + [vocab[c] for c in prompt]
        completion_ids = [vocab[c] for c in completion] + [eos]
        length = len(prompt_ids) + len(completion_ids)
        padding = width - length
        assert batch.input_ids[row].tolist() == prompt_ids + completion_ids + [pad] * padding  # right padding
        assert batch.attention_mask[row].tolist() == [1] * length + [0] * padding
        assert batch.labels[row].tolist() == [-100] * len(prompt_ids) + completion_ids + [-100] * padding
    assert batch.n_tokens == sum(len(c) + 1 for c in COMPLETIONS)


def test_sft_loss_is_cross_entropy_of_completion_tokens_only(tiny_model, tokenizer):
    batch = make_sft_batch(tokenizer, PROMPTS, COMPLETIONS, "cpu")
    loss = sft_loss(tiny_model, batch)

    # reference: each row on its own (no padding), log-softmax, gather the completion tokens' log-probs
    vocab = tokenizer.get_vocab()
    completion_nll, all_nll = [], []
    with torch.no_grad():
        for prompt, completion in zip(PROMPTS, COMPLETIONS):
            ids = [vocab["<s>"]] + [vocab[c] for c in prompt + completion] + [vocab["</s>"]]
            logprobs = torch.log_softmax(tiny_model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
            n_prompt = 1 + len(prompt)
            for t in range(1, len(ids)):
                nll = -float(logprobs[t - 1, ids[t]])
                all_nll.append(nll)
                if t >= n_prompt:
                    completion_nll.append(nll)
    assert len(completion_nll) == batch.n_tokens
    expected = sum(completion_nll) / len(completion_nll)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the prompt really is excluded: the all-token mean is different
    assert sum(all_nll) / len(all_nll) != pytest.approx(expected, rel=1e-3)


def test_sft_loss_gradient_flows(tiny_model, tokenizer):
    batch = make_sft_batch(tokenizer, PROMPTS, COMPLETIONS, "cpu")
    tiny_model.zero_grad()
    sft_loss(tiny_model, batch).backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    tiny_model.zero_grad(set_to_none=True)


# ---- the GRPO variants against their papers' formulas, computed by hand -------------------------------------------
def variant_batch():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.5, -0.5], [-0.1, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logprobs, old, torch.tensor([1.0, -2.0]), mask


def test_gspo_takes_one_ratio_per_completion_the_exponentiated_mean_log_ratio():
    """GSPO (arXiv 2507.18071, Eq. 7): s_i = exp(mean_t log(pi / pi_old)), clipped as the token ratio is; with
    loss_type grpo the loss is the mean over completions of -min(s A, clip(s) A)."""
    from bridgectl.core.policy_losses import PolicyLossOptions

    logprobs, old, advantages, mask = variant_batch()
    loss, _ = grpo_loss(
        logprobs,
        old,
        advantages,
        mask,
        epsilon=0.2,
        loss_type="grpo",
        options=PolicyLossOptions(importance_sampling_level="sequence"),
    )
    first = math.exp((0.2 - 0.5 + 0.0) / 3)  # 0.905: inside [0.8, 1.2]
    second = math.exp((-0.2 - 0.2) / 2)  # 0.819, advantage -2: -min(-2 s, -2 clip(s)) = 2 max(s, clip(s))
    expected = (-(first * 1.0) + 2 * max(second, min(max(second, 0.8), 1.2))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/d logp of the first completion's loss -s/2: s/2 * (1/3) per token, with the minus sign
    assert logprobs.grad[0].tolist() == pytest.approx([-first / 6] * 3, rel=1e-5)


def test_cispo_clips_the_weight_and_keeps_every_token_s_gradient():
    """CISPO (MiniMax-M1, arXiv 2506.13585, Eq. 4): -sg(min(r, eps_high)) A log pi per token, a token mean (dapo):
    the gradient of a token whose ratio is above eps_high is the capped weight times A, not zero as under the PPO
    clip."""
    logprobs, old, advantages, mask = variant_batch()
    loss, stats = grpo_loss(logprobs, old, advantages, mask, epsilon=0.2, epsilon_high=1.1, loss_type="cispo")
    ratio = torch.exp(logprobs.detach() - old)
    weight = torch.clamp(ratio, max=1.1)
    expected = -(weight * advantages[:, None] * logprobs.detach() * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.allclose(logprobs.grad, -(weight * advantages[:, None] * mask) / mask.sum(), atol=1e-7)
    capped = (ratio > 1.1) & (advantages[:, None] > 0) & mask.bool()
    assert stats.clip_fraction == pytest.approx(capped.sum().item() / mask.sum().item())
    assert capped.any()


def test_sapo_is_a_soft_gate_and_delta_caps_the_unclipped_ratio():
    """SAPO (arXiv 2511.20347): -A (4 / tau) sigmoid(tau (r - 1)), tau 1.0 for A > 0 and 1.05 below, a mean per
    completion; delta (arXiv 2505.22617): -min(min(r, delta) A, clip(r) A), which for A < 0 and r > delta stops the
    loss growing with r."""
    from bridgectl.core.policy_losses import PolicyLossOptions

    logprobs, old, advantages, mask = variant_batch()
    loss, _ = grpo_loss(logprobs, old, advantages, mask, epsilon=0.2, loss_type="sapo")
    ratio = torch.exp(logprobs.detach() - old)
    tau = torch.tensor([[1.0], [1.05]])
    per_token = -advantages[:, None] * 4 / tau * torch.sigmoid(tau * (ratio - 1))
    expected = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

    far = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # the second completion's ratios: e^1 = 2.72
    capped, _ = grpo_loss(
        far, torch.zeros(2, 3), advantages, mask, epsilon=0.2, loss_type="dapo", options=PolicyLossOptions(delta=1.5)
    )
    uncapped, _ = grpo_loss(far, torch.zeros(2, 3), advantages, mask, epsilon=0.2, loss_type="dapo")
    assert capped.item() == pytest.approx((-1.0 * 3 + 2 * 1.5 * 2) / 5, rel=1e-6)
    assert uncapped.item() == pytest.approx((-1.0 * 3 + 2 * math.e * 2) / 5, rel=1e-6)


def test_the_entropy_mask_and_bonus_act_on_the_chosen_tokens_only():
    """rl.top_entropy_quantile: tokens outside the mask add nothing to the policy term; rl.entropy_coef subtracts
    coef x the mean entropy of the tokens trained on, with its gradient."""
    from bridgectl.core.policy_losses import PolicyLossOptions

    logprobs, old, advantages, mask = variant_batch()
    entropies = torch.tensor([[0.5, 2.0, 1.0], [3.0, 0.1, 9.0]], requires_grad=True)
    chosen = torch.tensor([[False, True, False], [True, False, False]])
    loss, stats = grpo_loss(
        logprobs,
        old,
        advantages,
        mask,
        epsilon=0.2,
        loss_type="dapo",
        options=PolicyLossOptions(entropy_coef=0.1),
        entropies=entropies,
        entropy_mask=chosen,
    )
    plain, _ = grpo_loss(logprobs, old, advantages, mask * chosen, epsilon=0.2, loss_type="dapo", n_tokens=mask.sum())
    assert loss.item() == pytest.approx(plain.item() - 0.1 * (2.0 + 3.0) / 2, rel=1e-6)
    assert stats.entropy == pytest.approx((0.5 + 2.0 + 1.0 + 3.0 + 0.1) / 5)
    loss.backward()
    assert torch.allclose(entropies.grad, torch.tensor([[0.0, -0.05, 0.0], [-0.05, 0.0, 0.0]]))


def test_rloo_subtracts_the_mean_of_the_other_rewards_of_the_group():
    """RLOO (arXiv 2402.14740, Eq. 6; TRL's RLOOTrainer): A_i = r_i - (sum_j r_j - r_i) / (G - 1); with
    scale_rewards=batch divided by the std of the step's advantages (TRL's normalize_advantages)."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 1.5])
    plain = group_advantages(rewards, 4, "none", "rloo")
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, -1 / 3, -1 / 3, -1 / 3, 1.0])
    assert torch.allclose(plain, expected, atol=1e-6)
    assert torch.allclose(plain, 4 / 3 * group_advantages(rewards, 4, "none"), atol=1e-6)  # G/(G-1) x centred
    scaled = group_advantages(rewards, 4, "batch", "rloo")
    assert torch.allclose(scaled, expected / (expected.std() + 1e-4), atol=1e-6)


def test_normalize_then_sum_normalises_each_reward_function_in_its_group_then_the_sum_over_the_step():
    """TRL's multi_objective_aggregation="normalize_then_sum" (GDPO): per function, (r - group mean) / (group std +
    1e-4); weighted sum; then (s - mean) / (std + 1e-4) over the step."""
    from bridgectl.core.advantages import normalize_then_sum

    values = torch.tensor([[1.0, 0.2], [0.0, 0.8], [1.0, 0.5], [1.0, 0.1]])  # 2 groups of 2, 2 functions
    weights = torch.tensor([1.0, 0.5])
    by_hand = []
    for group in (values[:2], values[2:]):
        normalised = (group - group.mean(0)) / (group.std(0) + 1e-4)
        by_hand.append((normalised * weights).sum(1))
    summed = torch.cat(by_hand)
    expected = (summed - summed.mean()) / (summed.std() + 1e-4)
    assert torch.allclose(normalize_then_sum(values, weights, 2), expected, atol=1e-5)
    # the second group's first function is constant: it adds nothing there, the second function decides
    assert normalize_then_sum(values, weights, 2)[2] > normalize_then_sum(values, weights, 2)[3]


def test_bnpo_and_luspo_reduce_the_clipped_surrogate_by_tokens_and_by_per_completion_sums():
    """bnpo (TRL): sum / the process's tokens, = dapo in one process; luspo (arXiv 2602.05261): the mean over
    completions of their token sums, so with the same per-token term a completion of 3 tokens weighs 1.5x one of
    2."""
    logprobs, old, advantages, mask = variant_batch()
    ratio = torch.exp(logprobs.detach() - old)
    per_token = -torch.min(ratio * advantages[:, None], ratio.clamp(0.8, 1.2) * advantages[:, None]) * mask
    bnpo, _ = grpo_loss(logprobs, old, advantages, mask, epsilon=0.2, loss_type="bnpo")
    dapo, _ = grpo_loss(logprobs, old, advantages, mask, epsilon=0.2, loss_type="dapo")
    assert bnpo.item() == pytest.approx(per_token.sum().item() / 5, rel=1e-6) and bnpo.item() == dapo.item()
    luspo, _ = grpo_loss(logprobs, old, advantages, mask, epsilon=0.2, loss_type="luspo")
    assert luspo.item() == pytest.approx(per_token.sum(1).mean().item(), rel=1e-6)
    luspo.backward()
    assert logprobs.grad[0, 1].item() == pytest.approx(-ratio[0, 1].item() * 1.0 / 2, rel=1e-5)  # -r A / N, N = 2


def test_vespo_weights_each_completion_by_a_gamma_shaped_function_of_its_summed_log_ratio():
    """VESPO (arXiv 2602.10693): phi(w) = e^lambda w^k e^{-lambda w}, w = exp(sum_t log r_t), (k, lambda) = (2, 3)
    for A >= 0 and (3, 2) below; loss -sum phi A log pi / tokens; phi is detached, so d/d log pi = -phi A / tokens;
    phi(1) = 1 and phi falls away from w = 1 on both sides for A >= 0 (its maximum is at w = k / lambda)."""
    from bridgectl.core.policy_losses import PolicyLossOptions, vespo_weights

    logprobs, old, advantages, mask = variant_batch()
    loss, _ = grpo_loss(logprobs, old, advantages, mask, epsilon=0.2, loss_type="vespo")
    w = [math.exp(0.2 - 0.5 + 0.0), math.exp(-0.2 - 0.2)]
    phi = [math.exp(3) * w[0] ** 2 * math.exp(-3 * w[0]), math.exp(2) * w[1] ** 3 * math.exp(-2 * w[1])]
    expected = -(phi[0] * 1.0 * (-1.0 - 2.0 - 0.5) + phi[1] * -2.0 * (-0.3 - 1.2)) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert logprobs.grad[1, :2].tolist() == pytest.approx([-phi[1] * -2.0 / 5] * 2, rel=1e-5)
    options = PolicyLossOptions()
    at = [
        vespo_weights(torch.tensor([[1.0]]), torch.tensor([[math.log(x)]]), torch.ones(1, 1), None, options).item()
        for x in (0.5, 1.0, 2 / 3, 1.5)
    ]
    assert at[1] == pytest.approx(1.0) and at[2] > at[1] > at[3] and at[2] > at[0]


def test_the_off_policy_mask_drops_negative_advantage_completions_that_drifted_too_far():
    """DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556, Eq. 9): a completion is dropped when A < 0 and
    mean_t (log pi_behaviour - log pi) > delta; kept when A >= 0 whatever its drift."""
    from bridgectl.core.policy_losses import PolicyLossOptions, off_policy_mask

    logprobs, old, advantages, mask = variant_batch()
    # drift of completion 1 (A = 1): 0.1 per token; of completion 2 (A = -2): mean(0.2, 0.2) = 0.2
    drift = torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.2, 9.0]])  # the padded position's value must not count
    behaviour = logprobs.detach() + drift
    kept = off_policy_mask(advantages[:, None], logprobs.detach(), behaviour, mask, threshold=0.15)
    assert kept.flatten().tolist() == [1.0, 0.0]
    assert off_policy_mask(advantages[:, None], logprobs.detach(), behaviour, mask, 0.25).flatten().tolist() == [1, 1]
    masked, _ = grpo_loss(
        logprobs,
        old,
        advantages,
        mask,
        epsilon=0.2,
        behaviour_logprobs=behaviour,
        options=PolicyLossOptions(off_policy_mask_threshold=0.15),
    )
    ratio = torch.exp(logprobs.detach() - old)
    first = -torch.min(ratio[0], ratio[0].clamp(0.8, 1.2)).sum() * 1.0
    assert masked.item() == pytest.approx(first.item() / 5, rel=1e-6)  # the second completion's terms are gone


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_the_rollout_correction_is_the_trainer_over_engine_ratio_truncated_or_masked(mode):
    """Truncated / masked importance sampling between the trainer and an inference engine (TRL 1.16's
    vllm_importance_sampling_*): rho = exp(log pi_trainer - log pi_engine) per token, or exp of the completion's
    summed gap; truncate: clamp to [C_min, C_max]; mask: 0 outside; a NaN engine value is no gap."""
    from bridgectl.core.policy_losses import rollout_correction

    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
    engine = torch.tensor([[-1.5, -2.0, float("nan")], [-0.1, -1.2, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    ratio, acted = rollout_correction(trainer, engine, mask, mode, 0.8, 1.5)
    if mode.startswith("token"):
        raw = torch.tensor([[math.exp(0.5), 1.0, 1.0], [math.exp(-0.2), 1.0, 1.0]])
    else:
        raw = torch.tensor([[math.exp(0.5)], [math.exp(-0.2)]])
    outside = (raw < 0.8) | (raw > 1.5)
    expected = raw.clamp(0.8, 1.5) if mode.endswith("truncate") else raw.masked_fill(outside, 0.0)
    assert torch.allclose(ratio, expected, atol=1e-6) and torch.equal(acted, outside)
    assert outside.any() and not outside.all()
    # it multiplies each token's policy term
    logprobs = trainer.clone().requires_grad_(True)
    old, advantages = trainer - 0.05, torch.tensor([1.0, -2.0])
    plain, _ = grpo_loss(logprobs, old, advantages, mask, epsilon=0.2)
    corrected, _ = grpo_loss(logprobs, old, advantages, mask, epsilon=0.2, rollout_ratio=ratio)
    ratio_pi = torch.exp(torch.full((2, 3), 0.05))
    per_token = -torch.min(ratio_pi * advantages[:, None], ratio_pi.clamp(0.8, 1.2) * advantages[:, None])
    assert corrected.item() == pytest.approx((per_token * ratio * mask).sum().item() / 5, rel=1e-5)
    assert corrected.item() != pytest.approx(plain.item())


def test_reinforce_plus_plus_whitens_the_rewards_over_the_steps_tokens():
    """REINFORCE++ (arXiv 2501.03262; verl's masked_whiten, outcome reward, gamma 1): each completion's reward, for
    each of its tokens, minus the token-weighted mean, over sqrt(Bessel-corrected token variance + 1e-8); the
    _baseline variant subtracts the group's mean reward first."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 1.5])
    lengths = torch.tensor([3, 1, 2, 4, 2, 2, 2, 5])
    tokens = torch.cat([torch.full((int(n),), float(r)) for r, n in zip(rewards, lengths)])
    plain = group_advantages(rewards, 4, "batch", "reinforce_plus_plus", lengths)
    expected = (rewards - tokens.mean()) / (tokens.var() + 1e-8).sqrt()  # torch.var is Bessel-corrected
    assert torch.allclose(plain, expected, atol=1e-6)
    centred = rewards - rewards.view(2, 4).mean(1).repeat_interleave(4)
    centred_tokens = torch.cat([torch.full((int(n),), float(r)) for r, n in zip(centred, lengths)])
    baseline = group_advantages(rewards, 4, "batch", "reinforce_plus_plus_baseline", lengths)
    assert torch.allclose(baseline, (centred - centred_tokens.mean()) / (centred_tokens.var() + 1e-8).sqrt(), atol=1e-6)
    # token weighting: the long completion of reward 1.5 pulls the mean, unlike a per-completion mean
    assert not torch.allclose(plain, (rewards - rewards.mean()) / rewards.std(), atol=1e-3)
