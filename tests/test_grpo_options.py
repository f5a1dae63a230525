"""The GRPO options named after TRL's GRPOConfig (rl.loss_type, epsilon_high, mask_truncated_completions,
scale_rewards=batch, top_p / top_k / min_p, num_iterations), each against a computation by hand: loss values and
gradients token by token, advantages from the rewards, nuclei from sorted probabilities, and the gradient of a
second update from a plain full log-softmax of the updated model."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
from gradient_checks import assert_same_gradients, full_completion_logprobs

import bridgectl.core.optim as optim_module
import bridgectl.stages.rl as rl_module
from bridgectl.config.compose import compose
from bridgectl.core.advantages import group_advantages
from bridgectl.core.policy_losses import grpo_loss
from bridgectl.core.rollout import Rollouts, generate, positions, truncate, truncated_rows
from bridgectl.errors import UserError
from bridgectl.stages import build_stage
from bridgectl.training.setup import build_context


# ---- loss_type and epsilon_high on a hand-made batch -------------------------------------------------------------
def hand_batch():
    """4 completions of lengths 5, 2, 4, 1 with log-ratios spread over both sides of the clip range."""
    generator = torch.Generator().manual_seed(3)
    logprobs = (-torch.rand(4, 5, generator=generator) * 3).requires_grad_(True)
    deltas = torch.tensor(
        [
            [0.5, -0.5, 0.1, 0.0, 0.3],
            [0.35, -0.3, 0.0, 0.0, 0.0],
            [-0.25, 0.25, 0.05, -0.05, 0.0],
            [0.3, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    old = logprobs.detach() - deltas  # ratio r = exp(delta)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5])
    return logprobs, old, mask, advantages


def loss_and_grad_by_hand(logprobs, old, mask, advantages, epsilon, epsilon_high, loss_type, max_length):
    """The loss and d loss / d logprobs, token by token in Python floats: the surrogate -min(r A, clip(r) A) is
    constant on the clipped side (gradient 0) and -A r elsewhere; each token's weight is 1 (dapo, dr_grpo) or
    1 / its completion's length (grpo); the divisor the token count, the completion count, or completions x L.
    Also the number of clipped tokens."""
    high = epsilon if epsilon_high is None else epsilon_high
    rows, width = mask.shape
    lengths = mask.sum(dim=1).tolist()
    divisor = {"dapo": sum(lengths), "grpo": rows, "dr_grpo": rows * max_length}[loss_type]
    loss, grad, n_clipped = 0.0, torch.zeros(rows, width), 0
    for i in range(rows):
        a = float(advantages[i])
        weight = 1.0 / lengths[i] if loss_type == "grpo" else 1.0
        for t in range(width):
            if not mask[i, t]:
                continue
            r = math.exp(float(logprobs[i, t] - old[i, t]))
            loss += weight * -min(r * a, min(max(r, 1 - epsilon), 1 + high) * a) / divisor
            clipped = (a > 0 and r > 1 + high) or (a < 0 and r < 1 - epsilon)
            grad[i, t] = 0.0 if clipped else weight * -a * r / divisor
            n_clipped += clipped
    return loss, grad, n_clipped


@pytest.mark.parametrize("epsilon_high", [None, 0.4])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_each_loss_type_equals_its_formula_in_value_and_gradient(loss_type, epsilon_high):
    logprobs, old, mask, advantages = hand_batch()
    loss, stats = grpo_loss(
        logprobs,
        old,
        advantages,
        mask,
        epsilon=0.2,
        epsilon_high=epsilon_high,
        loss_type=loss_type,
        max_completion_length=7,
    )
    loss.backward()
    expected_loss, expected_grad, n_clipped = loss_and_grad_by_hand(
        logprobs.detach(), old, mask, advantages, 0.2, epsilon_high, loss_type, 7
    )
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    torch.testing.assert_close(logprobs.grad, expected_grad, atol=1e-7, rtol=1e-6)
    # r = e^0.3 (row 0) and e^0.25 (row 2), A > 0, lie between 1 + 0.2 and 1 + 0.4: clipped only without
    # epsilon_high; e^0.5 (row 0) and e^-0.3 (row 1, A < 0) are clipped either way. A token mean over all 12.
    assert n_clipped == {None: 4, 0.4: 2}[epsilon_high]
    assert stats.clip_fraction == pytest.approx(n_clipped / 12)


def test_loss_types_differ_as_their_formulas_say():
    """On-policy (r = 1) with equal advantages per row, the three reductions give three different numbers."""
    logprobs, _, mask, advantages = hand_batch()
    values = {
        kind: grpo_loss(
            logprobs, logprobs.detach(), advantages, mask, epsilon=0.2, loss_type=kind, max_completion_length=7
        )[0].item()
        for kind in ("dapo", "grpo", "dr_grpo")
    }
    lengths, a = [5, 2, 4, 1], advantages.tolist()
    assert values["dapo"] == pytest.approx(-sum(n * x for n, x in zip(lengths, a)) / 12)
    assert values["grpo"] == pytest.approx(-sum(a) / 4)
    assert values["dr_grpo"] == pytest.approx(-sum(n * x for n, x in zip(lengths, a)) / (4 * 7))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_micro_batches_with_the_steps_counts_add_up_to_one_pass(loss_type):
    logprobs, old, mask, advantages = hand_batch()
    kwargs = dict(epsilon=0.2, epsilon_high=0.3, loss_type=loss_type, max_completion_length=7)
    whole, whole_stats = grpo_loss(logprobs, old, advantages, mask, **kwargs)
    whole.backward()
    whole_grad, logprobs.grad = logprobs.grad.clone(), None
    n_tokens, n_sequences = mask.sum().float(), torch.tensor(4.0)
    total, clip_fraction = 0.0, 0.0
    for rows in ([2, 0], [3], [1]):
        part, stats = grpo_loss(
            logprobs[rows],
            old[rows],
            advantages[rows],
            mask[rows],
            n_tokens=n_tokens,
            n_sequences=n_sequences,
            **kwargs,
        )
        part.backward()
        total, clip_fraction = total + part.item(), clip_fraction + stats.clip_fraction
    assert total == pytest.approx(whole.item(), rel=1e-6)
    assert clip_fraction == pytest.approx(whole_stats.clip_fraction)
    torch.testing.assert_close(logprobs.grad, whole_grad, atol=1e-8, rtol=1e-6)


# ---- scale_rewards=batch -----------------------------------------------------------------------------------------
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0])


def test_batch_scaling_divides_by_the_std_of_every_reward():
    rewards = REWARDS.tolist()
    mean = sum(rewards) / 12
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 11)  # Bessel-corrected, as torch.std and TRL
    expected = []
    for g in range(3):
        group = rewards[4 * g : 4 * g + 4]
        expected += [(r - sum(group) / 4) / (std + 1e-4) for r in group]
    torch.testing.assert_close(group_advantages(REWARDS, 4, "batch"), torch.tensor(expected), atol=1e-6, rtol=1e-6)


def _batch_advantages_on_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.save(group_advantages(REWARDS[6 * rank : 6 * rank + 6], 2, "batch"), f"{out}.{rank}")
    dist.destroy_process_group()


def test_batch_scaling_takes_the_std_over_every_process(tmp_path):
    """Two gloo processes with half the groups each give the single-process advantages (the global std)."""
    # forked, not spawned: the children start with everything imported (seconds less on a loaded machine)
    torch.multiprocessing.start_processes(
        _batch_advantages_on_rank, nprocs=2, start_method="fork", args=(str(tmp_path / "store"), str(tmp_path / "adv"))
    )
    together = torch.cat([torch.load(tmp_path / f"adv.{rank}") for rank in range(2)])
    torch.testing.assert_close(together, group_advantages(REWARDS, 2, "batch"), atol=1e-6, rtol=1e-6)
    halves = torch.cat([group_advantages(REWARDS[:6], 2, "batch"), group_advantages(REWARDS[6:], 2, "batch")])
    assert not torch.allclose(together, halves)  # each half's own std would differ


# ---- truncated sampling -------------------------------------------------------------------------------------------
def test_truncate_by_hand():
    logprobs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda **kw: torch.isfinite(truncate(logprobs, **kw))[0].nonzero().squeeze(1).tolist()  # noqa: E731
    assert kept() == [0, 1, 2, 3]
    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.8) == [0, 1]  # 0.5 + 0.3 reach 0.8
    assert kept(top_p=0.81) == [0, 1, 2]
    assert kept(top_p=0.01) == [0]  # the most likely token always stays
    assert kept(min_p=0.2) == [0, 1, 2]  # 0.05 < 0.2 x 0.5
    # top_p after top_k, on the renormalised top 3: 0.5 / 0.95 + 0.3 / 0.95 = 0.842 < 0.84 + a bit
    assert kept(top_k=3, top_p=0.84) == [0, 1]
    assert kept(top_k=3, top_p=0.85) == [0, 1, 2]
    assert torch.equal(truncate(logprobs, top_k=2)[0, :2], logprobs[0, :2])  # kept values untouched


@pytest.fixture(scope="module")
def shipped_model():
    """The shipped pretrained base: peaked next-token distributions, so a nucleus is a few tokens."""
    from transformers import AutoModelForCausalLM

    from bridgectl.models.tiny import SHIPPED_DIR

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(SHIPPED_DIR, dtype=torch.float32).eval()


PROMPTS = ["4+9*3-5*3=", "1+2=", "7*8-6+5*2=", "3-4="] * 2


def full_tempered_logprobs(model, rollouts: Rollouts, temperature: float) -> torch.Tensor:
    """[N, C, V] log-softmax at `temperature` of every completion position, from one plain forward pass."""
    ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)
    mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    width = rollouts.completion_ids.size(1)
    return torch.log_softmax(logits[:, -width - 1 : -1].float() / temperature, dim=-1)


def sample(model, tokenizer, seed: int, temperature: float = 1.0, **truncation) -> Rollouts:
    generators = [torch.Generator().manual_seed(seed + g) for g in range(2)]
    return generate(model, tokenizer, PROMPTS, 24, temperature=temperature, group_generators=generators, **truncation)


def test_top_k_one_samples_the_greedy_completions(shipped_model, tokenizer):
    greedy = generate(shipped_model, tokenizer, PROMPTS, 24, greedy=True)
    for seed in (0, 7):
        top1 = sample(shipped_model, tokenizer, seed, temperature=1.5, top_k=1)
        assert top1.completions == greedy.completions
    assert sample(shipped_model, tokenizer, 0, temperature=1.5).completions != greedy.completions


@pytest.mark.parametrize("truncation", [{"top_p": 0.7}, {"min_p": 0.3}, {"top_k": 3, "top_p": 0.9}])
def test_truncated_samples_lie_in_the_hand_computed_support(shipped_model, tokenizer, truncation):
    temperature = 1.3
    rollouts = sample(shipped_model, tokenizer, 11, temperature=temperature, **truncation)
    full = full_tempered_logprobs(shipped_model, rollouts, temperature)
    top_k, top_p, min_p = truncation.get("top_k", 0), truncation.get("top_p", 1.0), truncation.get("min_p", 0.0)
    narrowed = 0
    for i, j in rollouts.completion_mask.nonzero().tolist():
        probs = full[i, j].exp().tolist()
        order = sorted(range(len(probs)), key=lambda v: -probs[v])
        support = order[:top_k] if top_k else order
        mass = sum(probs[v] for v in support)
        nucleus, before = [], 0.0
        for v in support:  # the fewest most likely tokens holding top_p of the (renormalised) mass
            if before >= top_p:
                break
            nucleus.append(v)
            before += probs[v] / mass
        nucleus = [v for v in nucleus if probs[v] >= min_p * probs[order[0]]]
        token = int(rollouts.completion_ids[i, j])
        assert token in nucleus, (i, j, token, nucleus)
        narrowed += sum(p > 1e-6 for p in probs) > len(nucleus)
    assert narrowed > 10  # the truncation excluded tokens the model gives real probability at many positions


@pytest.mark.parametrize("truncation", [{"top_p": 0.7}, {"top_k": 2, "min_p": 0.1}])
def test_sampling_logprobs_stay_the_untruncated_distributions(shipped_model, tokenizer, truncation):
    rollouts = sample(shipped_model, tokenizer, 5, temperature=1.3, **truncation)
    full = full_tempered_logprobs(shipped_model, rollouts, 1.3)
    expected = full.gather(2, rollouts.completion_ids.unsqueeze(2)).squeeze(2) * rollouts.completion_mask
    torch.testing.assert_close(rollouts.sampling_logprobs, expected, atol=2e-5, rtol=1e-5)
    renormalised = truncate(full.view(-1, full.size(-1)), **truncation).log_softmax(dim=-1).view_as(full)
    truncated_lp = renormalised.gather(2, rollouts.completion_ids.unsqueeze(2)).squeeze(2)
    scored = rollouts.completion_mask.bool()  # (a padding position's token may lie outside the support: -inf)
    assert (truncated_lp - expected)[scored].abs().max() > 1e-2  # the truncated distribution's would have differed


# ---- mask_truncated_completions, scale_rewards=batch and loss_type in an rl step ---------------------------------
SMALL = [
    "recipe=rl",
    "rl.prompts_per_step=4",
    "rl.num_generations=4",
    "rl.max_completion_length=10",
    "train.threads=1",
    "optim.max_grad_norm=0",
    "rl.epsilon=0.05",
    "rl.epsilon_high=0.1",
]


def capture_steps(overrides: list[str], monkeypatch, steps: int = 1):
    """Runs `steps` steps of a fresh rl stage; returns each update's gradients (before its optimizer step), a copy
    of the model as it was before each update, each step's sampled rollouts, and the config."""
    grads, models, scored = [], [], []
    real_clip, real_sample = optim_module.clip_gradients, rl_module.sample_groups
    cfg = compose([*SMALL, *overrides])
    ctx = build_context(cfg, show_progress=False)

    def clip(params, *args, **kwargs):
        grads.append([p.grad.detach().clone() if p.grad is not None else None for p in params])
        models.append(copy.deepcopy(ctx.policy.model))
        return real_clip(params, *args, **kwargs)

    def sample_groups(*args, **kwargs):
        scored.append(real_sample(*args, **kwargs))
        return scored[-1]

    monkeypatch.setattr(optim_module, "clip_gradients", clip)
    monkeypatch.setattr(rl_module, "sample_groups", sample_groups)
    stage = build_stage("rl", ctx, 3)
    outputs = [stage.step() for _ in range(steps)]
    monkeypatch.undo()
    return grads, models, scored, cfg, outputs, ctx


