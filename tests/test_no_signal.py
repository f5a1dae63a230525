"""Steps without a learning signal (issue 36, item 4): every group's rewards equal, so every advantage is 0 and the
GRPO loss has no gradient. Such a step is measured (rollout/no_signal, rollout/frac_reward_zero_std,
rollout/clipped_ratio), its backward passes are skipped without changing the run (the same weights and metrics as
running them, at less compute), the run counts such steps and warns once after train.no_signal_warn_after of them
in a row, and `bridgectl runs` marks a run that had mostly such steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import bridgectl.core.grpo as grpo
import bridgectl.training.runner as runner
from bridgectl.analysis import runs
from bridgectl.config.compose import compose
from bridgectl.core.choices import LOSS_TYPES
from bridgectl.core.grpo import ScoredRollouts, rollout_metrics, skips_backward
from bridgectl.core.policy_losses import GRPOStats, PolicyLossOptions, grpo_loss
from bridgectl.core.rollout import Rollouts
from bridgectl.tasks.rewards import StepReward
from bridgectl.training.runner import run

BASE = [
    "train.threads=1",
    "train.max_steps=4",
    "train.eval_every=0",
    "eval.n=4",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "sft.batch_size=4",
    "train.checkpoint_every=0",
]
MEASURED = {"train/kl", "train/clip_fraction", "train/entropy", "bridge/shadow_clip_frac"}
"""What the passes of a step measure: not logged for a step whose passes were skipped."""


# ---- the loss: no advantage, no gradient -------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_advantages_give_exactly_zero_gradients(tiny_model, loss_type, level):
    """The claim the skip rests on: with rl.beta and rl.entropy_coef 0, the backward of every rl.loss_type with
    all advantages 0 leaves exactly 0 in every gradient of the model (off-policy ratios, clipping, the two-sided cap
    and the off-policy mask included); one non-zero advantage gives a non-zero gradient."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tiny_model.config.vocab_size, (4, 10), generator=generator)
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0  # a shorter completion
    options = PolicyLossOptions(importance_sampling_level=level, delta=1.5, off_policy_mask_threshold=10.0)

    def gradients(advantages: torch.Tensor) -> list[torch.Tensor]:
        tiny_model.zero_grad(set_to_none=True)
        logits = tiny_model(ids).logits[:, 3:-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 4:].unsqueeze(-1)).squeeze(-1)
        # the sampling policy a little off the current one, so ratios differ from 1 and some are clipped
        old = logprobs.detach() + 0.4 * torch.randn(logprobs.shape, generator=generator)
        loss, _ = grpo_loss(
            logprobs, old, advantages, mask, 0.2, loss_type=loss_type, max_completion_length=6, options=options
        )
        loss.backward()
        grads = [p.grad.clone() for p in tiny_model.parameters() if p.grad is not None]
        tiny_model.zero_grad(set_to_none=True)
        return grads

    zero = gradients(torch.zeros(4))
    assert len(zero) == len(list(tiny_model.parameters()))  # every weight took part in the backward
    assert all(torch.count_nonzero(g) == 0 for g in zero)
    assert any(torch.count_nonzero(g) > 0 for g in gradients(torch.tensor([0.0, 1.0, -1.0, 0.0])))


def test_the_skip_is_taken_only_when_nothing_else_has_a_gradient():
    """rl_backward skips when every advantage of its rows is 0 (hpt's kept rows, or none at all) and neither the KL
    (rl.beta) nor the entropy bonus (rl.entropy_coef) has a gradient of its own."""
    scored = SimpleNamespace(advantages=torch.tensor([0.0, 0.0, 0.5, -0.5]))

    def skips(rows: list[int], beta: float = 0.0, entropy_coef: float = 0.0) -> bool:
        ctx = SimpleNamespace(cfg=SimpleNamespace(rl=SimpleNamespace(beta=beta, entropy_coef=entropy_coef)))
        return skips_backward(scored, ctx, torch.tensor(rows, dtype=torch.long))

    assert skips([0, 1]) and skips([]) and not skips([0, 1, 2, 3]) and not skips([2])
    assert not skips([0, 1], beta=0.04) and not skips([0, 1], entropy_coef=0.01)


