"""rollout.cpu_packed_weights (core/packed_linear.py): on the CPU, decoding with the linear layers' weights packed for
oneDNN computes what the plain layers compute, samples the same tokens (greedy and per-group seeded), puts every
layer back as it was, leaves alone the layers it does not apply to, is used only for models where it pays, and is
what rollouts and evaluations use unless the setting turns it off."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bridgectl.config.compose import compose
from bridgectl.core import packed_linear
from bridgectl.core.evaluate import decoding
from bridgectl.core.grpo import sample_groups
from bridgectl.core.rollout import generate
from bridgectl.training.setup import build_context

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="this PyTorch build has no oneDNN")


def counting_packed_calls(monkeypatch) -> list:
    """Counts the packed kernel's calls (one per packed layer per forward pass)."""
    calls, real = [], packed_linear._packed_forward

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(packed_linear, "_packed_forward", counted)
    return calls


def test_a_packed_layer_computes_what_the_plain_layer_does_and_is_put_back(monkeypatch):
    calls = counting_packed_calls(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.Linear(96, 24, bias=False))
    inputs = [torch.randn(5, 48), torch.randn(3, 1, 48), torch.randn(4, 2, 48)[:, :1]]  # 2-D, 3-D, strided
    with torch.no_grad():
        expected = [model(x) for x in inputs]
        with packed_linear.packed_linears(model, rows=4):
            assert all("forward" in layer.__dict__ for layer in model)
            got = [model(x) for x in inputs]
        assert len(calls) == 2 * len(inputs)  # the packed kernel did the work
        for want, have in zip(expected, got):
            assert have.shape == want.shape
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
    assert all("forward" not in layer.__dict__ for layer in model)
    with pytest.raises(RuntimeError, match="stop"):
        with packed_linear.packed_linears(model, rows=4):
            raise RuntimeError("stop")
    assert all("forward" not in layer.__dict__ for layer in model)  # put back after an error too
    with torch.no_grad():
        assert torch.equal(model(inputs[0]), expected[0])


def test_only_plain_float32_cpu_linear_layers_are_packed():
    class Subclass(torch.nn.Linear):  # as bitsandbytes' quantized layers subclass nn.Linear
        pass

    plain, half, sub, hooked = (
        torch.nn.Linear(8, 8),
        torch.nn.Linear(8, 8).to(torch.bfloat16),
        Subclass(8, 8),
        torch.nn.Linear(8, 8),
    )
    hooked.forward = lambda x: torch.zeros(x.shape[0], 8)  # as accelerate's offloading hooks set it
    model = torch.nn.ModuleList([plain, half, sub, hooked])
    assert packed_linear.packable_linears(model) == [plain]
    with packed_linear.packed_linears(model, rows=2):
        assert "forward" in plain.__dict__ and "forward" not in half.__dict__ and "forward" not in sub.__dict__
        assert torch.equal(hooked(torch.ones(2, 8)), torch.zeros(2, 8))
    assert "forward" in hooked.__dict__  # its own forward stays


def llama(hidden: int, layers: int, vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            eos_token_id=2,
        )
    ).eval()


def test_packed_decoding_samples_the_tokens_of_plain_decoding(tokenizer, monkeypatch):
    model = llama(64, 2, len(tokenizer))
    monkeypatch.setattr(packed_linear, "MIN_PARAMETERS", 0)
    calls = counting_packed_calls(monkeypatch)
    prompts = ["12+7=", "3*4=", "100-1=", "6+6=", "1+1=", "9*9="]

    def decode(pack: bool, seeded: bool):
        generators = [torch.Generator().manual_seed(seed) for seed in (1, 2, 3)] if seeded else None
        return generate(
            model,
            tokenizer,
            prompts,
            16,
            greedy=not seeded,
            group_generators=generators,
            end_ids=[-1],
            pack_weights=pack,
        )

    for seeded in (False, True):
        plain = decode(False, seeded)
        assert not calls
        packed = decode(True, seeded)
        assert len(calls) == 16 * 15  # the prefill and 15 steps, through 2 x 7 linear layers and the head each
        calls.clear()
        assert torch.equal(packed.completion_ids, plain.completion_ids)
        torch.testing.assert_close(packed.sampling_logprobs, plain.sampling_logprobs, rtol=0, atol=1e-5)


def test_packing_is_used_for_models_where_it_pays(tokenizer, tiny_model, monkeypatch):
    calls = counting_packed_calls(monkeypatch)
    assert not packed_linear.worth_packing(tiny_model)  # the built-in 1M-parameter model: no gain there
    generate(tiny_model, tokenizer, ["1+1="], 4, greedy=True)
    assert not calls
    bigger = llama(256, 6, 4096)  # 4.6M linear-layer parameters
    assert sum(m.weight.numel() for m in packed_linear.packable_linears(bigger)) >= packed_linear.MIN_PARAMETERS
    assert packed_linear.worth_packing(bigger)
    generate(bigger, tokenizer, ["1+1="], 2, greedy=True)
    assert calls
    calls.clear()
    monkeypatch.setattr(packed_linear, "free_memory_bytes", lambda: 20 * 1024 * 1024)  # 20 MiB free
    assert not packed_linear.worth_packing(bigger)  # less than twice its packed copy (18 MB)
    generate(bigger, tokenizer, ["1+1="], 2, greedy=True)
    assert not calls


@pytest.mark.parametrize("packed", [True, False])
def test_rollouts_and_evaluations_follow_rollout_cpu_packed_weights(packed, monkeypatch):
    ctx = build_context(
        compose(
            [
                "recipe=rl",
                "rl.prompts_per_step=2",
                "rl.num_generations=2",
                "rl.max_completion_length=6",
                "train.threads=1",
                "eval.n=4",
                f"rollout.cpu_packed_weights={str(packed).lower()}",
            ]
        ),
        show_progress=False,
    )
    monkeypatch.setattr(packed_linear, "MIN_PARAMETERS", 0)  # as if the built-in model were large enough
    calls = counting_packed_calls(monkeypatch)
    sample_groups(ctx)
    assert bool(calls) == packed
    calls.clear()
    with decoding(ctx) as decode:
        decode(["1+1="], 4, None, None)
    assert bool(calls) == packed
    assert all("forward" not in m.__dict__ for m in ctx.policy.model.modules())  # nothing left packed
