"""`make bench`: the cost of a BRIDGE step against an `rl` step, and peak memory of bridge.lower=full|lora against
`rl`, as ratios from one run (absolute times drift on shared machines; ratios hold). Writes benchmarks/results.md.

Each configuration runs in its own process (so peak memory is its own): build the run's context exactly as
`bridgectl run` does, take `--warmup` steps, then time `--steps` steps of the stage. Every completion is forced to
the same length (EOS suppressed while sampling), because the recipes' policies write different lengths after a
few steps (BRIDGE's SFT term switches to traces at once) and a step's cost follows its tokens. Two regimes:
  - default: the tiny model at the default settings (16 prompts x 8) with 24-token completions (a 4-step trace);
  - long: 256-token completions, where generation takes a larger share.
Peak memory: on a GPU, torch.cuda.max_memory_allocated (tensor memory, exact); on the CPU, the process's peak
resident set minus its resident set just before the model is loaded. The CPU figure also counts the allocator's
fragmentation (freed activations are not reused exactly), so it overstates differences in live tensor memory.

Usage: python benchmarks/bench_bridge.py [--steps 6] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.md"
READING = """
## What limits the ratios (measured on the tiny model, CPU)

- A BRIDGE step does three forward+backward passes (SFT and RL on (theta, w), RL on the shadow) to an `rl` step's
  one, after the same generation. The ratio therefore depends on generation's share of an `rl` step (column
  above): with 128 sequences the 1M-parameter model's training passes outweigh its KV-cached sampling even at 256
  tokens, so the ratio stays near 2x; with 16 sequences of 256 tokens sequential decoding dominates, as in RL on
  real models, and the ratio falls toward 1.
- LoRA layers use the merged-weight forward on small models (`lora.forward=auto`, core/lora_forward.py): one
  linear with W + s B A instead of peft's five small operations per adapter, which had added ~45% to every
  training pass of the tiny model (0.49 s against 0.34 s for one pass with w; the previous results gave 2.3x and
  2.9x for the first two ratios). What remains above the floor is the SFT pass and sampling with merged adapters.
- Memory has two parts. The training state (weights, gradients, optimizer moments, the shadow) is exact on any
  device: `lower=full` doubles it (a second full copy and its optimizer), `lower=lora` adds only two adapters and
  their moments. Activations are the rest: CPU peak memory is a resident-set high-water mark that also counts
  allocator fragmentation from the extra passes, so it overstates BRIDGE's live tensors; run `make bench` on a
  GPU for torch.cuda.max_memory_allocated. The passes run one after another so only one branch's activations are
  alive at a time.
- `lower=lora`'s training state relative to `rl (lora)` falls as the base grows against the adapters: 1.7x on the
  tiny model (its rank-32 adapters are as large as the 1M-parameter base), 1.19x on the 100M random-init model,
  and, from parameter counts of the published shapes (built on the meta device), 1.16x for Qwen2.5-0.5B and 1.05x
  for Qwen2.5-7B at rank 32; Qwen2.5-0.5B comes to 1.10x at rank 16 and 1.07x at rank 8.
