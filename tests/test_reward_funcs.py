"""task.reward_funcs (tasks/rewards.py): the user's reward functions, TRL's convention, summed with their weights
into the step reward; each logged; bad ones exit 2 before a run directory exists, failing ones fail the run."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.config.compose import Config
from bridgectl.core.checkpoint import list_checkpoints, read_checkpoint
from bridgectl.tasks.arith import reward as arith_verdict
from bridgectl.tasks.data import Problem
from bridgectl.tasks.rewards import RewardFunctionError, StepReward

SMALL = [
    "train.threads=1",
    "train.max_steps=3",
    "train.eval_every=0",
    "eval.n=4",
    "rl.prompts_per_step=1",
    "rl.num_generations=4",
    "rl.max_completion_length=24",
    "train.log_completions_every=1",
]


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


def run_cli(tmp_path: Path, *args: str):
    return CliRunner().invoke(app, ["run", "recipe=rl", *SMALL, *args, "--out", str(tmp_path / "runs"), "--name", "r"])


def rows(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def test_a_format_reward_from_a_file_is_added_to_the_verifier(tmp_path):
    """The logged reward of every rollout equals 1.0 x the verifier's verdict + 0.5 x the format reward, each
    recomputed here by hand from completions.jsonl; the logged means match, and the function was given the
    arith row's columns (question, answer, trace) one per completion, with the question as the prompt."""
    received = tmp_path / "received.jsonl"
    rewards_file = write(
        tmp_path / "my_rewards.py",
        f"""
        import json

        def format_reward(prompts, completions, **kwargs):
            with open({str(received)!r}, "a") as log:
                log.write(json.dumps({{"prompts": prompts, "completions": completions, **kwargs}}) + "\\n")
            return [1.0 if ";" in c else 0.0 for c in completions]  # wrote a step-by-step trace
        """,
    )
    result = run_cli(
        tmp_path, f"task.reward_funcs=[verifier,{rewards_file}:format_reward]", "task.reward_weights=[1,0.5]"
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "r"
    steps = [m for m in rows(run, "metrics.jsonl") if m["stage"] == "rl"]
    samples = [c for c in rows(run, "completions.jsonl") if c["split"] == "train"]
    calls = rows(tmp_path, "received.jsonl")
    assert len(steps) == len(calls) == 3 and len(samples) == 12  # one prompt x 4 rollouts per step, all logged
    for step, call in zip(steps, calls):
        mine = [c for c in samples if c["step"] == step["step"]]
        verdicts = [arith_verdict(c["completion"], c["gold"]) for c in mine]
        formats = [1.0 if ";" in c["completion"] else 0.0 for c in mine]
        assert [c["reward"] for c in mine] == pytest.approx([v + 0.5 * f for v, f in zip(verdicts, formats)])
        assert step["train/rewards/verifier"] == pytest.approx(sum(verdicts) / 4)
        assert step["train/rewards/format_reward"] == pytest.approx(sum(formats) / 4)
        assert step["train/reward_mean"] == pytest.approx(
            step["train/rewards/verifier"] + 0.5 * step["train/rewards/format_reward"]
        )
        assert call["completions"] == [c["completion"] for c in mine]
        assert call["prompts"] == call["question"] == [mine[0]["prompt"]] * 4
        assert call["answer"] == [mine[0]["gold"]] * 4 and len(call["trace"]) == 4
        assert set(call) == {"prompts", "completions", "question", "answer", "trace"}  # no completion_ids


def test_eval_reports_each_functions_mean_on_the_greedy_answers(tmp_path):
    rewards_file = write(
        tmp_path / "my_rewards.py",
        """
        def format_reward(prompts, completions, **kwargs):
            return [1.0 if ";" in c else 0.0 for c in completions]
        """,
    )
    result = run_cli(
        tmp_path, f"task.reward_funcs=[verifier,{rewards_file}:format_reward]", "task.reward_weights=[1,0.5]"
    )
    assert result.exit_code == 0, result.output
    evaluated = CliRunner().invoke(app, ["eval", str(tmp_path / "runs" / "r"), "--output", str(tmp_path / "e.json")])
    assert evaluated.exit_code == 0, evaluated.output
    for row in json.loads((tmp_path / "e.json").read_text())["results"].values():
        assert row["rewards/verifier"] == pytest.approx(row["greedy_pass@1"])  # the verifier on the same answers
        assert row["reward_mean"] == pytest.approx(row["rewards/verifier"] + 0.5 * row["rewards/format_reward"])
        assert 0.0 <= row["rewards/format_reward"] <= 1.0
    assert "reward" in evaluated.output and "format_reward" in evaluated.output


def test_each_functions_reward_reaches_wandb(tmp_path, monkeypatch):
    """W&B (offline) receives train/rewards/<name> for every function, as metrics.jsonl has them."""
    from test_tracking import items, wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    rewards_file = write(
        tmp_path / "my_rewards.py",
        """
        def format_reward(prompts, completions, **kwargs):
            return [1.0 if ";" in c else 0.0 for c in completions]
        """,
    )
    result = run_cli(
        tmp_path, f"task.reward_funcs=[verifier,{rewards_file}:format_reward]", "tracker.wandb.mode=offline"
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "r"
    local = {m["step"]: m for m in rows(run, "metrics.jsonl") if m["stage"] == "rl"}
    log = next(next((run / "wandb").glob("offline-run-*")).glob("run-*.wandb"))
    history = [items(r.history.item) for r in wandb_records(log) if r.WhichOneof("record_type") == "history"]
    logged = [row for row in history if "train/rewards/format_reward" in row]
    assert [row["_step"] for row in logged] == sorted(local)
    for row in logged:
        for name in ("train/rewards/verifier", "train/rewards/format_reward"):
            assert row[name] == pytest.approx(local[row["_step"]][name])


def test_a_constant_reward_with_weight_half_shifts_the_reward_by_exactly_half(tmp_path):
    """A constant added to every reward leaves GRPO's group advantages unchanged, so the run follows the same
    rollouts and only train/reward_mean moves, by 0.5 x 1.0. Without reward_funcs nothing new is logged."""
    const = write(
        tmp_path / "const.py",
        """
        def always_one(prompts, completions, **kwargs):
            return [1.0] * len(completions)
        """,
    )
    plain = CliRunner().invoke(app, ["run", "recipe=rl", *SMALL, "--out", str(tmp_path), "--name", "plain"])
    shifted = CliRunner().invoke(
        app,
        [
            "run",
            "recipe=rl",
            *SMALL,
            f"task.reward_funcs=[verifier,{const}:always_one]",
            "task.reward_weights=[1.0,0.5]",
            "--out",
            str(tmp_path),
            "--name",
            "shifted",
        ],
    )
    assert plain.exit_code == 0 and shifted.exit_code == 0, plain.output + shifted.output
    before = [m for m in rows(tmp_path / "plain", "metrics.jsonl") if m["stage"] == "rl"]
    after = [m for m in rows(tmp_path / "shifted", "metrics.jsonl") if m["stage"] == "rl"]
    assert not any(key.startswith("train/rewards/") for m in before for key in m)
    for a, b in zip(before, after):
        assert b["train/reward_mean"] == pytest.approx(a["train/reward_mean"] + 0.5, abs=1e-6)
        assert b["train/rewards/verifier"] == pytest.approx(a["train/reward_mean"], abs=1e-6)
        assert b["train/rewards/always_one"] == 1.0 and b["train/rl_loss"] == pytest.approx(a["train/rl_loss"])


def test_luffy_scores_its_demonstrations_with_the_same_combined_reward(tmp_path):
    """LUFFY's mixed groups: the rollouts (through sample_and_score) and the demonstrations both get the constant,
    so the advantages and the run are unchanged and both rewards move by exactly 0.5."""
    const = write(
        tmp_path / "const.py",
        """
        def always_one(prompts, completions, **kwargs):
            return [1.0] * len(completions)
        """,
    )
    common = ["run", "recipe.stages=[luffy]", "recipe.name=luffy", *SMALL, "--out", str(tmp_path)]
    plain = CliRunner().invoke(app, [*common, "--name", "plain"])
    shifted = CliRunner().invoke(
        app,
        [
            *common,
            f"task.reward_funcs=[verifier,{const}:always_one]",
            "task.reward_weights=[1.0,0.5]",
            "--name",
            "shifted",
        ],
    )
    assert plain.exit_code == 0 and shifted.exit_code == 0, plain.output + shifted.output
    before = [m for m in rows(tmp_path / "plain", "metrics.jsonl") if m["stage"] == "luffy"]
    after = [m for m in rows(tmp_path / "shifted", "metrics.jsonl") if m["stage"] == "luffy"]
    assert len(before) == len(after) == 3
    for a, b in zip(before, after):
        assert b["train/reward_mean"] == pytest.approx(a["train/reward_mean"] + 0.5, abs=1e-6)
        assert b["luffy/demo_reward"] == pytest.approx(a["luffy/demo_reward"] + 0.5, abs=1e-6)
        assert b["train/rl_loss"] == pytest.approx(a["train/rl_loss"], abs=1e-6)


class _Verifier:
    """A stand-in task whose verifier says 1.0 when the completion equals the gold answer."""

    @staticmethod
    def rewards(completions, golds):
        return [float(c == g) for c, g in zip(completions, golds)]


def _step_reward(funcs, weights=None, timeout_s=5.0) -> StepReward:
    cfg = OmegaConf.structured(Config).task
    cfg.reward_funcs, cfg.reward_weights, cfg.reward_timeout_s = funcs, weights, timeout_s
    return StepReward(_Verifier(), cfg)


def test_none_counts_as_zero_in_the_sum_and_in_the_mean(tmp_path):
    """None ("does not apply") is 0 in the weighted sum (TRL's nansum) and in the function's logged mean, so the
    weighted sum of the means is the mean reward (NaN is refused: tests/test_reward_worker.py). Conversational rows
    get their messages as the prompt and each completion as one assistant message."""
    path = write(
        tmp_path / "partial.py",
        """
        def only_chats(prompts, completions, **kwargs):
            return [2.0 if isinstance(p, list) and c[0]["role"] == "assistant" else None
                    for p, c in zip(prompts, completions)]

        def none_first(prompts, completions, **kwargs):
            return [None] + [1.0] * (len(completions) - 1)
        """,
    )
    chat = [{"role": "user", "content": "2+2?"}]
    problems = [Problem("p0", "", "4", conversation=chat), Problem("p1", "", "4"), Problem("p2", "", "5")]
    total, means, verdicts = _step_reward(["verifier", f"{path}:only_chats", f"{path}:none_first"], [1.0, 0.25, 3.0])(
        problems, ["4", "4", "4"]
    )
    assert verdicts == [1.0, 1.0, 0.0]  # what "right" means stays the verifier's
    # by hand: verifier [1, 1, 0]; only_chats [2, None, None]; none_first [None, 1, 1]
    assert total == pytest.approx([1 + 0.25 * 2 + 0, 1 + 0 + 3 * 1, 0 + 0 + 3 * 1])
    assert means == pytest.approx({"verifier": 2 / 3, "only_chats": 2 / 3, "none_first": 2 / 3})
    assert sum(total) / 3 == pytest.approx(1.0 * 2 / 3 + 0.25 * 2 / 3 + 3.0 * 2 / 3)


def test_right_answers_stay_the_verifiers_when_other_rewards_are_added(tmp_path):
    """relift, hpt and srft ask which rollouts are right: a constant format reward must not make a wrong answer
    right, whether or not the verifier is among the rewards."""
    from bridgectl.core.grpo import ScoredRollouts

    path = write(
        tmp_path / "always.py",
        """
        def always(prompts, completions, **kwargs):
            return [1.0] * len(completions)
        """,
    )
    problems = [Problem("p0", "", "4"), Problem("p1", "", "5")]
    for funcs in (["verifier", f"{path}:always"], [f"{path}:always"]):
        total, _, verdicts = _step_reward(funcs)(problems, ["4", "4"])
        assert verdicts == [1.0, 0.0] and min(total) >= 1.0
        scored = ScoredRollouts(
            problems, None, torch.tensor(total), torch.zeros(2), 0.0, verdicts=torch.tensor(verdicts)
        )
        assert scored.correct.tolist() == [True, False]


@pytest.mark.parametrize(
    "source, funcs, weights, message",
    [
        (
            None,
            "[verifier,/nonexistent/rewards.py:f]",
            None,
            "reward function file /nonexistent/rewards.py does not exist",
        ),
        (None, "[no_such_module_xyz:f]", None, "could not import reward function module no_such_module_xyz"),
        (
            "def f(prompts, completions, **kwargs):\n    return [0.0]\n",
            "[{file}:g]",
            None,
            "reward function 'g' not found",
        ),
        ("f = 3\n", "[{file}:f]", None, "is a int, not a function"),
        (
            "def f(completions):\n    return [0.0]\n",
            "[{file}:f]",
            None,
            "cannot be called as f(prompts=..., completions",
        ),
        (
            "def f(prompts, completions, **kwargs):\n    return [0.0]\n",
            "[verifier,{file}:f]",
            "[1.0]",
            "task.reward_weights has 1 entries for 2 task.reward_funcs",
        ),
        ("import nonexistent_dependency_xyz\n", "[{file}:f]", None, "could not load reward function file"),
    ],
)
def test_bad_reward_functions_exit_2_before_a_run_directory_exists(tmp_path, source, funcs, weights, message):
    file = write(tmp_path / "user_rewards.py", source) if source else None
    args = [f"task.reward_funcs={funcs.format(file=file)}"] + ([f"task.reward_weights={weights}"] if weights else [])
    result = run_cli(tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output and message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not (tmp_path / "runs" / "r").exists()


@pytest.mark.parametrize(
    "body, timeout, message",
    [
        (
            "    if len(calls) == 2:\n        raise ValueError('bad row')\n    return [0.0] * len(completions)\n",
            60,
            "step 2 (rl): reward function flaky raised ValueError: bad row",
        ),
        (
            "    return [0.0] * (len(completions) - (len(calls) == 2))\n",
            60,
            "step 2 (rl): reward function flaky returned 3 values for 4 completions",
        ),
        (
            "    if len(calls) == 2:\n        threading.Event().wait(20)\n    return [0.0] * len(completions)\n",
            1,
            "step 2 (rl): reward function flaky did not return within task.reward_timeout_s=1 s",
        ),
    ],
)
@pytest.mark.slow
def test_a_failing_reward_function_fails_the_run_at_its_step(tmp_path, body, timeout, message):
    """Raising, returning the wrong number of values or hanging past task.reward_timeout_s at the second step:
    exit 1, status failed with the function and the step named, and step 1's checkpoint intact."""
    file = write(
        tmp_path / "flaky_rewards.py",
        "import threading\ncalls = []\n\ndef flaky(prompts, completions, **kwargs):\n    calls.append(1)\n" + body,
    )
    result = run_cli(
        tmp_path,
        f"task.reward_funcs=[verifier,{file}:flaky]",
        f"task.reward_timeout_s={timeout}",
        "train.checkpoint_every=1",
    )
    assert result.exit_code == 1, result.output
    run = tmp_path / "runs" / "r"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == f"RewardFunctionError: {message}"
    assert message in " ".join(result.output.split())
    assert max(m["step"] for m in rows(run, "metrics.jsonl")) == 1  # step 2 made no update and logged nothing
    found = list_checkpoints(run / "checkpoints")
    assert [p.name for p in found] == ["step-000001"] and read_checkpoint(found[-1])[0]["step"] == 1


def test_a_non_number_is_refused():
    with pytest.raises(RewardFunctionError, match="returned 'yes' for completion 0, not a number or None"):
        from bridgectl.tasks.rewards import checked_values

        checked_values("f", ["yes"], 1)


def test_arith_system_prompts_are_refused(tmp_path):
    """The arith task has no chat template."""
    system = CliRunner().invoke(app, ["run", "task.system_prompt=Be brief.", "--dry-run"])
    assert system.exit_code == 2 and "task.system_prompt applies to dataset tasks" in system.output


def test_uft_scores_hint_and_completion_with_the_combined_reward(tmp_path):
    """UFT rescores hint + completion: a constant function at weight 0.5 moves every reward by exactly 0.5 (the
    advantages, and so the run, unchanged), and a function sees the original prompt and the hint in the completion."""
    seen = tmp_path / "seen.jsonl"
    const = write(
        tmp_path / "const.py",
        f"""
        import json

        def always_one(prompts, completions, **kwargs):
            with open({str(seen)!r}, "a") as log:
                log.write(json.dumps({{"prompts": prompts, "completions": completions}}) + "\\n")
            return [1.0] * len(completions)
        """,
    )
    common = ["run", "recipe=uft", *SMALL, "uft.hint_start=1.0", "--out", str(tmp_path)]
    plain = CliRunner().invoke(app, [*common, "--name", "plain"])
    shifted = CliRunner().invoke(
        app,
        [
            *common,
            f"task.reward_funcs=[verifier,{const}:always_one]",
            "task.reward_weights=[1.0,0.5]",
            "--name",
            "shifted",
        ],
    )
    assert plain.exit_code == 0 and shifted.exit_code == 0, plain.output + shifted.output
    before = [m for m in rows(tmp_path / "plain", "metrics.jsonl") if m["stage"] == "uft"]
    after = [m for m in rows(tmp_path / "shifted", "metrics.jsonl") if m["stage"] == "uft"]
    assert len(before) == len(after) == 3
    for a, b in zip(before, after):
        assert b["train/reward_mean"] == pytest.approx(a["train/reward_mean"] + 0.5, abs=1e-6)
        assert b["train/rewards/always_one"] == 1.0
        assert b["train/rl_loss"] == pytest.approx(a["train/rl_loss"], abs=1e-6)
    calls = rows(tmp_path, "seen.jsonl")  # per step: sampling's scoring, then the hint + completion rescoring
    sampled, rescored = calls[0], calls[1]
    hints = [shown[len(own) :] for shown, own in zip(sampled["prompts"], rescored["prompts"])]
    assert all(shown.startswith(own) for shown, own in zip(sampled["prompts"], rescored["prompts"]))
    assert any(hints)  # uft.hint_start=1: the first step gives hints
    assert rescored["completions"] == [hint + c for hint, c in zip(hints, sampled["completions"])]