def direct_logprobs(model, rollouts: Rollouts, temperature: float) -> torch.Tensor:
    """Completion log-probs [N, C] with grad, from a plain float32 log-softmax over the whole vocabulary, 0 after EOS."""
    return full_completion_logprobs(model, rollouts, temperature) * rollouts.completion_mask


def hand_loss(logprobs, old, advantages, mask, epsilon, epsilon_high, loss_type, max_length):
    """The GRPO loss spelled out with torch.where by cases (no clamp, no min), for autograd."""
    ratio = torch.exp(logprobs - old)
    a = advantages.unsqueeze(1)
    frozen_high = (a > 0) & (ratio > 1 + epsilon_high)  # the surrogate is the constant (1 + eps_high) A there
    frozen_low = (a < 0) & (ratio < 1 - epsilon)
    per_token = torch.where(
        frozen_high, -(1 + epsilon_high) * a, torch.where(frozen_low, -(1 - epsilon) * a, -ratio * a)
    )
    mask = mask.float()
    if loss_type == "grpo":
        return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (mask.size(0) * max_length)
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("loss_type,micro", [("dapo", 0), ("grpo", 3), ("dr_grpo", 1)])
def test_rl_step_gradient_with_truncated_completions_masked_and_batch_scaling(loss_type, micro, monkeypatch):
    grads, models, scored, cfg, _, ctx = capture_steps(
        [
            f"rl.loss_type={loss_type}",
            f"train.micro_batch_size={micro}",
            "rl.mask_truncated_completions=true",
            "rl.scale_rewards=batch",
        ],
        monkeypatch,
    )
    scored, model = scored[0], models[0]
    rollouts, eos = scored.rollouts, ctx.policy.tokenizer.eos_token_id
    # truncated by hand: no EOS among a completion's tokens
    truncated = torch.tensor(
        [eos not in ids[: int(n)] for ids, n in zip(rollouts.completion_ids.tolist(), rollouts.lengths.tolist())]
    )
    assert torch.equal(truncated_rows(rollouts, eos), truncated)
    assert truncated.any() and (~truncated).any()
    assert bool((rollouts.lengths[truncated] == cfg.rl.max_completion_length).all())
    # advantages by hand: group mean, std of all 16 rewards
    rewards = scored.rewards.tolist()
    mean = sum(rewards) / 16
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 15)
    advantages = torch.tensor(
        [(r - sum(rewards[4 * (i // 4) : 4 * (i // 4) + 4]) / 4) / (std + 1e-4) for i, r in enumerate(rewards)]
    )
    torch.testing.assert_close(scored.advantages, advantages, atol=1e-6, rtol=1e-6)
    # both kinds of row carry a signal: masking the truncated ones changes the gradient
    assert advantages[~truncated].abs().max() > 0 and advantages[truncated].abs().max() > 0

    kept = rollouts.completion_mask * (~truncated).unsqueeze(1)
    logprobs = direct_logprobs(model, rollouts, cfg.rl.temperature)
    loss = hand_loss(
        logprobs, rollouts.sampling_logprobs, advantages, kept, 0.05, 0.1, loss_type, cfg.rl.max_completion_length
    )
    params = [p for p in model.parameters() if p.requires_grad]  # Policy.trainable_parameters, in order
    assert_same_gradients(grads[0], torch.autograd.grad(loss, params))


def test_bad_values_and_stages_that_cannot_honour_an_option_are_refused():
    for bad, words in (
        (["rl.loss_type=ppo"], "rl.loss_type"),
        (["rl.scale_rewards=mean"], "rl.scale_rewards"),
        (["rl.epsilon_high=0"], "rl.epsilon_high"),
        (["rl.top_p=0"], "rl.top_p"),
        (["rl.top_k=-1"], "rl.top_k"),
        (["rl.min_p=1"], "rl.min_p"),
        (["rl.num_iterations=0"], "rl.num_iterations"),
        (["recipe=bridge", "rl.num_iterations=2"], "bridge stage"),
        (["recipe=luffy", "rl.num_iterations=2"], "luffy stage"),
        (["recipe=luffy", "rl.loss_type=grpo"], "luffy stage"),
        (["recipe=srft", "rl.scale_rewards=batch"], "srft stage"),
    ):
        with pytest.raises(UserError, match=words):
            compose(bad)
    # stages that honour them, and stages that sample nothing (sft), pass
    compose(
        [
            "recipe=two_stage",
            "rl.num_iterations=3",
            "rl.loss_type=dr_grpo",
            "rl.scale_rewards=batch",
            "rl.mask_truncated_completions=true",
            "rl.top_p=0.9",
            "rl.top_k=20",
            "rl.min_p=0.05",
        ]
    )
    compose(["recipe=uft", "rl.scale_rewards=batch", "rl.loss_type=grpo", "rl.mask_truncated_completions=true"])


# ---- num_iterations -----------------------------------------------------------------------------------------------
def test_second_update_gradient_is_the_clipped_loss_at_the_updated_weights(monkeypatch):
    overrides = ["rl.num_iterations=2", "rl.lr=3e-3", "rl.max_completion_length=16"]
    grads, models, scored, cfg, outputs, _ = capture_steps(overrides, monkeypatch)
    assert len(grads) == 2 and len(scored) == 1  # one batch of rollouts, two updates
    rollouts, advantages = scored[0].rollouts, scored[0].advantages
    for update, model in enumerate(models):
        logprobs = direct_logprobs(model, rollouts, cfg.rl.temperature)
        ratio = torch.exp(logprobs - rollouts.sampling_logprobs)[rollouts.completion_mask.bool()]
        if update == 0:  # on-policy: the ratio is 1 to float rounding
            assert (ratio - 1).abs().max() < 1e-4
        else:  # the first update moved the policy past both clip bounds on some tokens
            assert (ratio > 1.1).any() and (ratio < 0.95).any()
        loss = hand_loss(
            logprobs,
            rollouts.sampling_logprobs,
            advantages,
            rollouts.completion_mask,
            0.05,
            0.1,
            "dapo",
            cfg.rl.max_completion_length,
        )
        params = [p for p in model.parameters() if p.requires_grad]
        assert_same_gradients(grads[update], torch.autograd.grad(loss, params))
    assert outputs[0].metrics["train/clip_fraction"] > 0  # the mean over the two updates: the second one clipped


def test_one_iteration_is_the_first_update_of_two(monkeypatch):
    """num_iterations=1 makes exactly the first update of num_iterations=2 (same samples, same gradient)."""
    one, _, scored_one, *_ = capture_steps(["rl.num_iterations=1"], monkeypatch)
    two, _, scored_two, *_ = capture_steps(["rl.num_iterations=2"], monkeypatch)
    assert len(one) == 1 and len(two) == 2
    assert torch.equal(scored_one[0].rollouts.completion_ids, scored_two[0].rollouts.completion_ids)
    assert_same_gradients(one[0], two[0])


@pytest.mark.slow
@pytest.mark.parametrize(
    "mixed",
    [
        ["recipe=mix", "mix.lr=1e-3", "mix.mu=0"],
        ["recipe=chord", "chord.lr=1e-3", "chord.mu_peak=0", "chord.mu_valley=0"],
    ],
    ids=["mix", "chord"],
)
def test_mixed_stages_with_mu_zero_iterate_exactly_as_the_rl_stage(tmp_path, mixed):
    """mix and chord with mu = 0 are L_rl alone: with rl.num_iterations=2 their weights after two steps (four
    updates on two batches of rollouts) equal the rl stage's, and they differ from one update per batch."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from bridgectl.cli.app import app

    common = [
        "train.max_steps=2",
        "train.threads=1",
        "train.eval_every=0",
        "eval.n=5",
        "rl.prompts_per_step=2",
        "rl.num_generations=4",
        "rl.lr=1e-3",
        "--out",
        str(tmp_path),
    ]
    for name, overrides in (
        ("rl", ["recipe=rl", "rl.num_iterations=2"]),
        ("mix", [*mixed, "rl.num_iterations=2"]),
        ("once", mixed),
    ):
        result = CliRunner().invoke(app, ["run", *overrides, *common, "--name", name])
        assert result.exit_code == 0, result.output
    weights = {
        name: load_file(str(tmp_path / name / "checkpoints" / "final" / "model.safetensors"))
        for name in ("rl", "mix", "once")
    }
    assert weights["rl"].keys() == weights["mix"].keys()
    for key in weights["rl"]:
        torch.testing.assert_close(weights["mix"][key], weights["rl"][key], atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(weights["once"][key], weights["mix"][key]) for key in weights["mix"])


@pytest.mark.parametrize("recipe", ["rl", "mix"])
def test_train_tokens_leave_out_the_completions_the_loss_masks(monkeypatch, recipe):
    """With rl.mask_truncated_completions, completions cut off at rl.max_completion_length train nothing, so the
    step's train_tokens leave their tokens out (mix's SFT batch still counts); without it, every generated token.
    The first step samples the same rollouts either way, so the two counts differ by the cut-off ones' tokens."""
    counted, sampled = {}, {}
    for masked in (False, True):
        cfg = compose(
            [
                *SMALL,
                f"recipe={recipe}",
                "rl.max_completion_length=4",
                "sft.batch_size=4",
                f"rl.mask_truncated_completions={str(masked).lower()}",
            ]
        )
        ctx = build_context(cfg, show_progress=False)
        module = importlib.import_module(f"bridgectl.stages.{recipe}")
        real_sample, scored = module.sample_groups, []
        monkeypatch.setattr(module, "sample_groups", lambda *a, **k: scored.append(real_sample(*a, **k)) or scored[-1])
        output = build_stage(recipe, ctx, 2).step()
        monkeypatch.undo()
        counted[masked], sampled[masked] = output.train_tokens, scored[0].rollouts
        assert output.gen_tokens == int(scored[0].rollouts.lengths.sum())
    rollouts = sampled[True]
    assert torch.equal(rollouts.lengths, sampled[False].lengths)
    cut = truncated_rows(rollouts, ctx.policy.end_tokens.ids)
    assert 0 < int(cut.sum()) < len(cut)  # some completions cut off, some not
    assert counted[False] - counted[True] == int(rollouts.lengths[cut].sum())
    if recipe == "rl":
        assert counted[False] == int(rollouts.lengths.sum())
