"""The GRPO variants under TRL's names (rl.importance_sampling_level, rl.loss_type cispo/sapo, rl.delta,
rl.top_entropy_quantile, rl.entropy_coef) run through `bridgectl run` wherever GRPO runs, log train/entropy, and are
refused by the stages whose policy loss is their own. Their formulas: tests/test_losses.py; TRL's own loss on one
batch: tests/test_trl_parity.py (`make test-trl`); micro-batches: tests/test_micro_batches.py."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.config.compose import compose
from bridgectl.errors import UserError

TINY = [
    "train.max_steps=2",
    "rl.prompts_per_step=2",
    "rl.num_generations=4",
    "sft.batch_size=4",
    "eval.n=8",
    "train.threads=1",
    "train.eval_every=0",
]
VARIANTS = [
    "rl.importance_sampling_level=sequence",
    "rl.loss_type=cispo",
    "rl.top_entropy_quantile=0.2",
    "rl.entropy_coef=0.001",
]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["rl", "bridge"])
def test_the_variants_run_and_log_the_entropy(tmp_path, recipe):
    result = CliRunner().invoke(
        app, ["run", f"recipe={recipe}", *VARIANTS, *TINY, "--out", str(tmp_path), "--name", "v"]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if row.get("stage") == recipe]
    assert len(steps) == 2 and all(row["train/entropy"] > 0 for row in steps)
    saved = (tmp_path / "v" / "config.yaml").read_text()
    assert "importance_sampling_level: sequence" in saved and "loss_type: cispo" in saved


@pytest.mark.parametrize(
    "recipe, options",
    [
        (
            "rl",
            [
                "rl.loss_type=luspo",
                "rl.importance_sampling_level=sequence",
                "rl.adv_estimator=reinforce_plus_plus_baseline",
                "rl.scale_rewards=batch",
            ],
        ),
        (
            "bridge",
            [
                "rl.loss_type=vespo",
                "rl.off_policy_mask_threshold=0.5",
                "rl.adv_estimator=reinforce_plus_plus",
                "rl.scale_rewards=batch",
            ],
        ),
        ("interleaved", ["rl.loss_type=bnpo", "rl.off_policy_mask_threshold=0.5"]),
    ],
)
@pytest.mark.slow
def test_the_other_loss_types_and_estimators_train(tmp_path, recipe, options):
    """luspo, vespo and bnpo, the off-policy mask and both REINFORCE++ estimators, through `bridgectl run`: the
    steps train (a finite loss and a nonzero gradient) and the config keeps what was asked."""
    result = CliRunner().invoke(
        app, ["run", f"recipe={recipe}", *options, *TINY, "--out", str(tmp_path), "--name", "v"]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "train/rl_loss" in row]
    assert steps and all(math.isfinite(row["train/rl_loss"]) for row in steps)
    norms = [value for row in steps for key, value in row.items() if "grad_norm" in key]  # bridge: of theta, w
    assert norms and all(value > 0 for value in norms)
    saved = (tmp_path / "v" / "config.yaml").read_text()
    for option in options:
        key, value = option.split(".", 1)[1].split("=")
        assert f"{key}: {value}" in saved


def test_the_new_options_are_checked_with_a_reason():
    for overrides, said in [
        (["rl.loss_type=vespo", "rl.importance_sampling_level=sequence"], "rl.loss_type=vespo weights whole"),
        (["rl.adv_estimator=reinforce_plus_plus"], "whitens the rewards over the step's tokens itself"),
        (["rl.off_policy_mask_threshold=0"], "rl.off_policy_mask_threshold must be positive"),
        (["rl.vllm_importance_sampling_mode=sequence"], "unknown rl.vllm_importance_sampling_mode"),
        (["rl.vllm_importance_sampling_clip_min=2.0", "rl.vllm_importance_sampling_clip_max=1.5"], "0 <= min < max"),
        (["rl.loss_type=vespo", "rollout.backend=vllm"], "needs a token_"),  # TRL's default mode: sequence_mask
        (["recipe=srft", "rl.off_policy_mask_threshold=0.5"], "the srft stage"),
        (["recipe=luffy", "rollout.backend=vllm"], "rl.vllm_importance_sampling_correction does not apply"),
    ]:
        with pytest.raises(UserError, match=said.replace("(", "\\(").replace("+", "\\+")):
            compose(overrides)
    assert compose(["rl.loss_type=vespo", "rl.vllm_importance_sampling_mode=token_mask"]).rl.loss_type == "vespo"


@pytest.mark.parametrize("stage", ["luffy", "srft"])
def test_stages_with_their_own_policy_loss_refuse_the_variants_naming_them(stage):
    with pytest.raises(UserError, match=f"the {stage} stage") as caught:
        compose([f"recipe={stage}", "rl.importance_sampling_level=sequence", "rl.entropy_coef=0.01"])
    assert "rl.importance_sampling_level" in caught.value.hint and "rl.entropy_coef" in caught.value.hint


def test_delta_must_lie_above_the_clip_range():
    with pytest.raises(UserError, match="rl.delta must exceed 1 \\+ rl.epsilon_high"):
        compose(["rl.epsilon_high=0.28", "rl.delta=1.2"])
    assert compose(["rl.epsilon_high=0.28", "rl.delta=1.5"]).rl.delta == 1.5


def test_rloo_advantages_reach_the_sampled_groups():
    """rl.adv_estimator=rloo: the advantages the loss uses are each reward minus its group's other rewards' mean."""
    import torch

    from bridgectl.core.grpo import sample_groups
    from bridgectl.training.setup import build_context

    ctx = build_context(
        compose(
            [
                "recipe=rl",
                "rl.adv_estimator=rloo",
                "rl.scale_rewards=none",
                "rl.prompts_per_step=4",
                "rl.num_generations=4",
                "rl.max_completion_length=12",
                "train.threads=1",
            ]
        ),
        show_progress=False,
    )
    scored = sample_groups(ctx)
    grouped = scored.rewards.view(-1, 4)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / 3
    assert torch.allclose(scored.advantages, (grouped - others).reshape(-1))
    with pytest.raises(UserError, match="rl.adv_estimator=rloo takes rl.scale_rewards none or batch"):
        compose(["rl.adv_estimator=rloo"])
    with pytest.raises(UserError, match="the luffy stage"):
        compose(["recipe=luffy", "rl.adv_estimator=rloo", "rl.scale_rewards=none"])


def test_normalize_then_sum_makes_the_advantages_from_each_functions_values(tmp_path):
    """With the verifier and a user function, the advantages are normalize_then_sum of their values, weighted."""
    import torch

    from bridgectl.core.advantages import normalize_then_sum
    from bridgectl.core.grpo import sample_groups
    from bridgectl.training.setup import build_context

    (tmp_path / "shaped.py").write_text(
        "def short(completions, **kwargs):\n    return [1.0 / (1 + len(c)) for c in completions]\n"
    )
    ctx = build_context(
        compose(
            [
                "recipe=rl",
                "rl.multi_objective_aggregation=normalize_then_sum",
                f"task.reward_funcs=[verifier,{tmp_path / 'shaped.py'}:short]",
                "task.reward_weights=[1.0,0.5]",
                "rl.prompts_per_step=4",
                "rl.num_generations=4",
                "rl.max_completion_length=12",
                "train.threads=1",
            ]
        ),
        show_progress=False,
    )
    scored = sample_groups(ctx)
    values = torch.tensor(ctx.task.step_reward.last_values).T
    verifier = torch.tensor(ctx.task.rewards(scored.rollouts.completions, [p.answer for p in scored.problems]))
    assert torch.equal(values[:, 0], verifier)
    expected = normalize_then_sum(values, torch.tensor([1.0, 0.5]), 4)
    assert torch.allclose(scored.advantages, expected)
    assert torch.allclose(scored.rewards, values[:, 0] + 0.5 * values[:, 1])  # the logged reward stays the sum
    ctx.task.step_reward.worker.close()  # the functions' worker process
    with pytest.raises(UserError, match="normalize_then_sum makes the advantage itself"):
        compose(["rl.multi_objective_aggregation=normalize_then_sum", "rl.scale_rewards=batch"])
    with pytest.raises(UserError, match="the uft stage"):
        compose(["recipe=uft", "rl.multi_objective_aggregation=normalize_then_sum"])