"""
COMMON = ["train.threads=2", "rl.prompts_per_step=16", "rl.num_generations=8"]
SHORT, LONG = ["rl.max_completion_length=24"], ["rl.max_completion_length=256"]
# 256-token completions for 16 sequences (and 16 SFT examples): sequential decoding outweighs the training passes,
# the regime of RL on real models, where generation takes most of a step.
GEN_BOUND = [*LONG, "rl.prompts_per_step=4", "rl.num_generations=4", "sft.batch_size=16"]
# A ~100M-parameter random-init model (no pretraining) where the base, not the adapters, dominates the state.
WIDE = ["model.hidden_size=1024", "model.num_layers=8", "model.num_heads=16", "model.pretrain.steps=0",
        "rl.prompts_per_step=2", "rl.num_generations=2", "rl.max_completion_length=8", "sft.batch_size=2"]
CONFIGS = {
    # name: overrides
    "rl (full)": ["recipe=rl", *SHORT],
    "rl (lora)": ["recipe=rl", "model.finetune=lora", "lora.rank=32", *SHORT],
    "bridge lower=full": ["recipe=bridge", "bridge.lower=full", *SHORT],
    "bridge lower=lora": ["recipe=bridge", "bridge.lower=lora", *SHORT],
    "rl (full), 256-token completions": ["recipe=rl", *LONG],
    "bridge lower=full, 256-token completions": ["recipe=bridge", *LONG],
    "rl (full), 256 tokens x 16 sequences": ["recipe=rl", *GEN_BOUND],
    "bridge lower=full, 256 tokens x 16 sequences": ["recipe=bridge", *GEN_BOUND],
    "rl (full), 100M model": ["recipe=rl", *WIDE],
    "rl (lora), 100M model": ["recipe=rl", "model.finetune=lora", "lora.rank=32", *WIDE],
    "bridge lower=full, 100M model": ["recipe=bridge", "bridge.lower=full", *WIDE],
    "bridge lower=lora, 100M model": ["recipe=bridge", "bridge.lower=lora", *WIDE],
}


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def training_state_mb(stage, policy) -> float:
    """What training keeps between steps, whatever the batch: weights, gradients, optimizer states, the BRIDGE
    shadow and any frozen reference. Exact on any device; this is where lower=lora saves a full copy."""
    import torch

    seen, total = set(), 0

    def add(tensor) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and tensor.numel() and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
            add(tensor.grad)

    def visit(obj, depth: int = 0) -> None:
        if depth > 3:
            return
        if isinstance(obj, torch.Tensor):
            add(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for value in state.values():
                    add(value)
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                visit(item, depth + 1)
        elif isinstance(obj, dict):
            for item in obj.values():
                visit(item, depth + 1)
        elif type(obj).__module__.startswith("bridgectl.stages"):
            visit(vars(obj), depth + 1)

    for module in (policy.model, policy.frozen_reference):
        if module is not None:
            for tensor in module.parameters():
                add(tensor)
    visit(vars(stage))
    return total / 2**20


# Published shapes of two models users post-train (config.json of Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-7B); the
# models are built on the meta device, so nothing is downloaded or allocated.
REAL_SHAPES = {
    "Qwen2.5-0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


def real_shape_state_ratio(shape: dict, theta_rank: int = 32, w_rank: int = 8) -> tuple[float, int, int]:
    """Training-state ratio bridge lower=lora / rl (lora) from parameter counts, with the bytes this code keeps:
    fp32 base weights (frozen: no gradient, no moments) and, per trainable adapter parameter, weight + gradient +
    two AdamW moments (16 bytes). rl trains one rank-32 adapter; BRIDGE trains theta, theta_hat (rank 32) and w
    (rank 8). Returns (ratio, base parameters, rank-32 adapter parameters)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with torch.device("meta"):
        model = get_peft_model(Qwen2ForCausalLM(Qwen2Config(**shape)), LoraConfig(r=theta_rank, target_modules=targets))
        model.add_adapter("w", LoraConfig(r=w_rank, target_modules=targets))
    counts = {"base": 0, "default": 0, "w": 0}
    for name, param in model.named_parameters():
        counts["w" if ".w." in name else "default" if "lora_" in name else "base"] += param.numel()
    rl = 4 * counts["base"] + 16 * counts["default"]
    bridge = 4 * counts["base"] + 16 * (2 * counts["default"] + counts["w"])
    return bridge / rl, counts["base"], counts["default"]