# ---- the metrics -------------------------------------------------------------------------------------------------
END = 2


def scored_rollouts(advantages: list[float]) -> ScoredRollouts:
    """Two groups of two: rewards [1, 1] and [0, 1]; completions that end (END), run out (no END), and end on their
    last allowed token (not cut)."""
    completion_ids = torch.tensor([[5, END, 0], [5, 6, 7], [5, 6, END], [7, 7, 7]])
    completion_mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]])
    rollouts = Rollouts(
        torch.ones(4, 2, dtype=torch.long),
        torch.ones(4, 2, dtype=torch.long),
        completion_ids,
        completion_mask,
        torch.zeros(4, 3),
        ["a", "b", "c", "d"],
    )
    return ScoredRollouts(["p"] * 4, rollouts, torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor(advantages), 1.0)


def test_rollout_metrics_say_what_the_step_had():
    ctx = SimpleNamespace(policy=SimpleNamespace(end_tokens=SimpleNamespace(ids=(END, 3))))
    stats = GRPOStats(clip_fraction=0.25, kl=0.5, entropy=1.5)
    measured = rollout_metrics(scored_rollouts([0.0, 0.0, -0.7, 0.7]), stats, 2, ctx)
    assert measured["rollout/clipped_ratio"] == 0.5  # rows 1 and 3: TRL's completions/clipped_ratio
    assert measured["rollout/frac_reward_zero_std"] == 0.5 and measured["train/zero_std_groups"] == 1
    assert measured["rollout/no_signal"] == 0.0
    assert (measured["train/kl"], measured["train/clip_fraction"], measured["train/entropy"]) == (0.5, 0.25, 1.5)

    flat = rollout_metrics(scored_rollouts([0.0] * 4), GRPOStats(0.0, 0.0, skipped=True), 2, ctx)
    assert flat["rollout/no_signal"] == 1.0
    assert not MEASURED & set(flat)  # a skipped pass measured nothing: no fake zeros
    # a stage that learns from the prompts otherwise (hpt's demonstrations, srft) has a signal anyway
    assert rollout_metrics(scored_rollouts([0.0] * 4), stats, 2, ctx, other_signal=True)["rollout/no_signal"] == 0.0


# ---- whole runs ----------------------------------------------------------------------------------------------------
def scripted_reward(patch: pytest.MonkeyPatch, zero_steps: set[int] | None = None, stop_at: int | None = None) -> None:
    """The task's step reward replaced: 0 for every completion at the steps of `zero_steps` (every step when None),
    else 0, 1, 0, 1, ... (every group of two has reward variance); KeyboardInterrupt at step `stop_at`. One call per
    step (rl, bridge: no shadow rollouts)."""
    calls = []

    def reward(self, problems, completions):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt("stopped by the test")
        flat = zero_steps is None or len(calls) in zero_steps
        values = [0.0 if flat else float(i % 2) for i in range(len(completions))]
        self.last_values = [values]
        return values, {}, values

    patch.setattr(StepReward, "__call__", reward)


def metric_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def final_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted((path / "checkpoints" / "final").rglob("*.safetensors")):
        tensors.update({f"{file.name}/{key}": value for key, value in load_file(file).items()})
    return tensors


