"""HPT's update (arXiv 2509.04419) checked against gradients computed independently:

    grad = g_grpo(rollouts of the prompts with more than `gate` correct) + sft_coef g_sft(the others' demonstrations)

each term a token mean over its own rows, from full float32 log-softmaxes over a copy of the model at the step's
weights. The rewards of a step are replaced by a constructed pattern (and its group advantages) so that both
branches are taken; the stage runs its passes in micro-batches through the chunked log-probs. A gate below 0
switches no prompt and is exactly the rl stage."""

from __future__ import annotations

import copy

import pytest
import torch
from gradient_checks import full_completion_logprobs

import bridgectl.core.optim as optim_module
import bridgectl.stages.hpt as hpt_module
import bridgectl.stages.rl as rl_module
from bridgectl.config.compose import compose
from bridgectl.core.advantages import group_advantages
from bridgectl.core.losses import make_sft_batch
from bridgectl.core.rollout import positions
from bridgectl.errors import UserError
from bridgectl.stages.hpt import HPTStage, switched_groups
from bridgectl.stages.rl import RLStage
from bridgectl.tasks.arith import ArithTask
from bridgectl.training.setup import build_context

SMALL = [
    "rl.prompts_per_step=8",
    "rl.num_generations=4",
    "rl.max_completion_length=16",
    "train.threads=1",
    "optim.max_grad_norm=0",
    "train.micro_batch_size=3",
]
# correct rollouts per group: 0, 1, 3, 0, 1, 4, 0, 2
PATTERN = [0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1]


def test_gate_switches_the_prompts_with_at_most_gate_correct_rollouts():
    rewards = torch.tensor(PATTERN, dtype=torch.float32)
    assert switched_groups(rewards, 4, 0) == [True, False, False, True, False, False, True, False]
    assert switched_groups(rewards, 4, 1) == [True, True, False, True, True, False, True, False]
    assert switched_groups(rewards, 4, -1) == [False] * 8  # never: the rl stage
    assert switched_groups(rewards, 4, 4) == [True] * 8  # always: SFT on every prompt's demonstration


def test_bad_settings_exit_with_a_message():
    with pytest.raises(UserError, match="hpt.gate"):
        compose(["recipe=hpt", "hpt.gate=-2"])
    with pytest.raises(UserError, match="train.fsdp"):
        compose(["recipe=hpt", "train.fsdp=true"])


def test_needs_rl_problems_with_demonstrations(monkeypatch):
    monkeypatch.setattr(ArithTask, "rl_has_traces", False)
    with pytest.raises(UserError, match="own demonstration"):  # refused with the context, before weights load
        build_context(compose(["recipe=hpt", *SMALL]), show_progress=False)


# ---- independent losses ------------------------------------------------------------------------------------------
def grpo_by_hand(model, scored, rl, rows):
    """The GRPO loss of `rows` only, divided by their own completion tokens."""
    rollouts = scored.rollouts
    logprobs = full_completion_logprobs(model, rollouts, rl.temperature)[rows]
    ratio = torch.exp(logprobs - rollouts.sampling_logprobs[rows])
    advantage = scored.advantages[rows].unsqueeze(1)
    per_token = -torch.min(ratio * advantage, ratio.clamp(1 - rl.epsilon, 1 + rl.epsilon) * advantage)
    mask = rollouts.completion_mask[rows].float()
    return (per_token * mask).sum() / mask.sum()


def nll_by_hand(model, batch):
    mask = batch.attention_mask
    logits = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions(mask)).logits.float()
    labels = batch.labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100
    )


def grads(loss, model):
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


# ---- the stage -----------------------------------------------------------------------------------------------------
def run(stage_cls, module, overrides, steps, monkeypatch, rewards=None):
    """`steps` updates of a fresh stage: the gradients each update clipped, the model before each update, the
    rollouts each update used (their rewards replaced by `rewards` when given) and the step outputs."""
    captured, models, recorded = [], [], []
    real_clip, real_sample = optim_module.clip_gradients, module.sample_groups

    def clip(params, *args, **kwargs):
        captured.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params])
        return real_clip(params, *args, **kwargs)

    def sample_groups(ctx):
        scored = real_sample(ctx)
        if rewards is not None:
            scored.rewards = torch.tensor(rewards, dtype=scored.rewards.dtype, device=scored.rewards.device)
            scored.advantages = group_advantages(scored.rewards, ctx.cfg.rl.num_generations, ctx.cfg.rl.scale_rewards)
        recorded.append(scored)
        return scored

    monkeypatch.setattr(optim_module, "clip_gradients", clip)
    monkeypatch.setattr(module, "sample_groups", sample_groups)
    ctx = build_context(compose(overrides), show_progress=False)
    stage = stage_cls(ctx, 4)
    outputs = []
    for _ in range(steps):
        models.append(copy.deepcopy(ctx.policy.model))
        outputs.append(stage.step())
    monkeypatch.undo()
    return ctx, captured, models, recorded, outputs


