"""The registries of the RL losses (core/policy_losses.py, core/advantages.py): every rl.loss_type and
rl.adv_estimator that config validation accepts (core/choices.py) has a function registered under its name, an
unknown name is refused naming the choices, and each registered function gives, through its dispatcher, the values
the code gave before the registries existed (one grpo_loss body with a branch per loss type; one group_advantages
with a branch per estimator), two of each checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from bridgectl.core.advantages import ADVANTAGE_ESTIMATORS, group_advantages, register_advantage_estimator
from bridgectl.core.choices import ADV_ESTIMATORS, LOSS_TYPES
from bridgectl.core.policy_losses import (
    POLICY_LOSSES,
    PolicyLossOptions,
    grpo_loss,
    loss_denominator,
    loss_token_weights,
    policy_terms,
    register_policy_loss,
)

# A fixed batch in float64 (3 completions of 4 tokens), so that the recorded values hold to ~1e-15 on any machine.
LOGPROBS = torch.tensor(
    [[-0.9, -1.4, -0.3, -2.0], [-0.5, -0.7, -1.1, -0.2], [-1.6, -0.4, -0.8, -1.0]], dtype=torch.float64
)
OLD = torch.tensor([[-1.0, -1.1, -0.6, -2.3], [-0.2, -0.9, -1.0, -0.1], [-1.2, -0.5, -0.8, -1.5]], dtype=torch.float64)
ADVANTAGES = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
EPSILON, MAX_LENGTH = 0.2, 4

RECORDED_LOSSES = {
    # (loss, clip fraction) of grpo_loss(LOGPROBS, OLD, ADVANTAGES, MASK, 0.2, loss_type=..., max_completion_length=4)
    # as computed by the code before the registry (git 845977b, core/losses.grpo_loss with one branch per loss type)
    "dapo": (-0.1749247869632381, 0.2222222238779068),
    "bnpo": (-0.1749247869632381, 0.2222222238779068),
    "grpo": (-0.25279380480440167, 0.2222222238779068),
    "dr_grpo": (-0.13119359022242857, 0.2222222238779068),
    "luspo": (-0.5247743608897143, 0.2222222238779068),
    "cispo": (0.04111111111111111, 0.5555555820465088),
    "sapo": (-0.5376289785746279, 0.0),
    "vespo": (0.22889733489806904, 0.0),
}

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5], dtype=torch.float64)  # two groups of 4
LENGTHS = torch.tensor([3, 5, 2, 4, 6, 1, 2, 3])
SCALE = {"grpo": "group", "rloo": "none", "reinforce_plus_plus": "batch", "reinforce_plus_plus_baseline": "batch"}
RECORDED_ADVANTAGES = {
    # group_advantages(REWARDS, 4, SCALE[estimator], estimator, LENGTHS) by the code before the registry (git 845977b,
    # core/losses.group_advantages with one branch per estimator)
    "grpo": [
        0.8658754297607016,
        -0.8658754297607016,
        -0.8658754297607016,
        0.8658754297607016,
        0.7831858496123864,
        0.7831858496123864,
        -1.3053097493539774,
        -0.26106194987079545,
    ],
    "rloo": [
        0.6666666666666667,
        -0.6666666666666666,
        -0.6666666666666666,
        0.6666666666666667,
        0.5,
        0.5,
        -0.8333333333333334,
        -0.16666666666666663,
    ],
    "reinforce_plus_plus": [
        0.8602512339489488,
        -1.2698946786865433,
        -1.2698946786865433,
        0.8602512339489488,
        0.8602512339489488,
        0.8602512339489488,
        -1.2698946786865433,
        -0.20482172236879728,
    ],
    "reinforce_plus_plus_baseline": [
        1.0048615895770718,
        -1.1723385211732504,
        -1.1723385211732504,
        1.0048615895770718,
        0.7327115757332815,
        0.7327115757332815,
        -1.4444885350170407,
        -0.3558884796418796,
    ],
}


def dispatched(loss_type: str) -> tuple[float, float]:
    loss, stats = grpo_loss(
        LOGPROBS, OLD, ADVANTAGES, MASK, EPSILON, loss_type=loss_type, max_completion_length=MAX_LENGTH
    )
    return loss.item(), stats.clip_fraction


# ---- every choice is registered, nothing else is accepted ---------------------------------------------------------
def test_every_loss_type_and_estimator_config_accepts_has_a_registered_function_citing_its_source():
    assert set(POLICY_LOSSES) == set(LOSS_TYPES)
    assert set(ADVANTAGE_ESTIMATORS) == set(ADV_ESTIMATORS)
    for fn in [*(loss.fn for loss in POLICY_LOSSES.values()), *ADVANTAGE_ESTIMATORS.values()]:
        assert fn.__doc__ and ("arXiv" in fn.__doc__ or "TRL" in fn.__doc__), fn.__name__


def test_an_unknown_loss_type_or_estimator_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"unknown loss_type 'ppo' \(choose from dapo, bnpo, grpo"):
        grpo_loss(LOGPROBS, OLD, ADVANTAGES, MASK, EPSILON, loss_type="ppo")
    with pytest.raises(ValueError, match=r"unknown adv_estimator 'gae' \(choose from grpo, rloo"):
        group_advantages(REWARDS, 4, "group", "gae")


def test_a_name_registered_twice_is_refused():
    with pytest.raises(ValueError, match="loss_type 'dapo' is registered twice"):
        register_policy_loss("dapo", reduction="dapo")(POLICY_LOSSES["dapo"].fn)
    with pytest.raises(ValueError, match="unknown reduction 'mean'"):
        register_policy_loss("new_loss", reduction="mean")
    with pytest.raises(ValueError, match="advantage estimator 'rloo' is registered twice"):
        register_advantage_estimator("rloo")(ADVANTAGE_ESTIMATORS["rloo"])
    assert "new_loss" not in POLICY_LOSSES


# ---- each registered function, through its dispatcher -------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_gives_the_value_recorded_before_the_registry(loss_type):
    loss, clip_fraction = dispatched(loss_type)
    expected_loss, expected_clip = RECORDED_LOSSES[loss_type]
    assert loss == pytest.approx(expected_loss, rel=1e-12, abs=1e-15)
    assert clip_fraction == pytest.approx(expected_clip, rel=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_the_dispatcher_is_the_registered_function_reduced_as_registered(loss_type):
    registered = POLICY_LOSSES[loss_type]
    per_token, was_clipped = registered.fn(
        policy_terms(LOGPROBS, OLD, ADVANTAGES, MASK, EPSILON, None, PolicyLossOptions(), None)
    )
    mask = MASK.float()  # the loss takes its mask as float32, whatever its dtype, and so its counts are
    n_tokens, n_sequences = mask.sum(), torch.tensor(float(mask.size(0)))
    weights = loss_token_weights(mask, registered.reduction)
    expected = (per_token * weights).sum() / loss_denominator(registered.reduction, n_tokens, n_sequences, MAX_LENGTH)
    loss, clip_fraction = dispatched(loss_type)
    assert loss == expected.item()
    assert clip_fraction == float((was_clipped.float() * mask).sum() / n_tokens)


def test_dapo_by_hand():
    """-min(r A, clip(r, 1 - eps, 1 + eps) A), r = exp(logp - logp_old), summed over the 9 masked tokens / 9."""
    total = 0.0
    for row in range(3):
        for col in range(4):
            if MASK[row, col]:
                ratio = math.exp(LOGPROBS[row, col].item() - OLD[row, col].item())
                advantage = ADVANTAGES[row].item()
                total += -min(ratio * advantage, min(max(ratio, 1 - EPSILON), 1 + EPSILON) * advantage)
    assert dispatched("dapo")[0] == pytest.approx(total / 9, rel=1e-12)


def test_cispo_by_hand():
    """-min(r, eps_high) A log pi (the weight detached), summed over the 9 masked tokens / 9; the weight is capped
    where r > eps_high: every token here, so the clip fraction is the share of tokens of positive advantage."""
    total, capped_positive = 0.0, 0
    for row in range(3):
        for col in range(4):
            if MASK[row, col]:
                ratio = math.exp(LOGPROBS[row, col].item() - OLD[row, col].item())
                advantage = ADVANTAGES[row].item()
                total += -min(ratio, EPSILON) * advantage * LOGPROBS[row, col].item()
                capped_positive += ratio > EPSILON and advantage > 0
    loss, clip_fraction = dispatched("cispo")
    assert loss == pytest.approx(total / 9, rel=1e-12)
    assert clip_fraction == pytest.approx(capped_positive / 9) and capped_positive == 5


@pytest.mark.parametrize("estimator", ADV_ESTIMATORS)
def test_each_estimator_gives_the_advantages_recorded_before_the_registry(estimator):
    advantages = group_advantages(REWARDS, 4, SCALE[estimator], estimator, LENGTHS)
    assert advantages.tolist() == pytest.approx(RECORDED_ADVANTAGES[estimator], rel=1e-12, abs=1e-15)
    assert torch.equal(advantages, ADVANTAGE_ESTIMATORS[estimator](REWARDS, 4, SCALE[estimator], LENGTHS))


def test_grpo_and_rloo_advantages_by_hand():
    for group in (REWARDS[:4].tolist(), REWARDS[4:].tolist()):
        mean = sum(group) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 3)
        got = group_advantages(torch.tensor(group, dtype=torch.float64), 4, "group", "grpo").tolist()
        assert got == pytest.approx([(r - mean) / (std + 1e-4) for r in group], rel=1e-12)
        got = group_advantages(torch.tensor(group, dtype=torch.float64), 4, "none", "rloo").tolist()
        assert got == pytest.approx([r - (sum(group) - r) / 3 for r in group], rel=1e-12, abs=1e-15)


def test_the_token_weighted_estimators_need_the_lengths():
    for estimator in ("reinforce_plus_plus", "reinforce_plus_plus_baseline"):
        with pytest.raises(ValueError, match=f"adv_estimator={estimator} needs the completions' lengths"):
            group_advantages(REWARDS, 4, "batch", estimator)