@pytest.mark.parametrize(
    "recipe, finetune, extra",
    [
        ("rl", "full", []),
        ("bridge", "full", []),
        ("rl", "lora", []),
        ("bridge", "lora", []),
        ("bridge", "full", ["bridge.shadow=lookahead"]),  # theta_hat read off theta's (zero) gradient
        ("hpt", "full", ["hpt.gate=-1"]),  # rl_backward over hpt's kept rows (here every prompt's)
    ],
    ids=["rl", "bridge", "rl-lora", "bridge-lora", "bridge-lookahead", "hpt"],
)
@pytest.mark.slow
def test_skipping_a_step_without_signal_changes_nothing_but_its_cost(tmp_path, recipe, finetune, extra):
    """Steps 2 and 4 have no reward variance. With the skip and with it disabled (every pass run), the runs end
    with the same weights (step 4's AdamW update on a zero gradient moves them: a skip without zero gradients would
    not) and log the same metrics, but for what only the passes measure; a skipped step costs fewer FLOPs, the
    others the same. The counts reach summary.json; one step without signal in a row warns of nothing."""
    overrides = [f"recipe={recipe}", f"model.finetune={finetune}", *BASE, *extra]
    for name, skip in (("skip", True), ("passes", False)):
        with pytest.MonkeyPatch.context() as patch:
            scripted_reward(patch, zero_steps={2, 4})
            if not skip:
                patch.setattr(grpo, "skips_backward", lambda *args: False)
            summary = run(compose(overrides), tmp_path / name, show_progress=False)
        assert (summary["rl_steps"], summary["no_signal_steps"]) == (4, 2) and "warnings" not in summary

    skipped, passes = metric_rows(tmp_path / "skip"), metric_rows(tmp_path / "passes")
    steps = [row for row in skipped if row["stage"] == recipe]
    assert [row["rollout/no_signal"] for row in steps] == [0.0, 1.0, 0.0, 1.0]
    assert [row["rollout/frac_reward_zero_std"] for row in steps] == [0.0, 1.0, 0.0, 1.0]
    assert len(skipped) == len(passes) == 6
    for fast, slow in zip(skipped, passes):
        if fast.get("rollout/no_signal") == 1.0:
            assert not MEASURED & set(fast) and "train/kl" in slow
            assert 0 < fast["compute/flops"] < slow["compute/flops"]
            slow = {key: value for key, value in slow.items() if key not in MEASURED}
        elif fast["stage"] == recipe:
            assert "train/kl" in fast and fast["compute/flops"] == slow["compute/flops"]

        def same(row: dict) -> dict:
            return {k: v for k, v in row.items() if not k.startswith(("perf/", "compute/")) and k != "wall_s"}

        assert same(fast) == same(slow)

    fast, slow = final_weights(tmp_path / "skip"), final_weights(tmp_path / "passes")
    assert fast.keys() == slow.keys() and fast
    assert all(torch.equal(fast[key], slow[key]) for key in fast)


def test_steps_without_signal_warn_once_naming_the_cause(tmp_path, capsys):
    """A reward that is always 0, with completions cut at rl.max_completion_length=2: the run warns once, after
    train.no_signal_warn_after=3 steps, naming both causes, the remedies and the skipped passes; summary.json keeps
    the text and the counts, and `bridgectl runs` marks the run."""
    with pytest.MonkeyPatch.context() as patch:
        scripted_reward(patch)
        summary = run(
            compose(["recipe=rl", *BASE, "train.max_steps=5", "rl.max_completion_length=2"]),
            tmp_path / "flat",
            show_progress=False,
        )
    said = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert said.count("without a learning signal") == 1
    assert (summary["rl_steps"], summary["no_signal_steps"]) == (5, 5)
    [warning] = summary["warnings"]
    assert " ".join(warning.split()) in said and warning.startswith("steps 1-3: 3 RL steps in a row")
    clipped = [row["rollout/clipped_ratio"] for row in metric_rows(tmp_path / "flat") if row["stage"] == "rl"][:3]
    assert sum(clipped) > 0
    assert f"{100 * sum(clipped) / 3:.0f}% of the completions were cut at rl.max_completion_length=2" in warning
    assert "every completion scored 0" in warning and "backward passes were skipped" in warning
    for remedy in ("rl.filter_groups=true", "recipe=two_stage", "model.init_from="):
        assert remedy in warning
    assert runs.status_cell(runs.read_run(tmp_path / "flat", tmp_path)) == "completed (no signal 5/5)"

    with pytest.MonkeyPatch.context() as patch:
        scripted_reward(patch)
        quiet = run(
            compose(["recipe=rl", *BASE, "train.no_signal_warn_after=0"]), tmp_path / "quiet", show_progress=False
        )
    assert "without a learning signal" not in capsys.readouterr().out and "warnings" not in quiet
    assert (quiet["rl_steps"], quiet["no_signal_steps"]) == (4, 4)