@pytest.mark.parametrize("gate", [0, 1])
def test_update_is_grpo_on_kept_prompts_plus_sft_on_the_switched_prompts_demonstrations(gate, monkeypatch):
    ctx, captured, models, recorded, outputs = run(
        HPTStage,
        hpt_module,
        ["recipe=hpt", *SMALL, f"hpt.gate={gate}", "hpt.sft_coef=0.5"],
        2,
        monkeypatch,
        rewards=PATTERN,
    )
    rl, group_size = ctx.cfg.rl, ctx.cfg.rl.num_generations
    switched = switched_groups(torch.tensor(PATTERN, dtype=torch.float32), group_size, gate)
    kept_rows = [row for row in range(len(PATTERN)) if not switched[row // group_size]]
    for step in range(2):
        model, scored = models[step], recorded[step]
        # each switched prompt's own demonstration: its question and its trace, one row per prompt
        problems = [scored.problems[group * group_size] for group, to_sft in enumerate(switched) if to_sft]
        demonstrations = make_sft_batch(
            ctx.policy.tokenizer, [p.question for p in problems], [p.trace_completion for p in problems], ctx.device
        )
        g_rl = grads(grpo_by_hand(model, scored, rl, kept_rows), model)
        g_sft = grads(nll_by_hand(model, demonstrations), model)
        assert max(float(g.abs().max()) for g in g_rl) > 1e-3 and max(float(g.abs().max()) for g in g_sft) > 1e-3
        for got, rl_grad, sft_grad in zip(captured[step], g_rl, g_sft):
            torch.testing.assert_close(got, rl_grad + 0.5 * sft_grad, atol=1e-6, rtol=1e-4)
        metrics = outputs[step].metrics
        assert metrics["hpt/sft_prompts"] == sum(switched) and metrics["hpt/rl_prompts"] == 8 - sum(switched)
        with torch.no_grad():
            assert metrics["train/sft_loss"] == pytest.approx(float(nll_by_hand(model, demonstrations)), rel=1e-4)
    # the switched prompts' rollouts are dropped, not kept with zero weight: zero weights would leave their tokens
    # in the GRPO denominator and scale g_rl by n_kept / n_all, far outside the tolerance above
    mask = recorded[0].rollouts.completion_mask
    assert mask[kept_rows].sum() < 0.9 * mask.sum()
    with torch.no_grad():
        kept_loss = float(grpo_by_hand(models[0], recorded[0], rl, kept_rows))
    assert outputs[0].metrics["train/rl_loss"] == pytest.approx(kept_loss, rel=1e-4, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options", [[], ["rl.loss_type=grpo", "rl.mask_truncated_completions=true"], ["rl.loss_type=dr_grpo"]]
)
def test_gate_below_zero_is_exactly_the_rl_stage(options, monkeypatch):
    """No prompt switched: hpt is the rl stage, also with the GRPO options that change the loss's normaliser."""
    same_lr = ["rl.lr=1e-4", "hpt.lr=1e-4", *options]
    ctx, hpt_grads, _, _, outputs = run(
        HPTStage, hpt_module, ["recipe=hpt", *SMALL, *same_lr, "hpt.gate=-1"], 2, monkeypatch, rewards=PATTERN
    )
    _, rl_grads, _, _, _ = run(RLStage, rl_module, ["recipe=rl", *SMALL, *same_lr], 2, monkeypatch, rewards=PATTERN)
    assert len(hpt_grads) == len(rl_grads) == 2
    for hpt_step, rl_step in zip(hpt_grads, rl_grads):
        assert all(torch.equal(a, b) for a, b in zip(hpt_step, rl_step))
    assert all(output.metrics["hpt/sft_prompts"] == 0 and "train/sft_loss" not in output.metrics for output in outputs)
