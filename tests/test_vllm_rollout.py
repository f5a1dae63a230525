"""rollout.backend=vllm, the parts that run without vLLM or a GPU: the weights an engine is given compute what the
trained policy computes, completions sampled elsewhere become the same Rollouts (and log-probs) the trainer's own
sampler makes, and the seeds and log-prob gap are what they claim. The engine calls themselves need a CUDA GPU
(benchmarks/gpu_check.py); the refusals on this machine are in test_bad_inputs.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from bridgectl.config.schema import LoraConfig
from bridgectl.core.grpo import seeds_per_row
from bridgectl.core.logprobs import score_sampled
from bridgectl.core.model import Policy, add_upper_adapter, merged_weights
from bridgectl.core.rollout import Rollouts, encode_prompts, generate, prompt_token_lists, rollouts_from_token_ids
from bridgectl.core.vllm_rollout import engine_logprob_tensor, logprob_gap
from bridgectl.models.tiny import SHIPPED_DIR

PROMPTS = ["4+9*3-5*3=", "1+2=", "7*8-6+5*2=", "3-4=", "2*2=", "9-1+1="]


def shipped() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(SHIPPED_DIR, dtype=torch.float32).eval()


def randomise_adapters(model: torch.nn.Module, seed: int) -> None:
    """peft starts B at zero (no change to the model); random B and A make every adapter count."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def policy_with(kind: str, tokenizer) -> Policy:
    """The policies BRIDGE trains: lower=lora (two adapters over a frozen base), lower=full (trained base weights
    and w), and a plain fully fine-tuned model."""
    lora_cfg = OmegaConf.structured(LoraConfig(rank=8))
    model = shipped()
    if kind == "lora":
        model = get_peft_model(
            model, PeftLoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        )
    policy = Policy(model=model, tokenizer=tokenizer)
    if kind in ("lora", "full"):
        add_upper_adapter(policy, "w", 8, 16, lora_cfg, train_base=kind == "full")
        randomise_adapters(policy.model, seed=3)
    if kind in ("full", "plain"):
        with torch.no_grad():  # trained base weights differ from the checkpoint's
            for name, param in policy.model.named_parameters():
                if "lora_" not in name and name.endswith("weight"):
                    param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    policy.model.eval()
    return policy


@pytest.mark.parametrize("kind", ["lora", "full", "plain"])
def test_engine_weights_compute_what_the_policy_computes(kind, tokenizer):
    """A fresh copy of the base architecture given merged_weights (checkpoint names, adapters folded in) gives the
    policy's logits: what vLLM's `load_weights` receives names every weight of the checkpoint and nothing else."""
    policy = policy_with(kind, tokenizer)
    weights = dict(merged_weights(policy.model))
    engine_copy = shipped()
    assert set(weights) == set(engine_copy.state_dict())
    engine_copy.load_state_dict(weights, strict=True)
    ids, mask = encode_prompts(tokenizer, PROMPTS, torch.device("cpu"))
    with torch.no_grad():
        expected = policy.model(input_ids=ids, attention_mask=mask).logits
        got = engine_copy(input_ids=ids, attention_mask=mask).logits
        untrained = shipped()(input_ids=ids, attention_mask=mask).logits
    assert (expected - untrained).abs().max() > 1e-2  # the adapters and trained weights change the model
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_merging_leaves_the_policy_unchanged(tokenizer):
    policy = policy_with("lora", tokenizer)
    before = {name: tensor.clone() for name, tensor in policy.model.state_dict().items()}
    for _ in merged_weights(policy.model):
        pass
    after = policy.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_completions_sampled_elsewhere_score_as_the_trainers_own(tokenizer):
    """The trainer's sampler's completions, handed over as an engine returns them (token lists of different
    lengths, EOS included), become the same Rollouts: ids, masks, text, and the sampling log-probs recomputed
    a few rows per pass equal those recorded while sampling."""
    model = shipped()
    torch.manual_seed(0)
    sampled = generate(
        model, tokenizer, PROMPTS, max_new_tokens=24, temperature=1.0, generator=torch.Generator().manual_seed(5)
    )
    lengths = sampled.lengths.tolist()
    assert len(set(lengths)) > 1  # rows of different lengths: the padding is exercised
    token_lists = [row[:length].tolist() for row, length in zip(sampled.completion_ids, lengths)]
    assert prompt_token_lists(sampled.prompt_ids, sampled.prompt_mask)[1] == tokenizer(PROMPTS[1])["input_ids"]

    handed_over = rollouts_from_token_ids(tokenizer, sampled.prompt_ids, sampled.prompt_mask, token_lists)
    width = max(lengths)
    assert torch.equal(handed_over.completion_ids, sampled.completion_ids[:, :width])
    assert torch.equal(handed_over.completion_mask, sampled.completion_mask[:, :width])
    assert handed_over.completions == sampled.completions
    rescored = score_sampled(model, handed_over, temperature=1.0, rows_per_pass=4)
    torch.testing.assert_close(rescored.sampling_logprobs, sampled.sampling_logprobs[:, :width], atol=1e-5, rtol=0)