def test_a_resumed_run_goes_on_counting(tmp_path):
    """Stopped during step 3 and resumed from step 2's checkpoint, a run counts and warns as one never stopped (the
    run of steps without signal so far is in the checkpoint); from a checkpoint written before the counts existed,
    it counts from 0."""
    overrides = compose(["recipe=rl", *BASE, "train.checkpoint_every=2"])
    with pytest.MonkeyPatch.context() as patch:
        scripted_reward(patch)
        whole = run(overrides, tmp_path / "whole", show_progress=False)
    with pytest.MonkeyPatch.context() as patch:
        scripted_reward(patch, stop_at=3)
        with pytest.raises(KeyboardInterrupt):
            run(overrides, tmp_path / "stopped", show_progress=False)
    shutil.copytree(tmp_path / "stopped", tmp_path / "old")
    with pytest.MonkeyPatch.context() as patch:
        scripted_reward(patch)
        resumed = run(overrides, tmp_path / "stopped", show_progress=False, resume=True)
    assert (resumed["rl_steps"], resumed["no_signal_steps"]) == (whole["rl_steps"], whole["no_signal_steps"]) == (4, 4)
    assert resumed["warnings"] == whole["warnings"] and len(whole["warnings"]) == 1

    def without_counts(path):
        meta, *rest = real(path)
        meta = {key: value for key, value in meta.items() if key != "no_signal"}
        meta["counters"] = {k: v for k, v in meta["counters"].items() if k not in ("rl_steps", "no_signal_steps")}
        return (meta, *rest)

    real = runner.read_checkpoint
    with pytest.MonkeyPatch.context() as patch:
        scripted_reward(patch)
        patch.setattr(runner, "read_checkpoint", without_counts)
        old = run(overrides, tmp_path / "old", show_progress=False, resume=True)
    assert (old["rl_steps"], old["no_signal_steps"]) == (2, 2) and "warnings" not in old


REWARDS_BY_RANK = '''
import os

calls = [0]


def scripted(prompts, completions, **kwargs):
    """Step 2: every reward 0; step 3: the first group's rewards 0 (under 2 processes, rank 0's whole share), the
    second's varied; else varied in every group. Rows are numbered over the whole step, whatever the process."""
    calls[0] += 1
    first = int(os.environ.get("RANK", "0")) * len(completions)
    rows = range(first, first + len(completions))
    if calls[0] == 2:
        return [0.0 for _ in rows]
    return [0.0 if calls[0] == 3 and row < 2 else float(row % 2) for row in rows]
'''


@pytest.mark.slow
def test_two_processes_skip_only_together(tmp_path):
    """Under data parallelism a step is skipped only when no rank has an advantage: at step 3 rank 0's share has
    none but rank 1's has, so both run their passes (one skipping alone would leave the other waiting in a
    collective); the run matches one process, counts and metrics included."""
    from typer.testing import CliRunner

    from bridgectl.cli.app import app

    rewards = tmp_path / "by_rank.py"
    rewards.write_text(REWARDS_BY_RANK)
    settings = ["recipe=rl", *BASE, f"task.reward_funcs=[{rewards}:scripted]"]
    for name, processes in (("one", []), ("two", ["--nproc", "2"])):
        result = CliRunner().invoke(app, ["run", *settings, *processes, "--out", str(tmp_path), "--name", name])
        assert result.exit_code == 0, result.output
    one, two = metric_rows(tmp_path / "one"), metric_rows(tmp_path / "two")
    for rows in (one, two):
        steps = [row for row in rows if row["stage"] == "rl"]
        assert [row["rollout/no_signal"] for row in steps] == [0.0, 1.0, 0.0, 0.0]
        assert ["train/kl" in row for row in steps] == [True, False, True, True]  # step 2 alone skipped
    for a, b in zip(one, two):
        for key in (
            "train/rl_loss",
            "train/grad_norm",
            "train/reward_mean",
            "rollout/frac_reward_zero_std",
            "rollout/clipped_ratio",
            "rollout/no_signal",
            "eval/test/accuracy",
        ):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    assert [(s["rl_steps"], s["no_signal_steps"]) for s in summaries] == [(4, 1), (4, 1)]
    w1, w2 = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert w1.keys() == w2.keys() and w1
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-4, rtol=1e-4)