def measure(overrides: list[str], steps: int, warmup: int) -> dict:
    import torch

    from bridgectl.config import compose
    from bridgectl.runner import STAGES, build_context

    cfg = compose([*COMMON, *overrides])
    baseline = rss_mb()
    ctx = build_context(cfg, show_progress=False)
    kind = cfg.recipe.stages[0]
    stage = STAGES[kind](ctx, steps + warmup)  # built first: BRIDGE wraps the model in its adapters
    eos = ctx.policy.tokenizer.eos_token_id

    def suppress_eos(module, inputs, output):  # every completion runs to rl.max_completion_length
        if not torch.is_grad_enabled():  # sampling only: training passes score the sampled tokens as they are
            output[..., eos] = -1e9
        return output

    ctx.policy.model.get_output_embeddings().register_forward_hook(suppress_eos)
    for _ in range(warmup):
        stage.step()
    started = time.perf_counter()
    gen_tokens, gen_seconds = 0, 0.0
    for _ in range(steps):
        out = stage.step()
        gen_tokens += out.gen_tokens
        gen_seconds += out.gen_tokens / out.metrics["perf/gen_tokens_per_s"]
    seconds = (time.perf_counter() - started) / steps
    if ctx.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(ctx.device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    return {"step_s": seconds, "peak_mb": peak, "device": str(ctx.device),
            "state_mb": training_state_mb(stage, ctx.policy), "gen_tokens_per_step": gen_tokens / steps,
            "gen_share": gen_seconds / steps / seconds,
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(CONFIGS[args.child], args.steps, args.warmup)))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    results = {}
    for name in CONFIGS:
        console.print(f"measuring {name} ...")  # the 100M model is built once (random init) into the cache
        out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--warmup",
                              str(args.warmup)], capture_output=True, text=True, env={**os.environ}, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])

    def ratio(a, b, key):
        return results[a][key] / results[b][key]

    rows = [
        ("BRIDGE step / rl step, default tiny settings (lower=full vs rl full)",
         ratio("bridge lower=full", "rl (full)", "step_s"), "<= 2.0"),
        ("BRIDGE step / rl step, default tiny settings (lower=lora vs rl lora)",
         ratio("bridge lower=lora", "rl (lora)", "step_s"), "<= 2.0"),
        ("BRIDGE step / rl step, 256-token completions, 128 sequences (lower=full)",
         ratio("bridge lower=full, 256-token completions", "rl (full), 256-token completions", "step_s"), "<= 1.5"),
        ("BRIDGE step / rl step, 256-token completions, 16 sequences (lower=full)",
         ratio("bridge lower=full, 256 tokens x 16 sequences", "rl (full), 256 tokens x 16 sequences", "step_s"),
         "<= 1.5"),
        ("training state (weights, grads, optimizer, shadow), bridge lower=full / rl full",
         ratio("bridge lower=full", "rl (full)", "state_mb"), "(reported)"),
        ("training state, bridge lower=lora / rl lora", ratio("bridge lower=lora", "rl (lora)", "state_mb"), "<= 1.1"),
        ("training state, 100M model, bridge lower=full / rl full",
         ratio("bridge lower=full, 100M model", "rl (full), 100M model", "state_mb"), "(reported)"),
        ("training state, 100M model, bridge lower=lora / rl lora",
         ratio("bridge lower=lora, 100M model", "rl (lora), 100M model", "state_mb"), "<= 1.1"),
        *[(f"training state, {name} shapes (parameter counts), bridge lower=lora / rl lora",
           real_shape_state_ratio(shape)[0], "<= 1.1") for name, shape in REAL_SHAPES.items()],
        ("peak memory, bridge lower=full / rl full", ratio("bridge lower=full", "rl (full)", "peak_mb"), "(reported)"),
        ("peak memory, bridge lower=lora / rl lora", ratio("bridge lower=lora", "rl (lora)", "peak_mb"), "<= 1.1"),
        ("peak memory, bridge lower=lora / rl full", ratio("bridge lower=lora", "rl (full)", "peak_mb"), "(reported)"),
    ]
    table = Table(title="bridgectl benchmarks (ratios from one run)")
    for column in ("measure", "ratio", "target"):
        table.add_column(column)
    for label, value, target in rows:
        table.add_row(label, f"{value:.2f}", target)
    console.print(table)

    lines = ["# Benchmark results", "",
             f"Produced by `make bench` ({args.steps} timed steps after {args.warmup} warm-up steps per configuration, "
             f"each in its own process, {results['rl (full)']['torch_threads']} torch threads, device "
             f"{results['rl (full)']['device']}). Ratios from one run. Every completion is forced to the same length "
             "(EOS suppressed while sampling), so every configuration generates the same tokens.",
             "", "| measure | ratio | target |", "|---|---|---|"]
    lines += [f"| {label} | {value:.2f} | {target} |" for label, value, target in rows]
    lines += ["", "| configuration | s/step | generation share of the step | training state (MB) | peak memory (MB; "
              "CPU: over the pre-load baseline) | generated tokens/step |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['step_s']:.3f} | {r['gen_share']:.0%} | {r['state_mb']:.1f} | {r['peak_mb']:.0f} | "
              f"{r['gen_tokens_per_step']:.0f} |" for name, r in results.items()]
    RESULTS.write_text("\n".join(lines) + "\n" + READING)
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