def test_a_completion_is_exactly_the_tokens_the_engine_returned(tokenizer):
    """An engine may stop on a token that is not the tokenizer's EOS (a generation config's other stop ids) or
    return nothing: the mask covers the returned tokens only, whatever they are."""
    ids, mask = encode_prompts(tokenizer, PROMPTS[:3], torch.device("cpu"))
    digit = tokenizer.convert_tokens_to_ids("7")
    rollouts = rollouts_from_token_ids(tokenizer, ids, mask, [[digit, digit, digit], [], [digit]])
    assert rollouts.completion_mask.tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]
    assert rollouts.completion_ids[1].tolist() == [tokenizer.pad_token_id] * 3
    assert rollouts.completions == ["777", "", "7"]
    rescored = score_sampled(shipped(), rollouts, temperature=1.0, rows_per_pass=2)
    assert rescored.sampling_logprobs[1].abs().sum() == 0 and (rescored.sampling_logprobs[0] < 0).all()


def test_logprob_gap_is_the_mean_absolute_difference():
    rollouts = Rollouts(
        torch.zeros(2, 1),
        torch.ones(2, 1),
        torch.zeros(2, 2),
        torch.tensor([[1, 1], [1, 0]]),
        torch.tensor([[-1.0, -2.0], [-0.5, 0.0]]),
        ["", ""],
    )
    rollouts.engine_logprobs = engine_logprob_tensor(rollouts, [[-1.5, -2.0], [-0.25]])
    assert logprob_gap(rollouts) == pytest.approx((0.5 + 0.0 + 0.25) / 3)
    rollouts.engine_logprobs = engine_logprob_tensor(rollouts, [[], []])
    assert torch.isnan(torch.tensor(logprob_gap(rollouts)))


def test_the_engines_logprobs_travel_with_the_rollouts_and_correct_the_loss():
    """The engine's log-probs become a NaN-padded tensor beside the trainer's, survive row selection and
    concatenation (rows without them get NaN, which the correction reads as no gap), and rl_loss multiplies each
    token's policy term by rollout_correction's ratio of them (rl.vllm_importance_sampling_correction, TRL's
    default mode sequence_mask), which it does not with the correction off."""
    from bridgectl.config.compose import compose
    from bridgectl.core.grpo import loss_mask, rl_loss, sample_groups
    from bridgectl.core.logprobs import rollout_rows
    from bridgectl.core.policy_losses import grpo_loss, rollout_correction
    from bridgectl.core.rollout import concat_rollouts
    from bridgectl.training.setup import build_context

    rollouts = Rollouts(
        torch.zeros(2, 1),
        torch.ones(2, 1),
        torch.zeros(2, 3),
        torch.tensor([[1, 1, 1], [1, 0, 0]]),
        torch.tensor([[-1.0, -2.0, -0.1], [-0.5, 0.0, 0.0]]),
        ["", ""],
    )
    engine = engine_logprob_tensor(rollouts, [[-1.5, -2.0, -0.2], [-0.25]])
    assert engine[0].tolist() == pytest.approx([-1.5, -2.0, -0.2]) and engine[1, 0].item() == -0.25
    assert torch.isnan(engine[1, 1:]).all()
    rollouts.engine_logprobs = engine
    assert torch.equal(rollout_rows(rollouts, [1]).engine_logprobs[:, :1], engine[1:, :1])
    joined = concat_rollouts(
        [
            rollouts,
            Rollouts(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 4), torch.ones(1, 4), torch.zeros(1, 4), [""]),
        ],
        pad_id=0,
    )
    assert joined.engine_logprobs.shape == (3, 4) and torch.isnan(joined.engine_logprobs[2]).all()

    for correct in (True, False):
        ctx = build_context(
            compose(
                [
                    "recipe=rl",
                    "rl.prompts_per_step=2",
                    "rl.num_generations=4",
                    "rl.max_completion_length=8",
                    "train.threads=1",
                    f"rl.vllm_importance_sampling_correction={str(correct).lower()}",
                    "rl.vllm_importance_sampling_clip_max=1.05",
                ]
            ),
            show_progress=False,
        )
        scored = sample_groups(ctx)
        trainer = scored.rollouts.sampling_logprobs
        shift = torch.linspace(-0.04, 0.04, trainer.size(0)).unsqueeze(1)  # some completions past the bound
        scored.rollouts.engine_logprobs = trainer - shift
        loss, _ = rl_loss(ctx.policy.model, scored, ctx)
        mask = loss_mask(scored.rollouts, ctx)
        ratio, acted = rollout_correction(trainer, trainer - shift, mask, "sequence_mask", None, 1.05)
        assert acted.any() and not acted.all()
        from bridgectl.core.logprobs import completion_logprobs

        logprobs = completion_logprobs(ctx.policy.model, scored.rollouts, 1.0)
        expected, _ = grpo_loss(
            logprobs, trainer, scored.advantages, mask, 0.2, rollout_ratio=ratio if correct else None
        )
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)


