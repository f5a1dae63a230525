"""The merged-weight LoRA forward (core/lora_forward.py) computes what peft's own forward computes: the same outputs
and the same gradients for the base weights and every active adapter, when other weights are substituted for the
model's own (here by torch.func.functional_call; BRIDGE's shadow swaps theta_hat's values in place instead) and
with the adapters disabled (the KL reference)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch.func import functional_call
from transformers import LlamaConfig, LlamaForCausalLM

from bridgectl.config.compose import compose
from bridgectl.core.lora_forward import _merged_weight_forward, set_lora_forward, wants_merged_forward
from bridgectl.core.model import adapter_of
from bridgectl.training.setup import build_context


def two_adapter_model(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            attn_implementation="eager",
        )
    )
    targets = ["q_proj", "v_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))
    model.add_adapter("w", LoraConfig(r=2, lora_alpha=4, lora_dropout=dropout, target_modules=targets))
    model.base_model.set_adapter(["default", "w"])
    for name, param in model.named_parameters():
        param.requires_grad_(True)  # base weights train too, as under bridge.lower=full
        if "lora_B" in name:  # peft starts B at zero; random B makes every adapter change the output
            with torch.no_grad():
                param.normal_(std=0.1)
    return model


def loss_and_grads(model, ids, weights=None):
    model.zero_grad(set_to_none=True)
    call = (
        (lambda: functional_call(model, weights, args=(), kwargs={"input_ids": ids}, strict=False))
        if weights
        else (lambda: model(input_ids=ids))
    )
    logits = call().logits
    loss = logits.log_softmax(-1)[..., 3].mean()
    targets = list(weights.values()) if weights else [p for p in model.parameters()]
    return logits.detach(), torch.autograd.grad(loss, targets)


def test_merged_forward_matches_peft_outputs_and_gradients():
    ids = torch.randint(0, 32, (3, 7))
    peft_model = two_adapter_model()
    merged_model = copy.deepcopy(peft_model)
    assert set_lora_forward(merged_model, merged=True) == 6  # 3 targets x 2 layers
    peft_logits, peft_grads = loss_and_grads(peft_model, ids)
    merged_logits, merged_grads = loss_and_grads(merged_model, ids)
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-5, rtol=1e-5)
    names = [n for n, _ in peft_model.named_parameters()]
    assert {adapter_of(n) for n in names} == {None, "default", "w"}
    for name, expected, got in zip(names, peft_grads, merged_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=name)
    # the merged model really runs the merged path: one linear per layer, no calls into the adapters' modules
    calls = []
    layer = next(m for m in merged_model.modules() if isinstance(m, LoraLinear))
    layer.lora_A["w"].register_forward_hook(lambda *_: calls.append(1))
    merged_model(input_ids=ids)
    assert calls == []


def test_merged_forward_under_functional_call_and_disabled_adapters():
    ids = torch.randint(0, 32, (2, 5))
    peft_model = two_adapter_model()
    merged_model = copy.deepcopy(peft_model)
    set_lora_forward(merged_model, merged=True)
    # BRIDGE's shadow: other tensors in place of the "default" adapter, gradients wrt those tensors
    shadow = {
        n: (p.detach() + 0.05).requires_grad_(True)
        for n, p in peft_model.named_parameters()
        if adapter_of(n) == "default"
    }
    shadow_copy = {n: t.detach().clone().requires_grad_(True) for n, t in shadow.items()}
    peft_logits, peft_grads = loss_and_grads(peft_model, ids, shadow)
    merged_logits, merged_grads = loss_and_grads(merged_model, ids, shadow_copy)
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-5, rtol=1e-5)
    for expected, got in zip(peft_grads, merged_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    plain = merged_model(input_ids=ids).logits
    assert not torch.allclose(plain, merged_logits, atol=1e-4)  # the swapped tensors were used
    with peft_model.disable_adapter(), merged_model.disable_adapter():  # the reference policy: base only
        torch.testing.assert_close(merged_model(input_ids=ids).logits, peft_model(input_ids=ids).logits)
        assert not torch.allclose(merged_model(input_ids=ids).logits, plain, atol=1e-4)


def test_dropout_in_training_falls_back_to_peft():
    """Dropout on the adapter input cannot be folded into the weight: training uses peft's own forward."""
    model = two_adapter_model(dropout=0.5).train()
    set_lora_forward(model, merged=True)
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    calls = []
    layer.lora_A["w"].register_forward_hook(lambda *_: calls.append(1))
    model(input_ids=torch.randint(0, 32, (2, 5)))
    assert calls == [1]
    model.eval()  # no dropout in eval: merged again
    model(input_ids=torch.randint(0, 32, (2, 5)))
    assert calls == [1]


@pytest.mark.parametrize(
    "mode, parameters, merged",
    [
        ("auto", 1_000_000, True),
        ("auto", 100_000_000, False),
        ("merged", 100_000_000, True),
        ("unmerged", 1_000_000, False),
    ],
)
def test_auto_merges_only_small_models(mode, parameters, merged):
    assert wants_merged_forward(mode, parameters) is merged


@pytest.mark.parametrize("mode, merged", [("auto", True), ("unmerged", False)])
def test_runs_pick_the_configured_forward(mode, merged):
    ctx = build_context(compose(["recipe=rl", "model.finetune=lora", f"lora.forward={mode}"]), show_progress=False)
    layers = [m for m in ctx.policy.model.modules() if isinstance(m, LoraLinear)]
    assert layers
    assert all(("forward" in vars(m) and m.forward.__func__ is _merged_weight_forward) is merged for m in layers)


@pytest.mark.slow
def test_sampling_with_merged_adapters_leaves_every_weight_bit_identical():
    """Policy.merged_for_generation swaps W for W + s B A and puts the same W back: the frozen base never drifts,
    where peft's in-place merge/unmerge (W += dW; W -= dW) changes it by rounding."""
    import torch

    policy = build_context(compose(["recipe=rl", "model.finetune=lora", "lora.rank=8"]), show_progress=False).policy
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    ids = torch.randint(3, 20, (2, 9))
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    for _ in range(20):
        with policy.merged_for_generation() as sampler:
            sampled = sampler(input_ids=ids).logits
    assert all(torch.equal(p, before[n]) for n, p in policy.model.named_parameters())
    torch.testing.assert_close(sampled, policy.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)  # adapted model
    with policy.model.disable_adapter():
        assert not torch.allclose(sampled, policy.model(input_ids=ids).logits, atol=1e-3)  # the adapters count

    for _ in range(20):  # what the swap avoids
        policy.model.merge_adapter()
        policy.model.unmerge_adapter()
    assert any(not torch.equal(p, before[n]) for n, p in policy.model.named_parameters() if "lora_" not in n)
