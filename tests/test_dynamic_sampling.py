"""DAPO's dynamic sampling (rl.filter_groups) and soft overlong punishment (rl.overlong_buffer_len), arXiv
2503.14476 Sec. 3.2 and Eq. 13: batches of groups with reward variance, reproducible, every round counted; the
length penalty as the paper writes it, on top of the verifier's verdict."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.config.compose import compose
from bridgectl.core.grpo import overlong_penalty, sample_groups
from bridgectl.errors import UserError
from bridgectl.training.setup import build_context

SMALL = [
    "recipe=rl",
    "rl.prompts_per_step=4",
    "rl.num_generations=4",
    "rl.max_completion_length=12",
    "train.threads=1",
    "eval.n=8",
]


def constant_groups(ctx, every: int):
    """Makes the verifier's reward constant within every `every`-th sampled group (all 1.0) and leaves the others:
    wraps the task's step_reward, counting the groups it scored."""
    real, seen = ctx.task.step_reward, {"groups": 0}
    size = ctx.cfg.rl.num_generations

    def step_reward(problems, completions):
        values, means, verdicts = real(problems, completions)
        values = list(values)
        for group in range(len(values) // size):
            if (seen["groups"] + group) % every == 0:
                values[group * size : (group + 1) * size] = [1.0] * size
            else:  # make sure the others vary: one right, the rest wrong
                values[group * size : (group + 1) * size] = [1.0] + [0.0] * (size - 1)
        seen["groups"] += len(values) // size
        return values, means, values

    ctx.task.step_reward = step_reward
    return seen


def test_dynamic_sampling_fills_the_batch_with_groups_that_have_reward_variance():
    ctx = build_context(compose([*SMALL, "rl.filter_groups=true"]), show_progress=False)
    seen = constant_groups(ctx, every=2)  # half the groups have no reward variance
    scored = sample_groups(ctx)
    size = ctx.cfg.rl.num_generations
    assert len(scored.problems) == 4 * size  # rl.prompts_per_step groups
    assert bool((scored.rewards.view(-1, size).std(dim=1) > 0).all())
    assert scored.sampling == {"train/sampling_rounds": 2, "train/batch_filled": 1.0, "train/dropped_groups": 4}
    assert seen["groups"] == 8 and ctx.rl_problems.consumed == 8  # two rounds of fresh prompts
    assert scored.dropped_tokens > 0 and scored.gen_tokens == int(scored.rollouts.lengths.sum()) + scored.dropped_tokens
    assert torch.equal(scored.advantages.view(-1, size)[:, 0] > 0, torch.ones(4, dtype=torch.bool))


def test_dynamic_sampling_is_reproducible_and_trains_on_what_it_has_when_the_rounds_run_out():
    batches = []
    for _ in range(2):
        ctx = build_context(compose([*SMALL, "rl.filter_groups=true", "rl.max_num_gen_batches=1"]), show_progress=False)
        constant_groups(ctx, every=2)
        batches.append(sample_groups(ctx))
    first, second = batches
    assert torch.equal(first.rollouts.completion_ids, second.rollouts.completion_ids)
    assert first.sampling["train/batch_filled"] == 0.5 and len(first.problems) == 2 * 4  # the 2 varied groups


def test_without_any_varied_group_the_step_runs_with_zero_advantages():
    ctx = build_context(compose([*SMALL, "rl.filter_groups=true", "rl.max_num_gen_batches=2"]), show_progress=False)
    constant_groups(ctx, every=1)
    scored = sample_groups(ctx)
    assert scored.sampling["train/batch_filled"] == 0 and scored.sampling["train/sampling_rounds"] == 2
    assert len(scored.problems) == 4 and bool((scored.advantages == 0).all())


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["rl", "bridge"])
def test_dynamic_sampling_and_the_overlong_penalty_run_and_are_logged(tmp_path, recipe):
    result = CliRunner().invoke(
        app,
        [
            "run",
            f"recipe={recipe}",
            "rl.filter_groups=true",
            "rl.overlong_buffer_len=4",
            "train.max_steps=2",
            "rl.prompts_per_step=2",
            "rl.num_generations=4",
            "sft.batch_size=4",
            "eval.n=8",
            "train.threads=1",
            "train.eval_every=0",
            "--out",
            str(tmp_path),
            "--name",
            "d",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if row.get("stage") == recipe]
    assert len(steps) == 2
    for row in steps:
        assert row["train/sampling_rounds"] >= 1 and 0 <= row["train/batch_filled"] <= 1
        assert "train/dropped_groups" in row and row["train/rewards/overlong"] <= 0


def test_the_soft_overlong_penalty_is_dapos_eq_13():
    lengths = torch.tensor([10, 12, 14, 15, 16])
    # L_max 16, L_cache 4: 0 up to 12 tokens, then ((16 - 4) - |y|) / 4, -1 at 16
    assert overlong_penalty(lengths, 16, 4, 1.0).tolist() == [0.0, 0.0, -0.5, -0.75, -1.0]
    assert overlong_penalty(lengths, 16, 4, 0.5).tolist() == [0.0, 0.0, -0.25, -0.375, -0.5]


def test_the_penalty_shapes_the_reward_and_keeps_the_verdict():
    ctx = build_context(compose([*SMALL, "rl.overlong_buffer_len=6"]), show_progress=False)
    scored = sample_groups(ctx)
    penalty = overlong_penalty(scored.rollouts.lengths, 12, 6, 1.0)
    assert bool((penalty < 0).any())  # some completions run into the buffer
    assert torch.allclose(scored.rewards, scored.verdicts + penalty)
    assert torch.equal(scored.correct, scored.verdicts > 0)


@pytest.mark.parametrize("stage", ["luffy", "relift", "hpt", "uft", "srft"])
def test_stages_that_sample_their_own_way_refuse_dynamic_sampling(stage):
    with pytest.raises(UserError, match=f"rl.filter_groups does not apply to the {stage} stage"):
        compose([f"recipe={stage}", "rl.filter_groups=true"])