def test_each_completion_gets_its_own_seed_from_its_group():
    seeds = seeds_per_row([10, 11], rows_per_group=3)
    assert len(seeds) == 6 and len(set(seeds)) == 6  # neighbouring group seeds do not share row seeds
    assert seeds_per_row([11], rows_per_group=3) == seeds[3:]  # a group's seeds do not depend on the others
    assert seeds_per_row([10, 11], rows_per_group=3) == seeds  # reproducible


# ---- the engine itself, where vLLM is installed (`make test-vllm`: vLLM's CPU build in its own environment) ----

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vllm is not installed (make test-vllm runs these with vLLM's CPU build)",
)


@pytest.fixture(scope="module")
def engine_and_policy():
    from bridgectl.config.compose import compose
    from bridgectl.core.model import load_policy
    from bridgectl.core.vllm_rollout import check_usable, engine_for
    from bridgectl.models.sources import base_model_path
    from bridgectl.stages.bridge import ensure_upper_adapter

    cfg = compose(["recipe=bridge", "model.finetune=lora", "rollout.backend=vllm", "train.device=cpu"])
    device = torch.device("cpu")
    check_usable(device)
    policy = load_policy(
        cfg.model, cfg.lora, base_model_path(cfg.model, cfg.task), device, keep_reference=False, finetune="lora"
    )
    ensure_upper_adapter(policy, cfg)  # BRIDGE lower=lora: theta's adapter and w, both folded in
    randomise_adapters(policy.model, seed=0)
    policy.model.eval()
    return engine_for(base_model_path(cfg.model, cfg.task, show_progress=False), cfg, policy), policy


def greedy_from_engine(engine, policy) -> list[list[int]]:
    from vllm import SamplingParams

    engine.load_policy_weights(policy)
    ids, mask = encode_prompts(policy.tokenizer, PROMPTS, torch.device("cpu"))
    outputs = engine.llm.generate(
        [{"prompt_token_ids": p} for p in prompt_token_lists(ids, mask)],
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[policy.tokenizer.eos_token_id]),
        use_tqdm=False,
    )
    return [list(output.outputs[0].token_ids) for output in outputs]


def greedy_from_policy(policy) -> list[list[int]]:
    with policy.merged_for_generation() as model:
        rollouts = generate(model, policy.tokenizer, PROMPTS, max_new_tokens=24, greedy=True)
    return [row[:length].tolist() for row, length in zip(rollouts.completion_ids, rollouts.lengths.tolist())]


@needs_vllm
def test_engine_samples_the_current_policy(engine_and_policy):
    """After each weight load the engine decodes exactly what the trained policy decodes, adapters included,
    and it follows the policy when the weights change."""
    engine, policy = engine_and_policy
    before = greedy_from_policy(policy)
    assert greedy_from_engine(engine, policy) == before
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.mul_(3.0)
    after = greedy_from_policy(policy)
    assert after != before  # the change matters to greedy decoding
    assert greedy_from_engine(engine, policy) == after


@needs_vllm
def test_engine_sampling_is_seeded_and_matches_the_trainers_logprobs(engine_and_policy):
    engine, policy = engine_and_policy
    prompts = [p for p in PROMPTS for _ in range(4)]
    first = engine.sample(policy, prompts, 24, 1.0, seeds_per_row([1, 2, 3, 4, 5, 6], 4))
    assert engine.last_logprob_gap < 1e-4  # the engine's distribution is the trained model's
    again = engine.sample(policy, prompts, 24, 1.0, seeds_per_row([1, 2, 3, 4, 5, 6], 4))
    assert torch.equal(first.completion_ids, again.completion_ids)
    other = engine.sample(policy, prompts, 24, 1.0, seeds_per_row([7, 8, 9, 10, 11, 12], 4))
    assert not torch.equal(first.completion_ids, other.completion_ids)
    assert len(set(first.completions[:4])) > 1  # a group's completions are different samples


