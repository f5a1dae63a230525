"""rollout.backend=vllm, the parts that run without vLLM or a GPU: the weights an engine is given compute what the
trained policy computes, completions sampled elsewhere become the same Rollouts (and log-probs) the trainer's own
sampler makes, and the seeds and log-prob gap are what they claim. The engine calls themselves need a CUDA GPU
(benchmarks/gpu_check.py); the refusals on this machine are in test_bad_inputs.py."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from bridgectl.config import LoraConfig
from bridgectl.core.model import Policy, add_upper_adapter, merged_weights
from bridgectl.core.rollout import (Rollouts, encode_prompts, generate, prompt_token_lists, rollouts_from_token_ids,
                                    score_sampled)
from bridgectl.core.vllm_rollout import logprob_gap, seeds_per_row
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
        model = get_peft_model(model, PeftLoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
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
    sampled = generate(model, tokenizer, PROMPTS, max_new_tokens=24, temperature=1.0,
                       generator=torch.Generator().manual_seed(5))
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
    rollouts = Rollouts(torch.zeros(2, 1), torch.ones(2, 1), torch.zeros(2, 2), torch.tensor([[1, 1], [1, 0]]),
                        torch.tensor([[-1.0, -2.0], [-0.5, 0.0]]), ["", ""])
    assert logprob_gap(rollouts, [[-1.5, -2.0], [-0.25]]) == pytest.approx((0.5 + 0.0 + 0.25) / 3)
    assert torch.isnan(torch.tensor(logprob_gap(rollouts, [[], []])))


def test_each_completion_gets_its_own_seed_from_its_group():
    seeds = seeds_per_row([10, 11], rows_per_group=3)
    assert len(seeds) == 6 and len(set(seeds)) == 6  # neighbouring group seeds do not share row seeds
    assert seeds_per_row([11], rows_per_group=3) == seeds[3:]  # a group's seeds do not depend on the others
    assert seeds_per_row([10, 11], rows_per_group=3) == seeds  # reproducible