@needs_vllm
def test_a_bridge_run_samples_through_vllm(tmp_path):
    """`bridgectl run` with rollout.backend=vllm: BRIDGE lower=lora, the shadow sampling its own rollouts through
    the same engine, logs the engine's log-prob gap each step and learns."""
    import json

    from typer.testing import CliRunner

    from bridgectl.cli.app import app

    result = CliRunner().invoke(
        app,
        [
            "run",
            "recipe=bridge",
            "model.finetune=lora",
            "bridge.shadow_rollouts=true",
            "rollout.backend=vllm",
            "train.device=cpu",
            "train.max_steps=6",
            "train.eval_every=0",
            "eval.n=50",
            "--out",
            str(tmp_path),
            "--name",
            "v",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "train/rl_loss" in row]
    assert len(steps) == 6 and all(row["rollout/logprob_gap"] < 1e-4 for row in steps)
    assert all("bridge/reward_gap" in row for row in steps)
    summary = json.loads((tmp_path / "v" / "summary.json").read_text())
    assert summary["status"] == "completed"
    # the run's evaluations were decoded by the engine; `bridgectl eval` of the run (which keeps its backend)
    # reproduces the final one, and decoding with the trained model instead gives the same greedy accuracy
    final = summary["eval"]["test"]["accuracy"]
    for extra in ([], ["rollout.backend=hf"]):
        evaluated = CliRunner().invoke(app, ["eval", str(tmp_path / "v"), "--output", str(tmp_path / "e.json"), *extra])
        assert evaluated.exit_code == 0, evaluated.output
        assert json.loads((tmp_path / "e.json").read_text())["results"]["test"]["greedy_pass@1"] == final
    sampled = []
    for _ in range(2):  # pass@k from the engine's samples, seeded
        evaluated = CliRunner().invoke(
            app, ["eval", str(tmp_path / "v"), "eval.k=4", "eval.n=20", "--output", str(tmp_path / "k.json")]
        )
        assert evaluated.exit_code == 0, evaluated.output
        sampled.append(json.loads((tmp_path / "k.json").read_text())["results"]["test"])
    assert sampled[0] == sampled[1]
    assert 0 < sampled[0]["mean@4"] <= sampled[0]["pass@4"] <= 1
    # a second run in this process (a sweep's next trial) takes the open engine instead of starting one
    from bridgectl.core.vllm_rollout import _open_engine

    engine = next(iter(_open_engine.values()))
    again = CliRunner().invoke(
        app,
        [
            "run",
            "recipe=rl",
            "rollout.backend=vllm",
            "train.device=cpu",
            "train.max_steps=2",
            "train.eval_every=0",
            "eval.n=20",
            "--out",
            str(tmp_path),
            "--name",
            "second",
        ],
    )
    assert again.exit_code == 0, again.output
    assert list(_open_engine.values()) == [engine]
    # other engine settings: the open engine is closed (its memory given back) before a new one starts
    other = CliRunner().invoke(
        app,
        [
            "run",
            "recipe=rl",
            "rollout.backend=vllm",
            "rollout.gpu_memory_utilization=0.25",
            "train.device=cpu",
            "train.max_steps=2",
            "train.eval_every=0",
            "eval.n=20",
            "--out",
            str(tmp_path),
            "--name",
            "third",
        ],
    )
    assert other.exit_code == 0, other.output
    assert len(_open_engine) == 1 and next(iter(_open_engine.values())) is not engine
    assert not hasattr(engine, "llm")
    assert summary["eval"]["test"]["accuracy"] > summary["eval_initial"]["test"]["accuracy"]


@needs_vllm
def test_two_processes_with_vllm_match_one(tmp_path):
    """`--nproc 2` with rollout.backend=vllm: each process's own engine samples its share of the groups with the
    same per-completion seeds, so the run equals the single-process one (rewards, losses, gradient norms, eval)."""
    import json

    from typer.testing import CliRunner

    from bridgectl.cli.app import app

    small = [
        "recipe=rl",
        "rollout.backend=vllm",
        "rollout.gpu_memory_utilization=0.1",
        "train.device=cpu",
        "train.max_steps=3",
        "train.eval_every=0",
        "eval.n=20",
        "--out",
        str(tmp_path),
    ]
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        result = CliRunner().invoke(app, ["run", *small, *extra, "--name", name])
        assert result.exit_code == 0, result.output
    runs = {}
    for name in ("one", "two"):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [row for row in rows if "train/rl_loss" in row]
    assert len(runs["one"]) == len(runs["two"]) == 3
    for one, two in zip(runs["one"], runs["two"]):
        for key in ("train/reward_mean", "train/rl_loss", "train/grad_norm", "train/response_len"):
            assert two[key] == pytest.approx(one[key], abs=1e-4), key
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    assert summaries[0]["eval"] == summaries[1]["eval"]
