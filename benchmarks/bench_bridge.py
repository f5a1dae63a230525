"""`make bench`: the cost of a BRIDGE step against an `rl` step, and peak memory of bridge.lower=full|lora against
`rl`, as ratios from one run (absolute times drift on shared machines; ratios hold). Writes benchmarks/results.md.

Each configuration runs in its own process (so peak memory is its own): build the run's context exactly as
`bridgectl run` does, take `--warmup` steps, then time `--steps` steps of the stage. Every completion is forced to
the same length (EOS suppressed while sampling), because the recipes' policies write different lengths after a
few steps (BRIDGE's SFT term switches to traces at once) and a step's cost follows its tokens. Two regimes:
  - default: the tiny model at the default settings (16 prompts x 8) with 24-token completions (a 4-step trace);
  - long: 256-token completions, where generation takes a larger share.
Peak memory is tensor memory, the quantity torch.cuda.max_memory_allocated gives on a GPU (used there). On the
CPU it is counted exactly from the allocator's own records: one more step runs under torch.profiler with
profile_memory, every allocation and free it reports is summed in time order, and the highest point is added to
what was alive when that step began (the training state, with gradients cleared first so none is counted twice).
The process's resident-set peak is reported alongside; it also counts the allocator's fragmentation and freed
pages not yet returned, so it overstates differences in live tensors.
The default-settings time ratios come from one process holding the four stages (rl full, rl lora, BRIDGE
lower=full, lower=lora) and timing their steps in interleaved rounds, medians taken: drifting machine load then
hits every configuration alike (separate processes run minutes apart scattered the ratio by +-10%).

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

from sections import owned_sections  # benchmarks/sections.py

RESULTS = Path(__file__).resolve().parent / "results.md"
READING = """
## What limits the ratios (measured on the tiny model, CPU)

- Against TRL: both take the same work per GRPO step here (sample 128 completions, score them, one forward and
  backward pass of the LoRA model; no KL, one update per generation, TRL without gradient checkpointing), and
  neither wastes much of it: bridgectl's sampler is about as fast as `model.generate` (row above), and its training
  pass uses the merged-weight LoRA forward. So bridgectl takes 0.8-0.9x TRL's time per step, not the 0.5x
  target: halving it would need TRL to do twice the work, which it does not at these settings (TRL's default
  turns gradient checkpointing on, which recomputes activations; it is off here so both do the same work). Where
  the time goes in an `rl` step: generation (column "generation share") and one forward+backward pass.
- Rollouts: `core/rollout.generate` keeps a KV cache, stops when every row has ended, skips the forward pass after
  the last token, and records the sampling log-probs on the way (so no extra pass computes "old" log-probs); 94%
  of its time is the model's own forward calls (cProfile), the same calls `model.generate` makes.
- A BRIDGE step does three forward+backward passes (SFT and RL on (theta, w), RL on the shadow) to an `rl` step's
  one, after the same generation. Timed one by one on the tiny model (lower=full, medians of 4): generation 0.23 s,
  the SFT pass 0.16 s (64 examples), the joint RL pass 0.27 s, the shadow's RL pass 0.28 s; so the floor at the
  default settings is (0.23 + 0.16 + 0.27 + 0.28) / (0.23 + 0.27) = 1.9x before optimizer steps, and the measured
  ratio sits at 1.8-2.1x (interleaved medians of 9 rounds, eight runs: 1.96-2.13 for lower=full, median 2.00;
  1.82-2.01 for lower=lora, median 1.96). One forward over the SFT and RL rows together (what `mix` does) was slower
  here (0.50 s against 0.44 s: padding, and logits for every position), and would keep both graphs alive. The ratio
  falls as generation takes more of the step (column above): with 16 sequences of 256 tokens, where decoding is
  73-77% of an `rl` step as in RL on real models, 1.25-1.4x; with 128 sequences of 256 tokens the 1M-parameter
  model's training passes still outweigh its KV-cached sampling, and the ratio stays at 1.5-1.7x (generation
  55% of an `rl` step there).
- LoRA layers use the merged-weight forward on small models (`lora.forward=auto`, core/lora_forward.py): one
  linear with W + s B A instead of peft's five small operations per adapter, which had added ~45% to every
  training pass of the tiny model (0.49 s against 0.34 s for one pass with w; before it, the first two BRIDGE
  ratios were 2.3x and 2.9x). What remains above the floor is the SFT pass and sampling with merged adapters.
- Memory has two parts. The training state (weights, gradients, optimizer moments, the shadow) is exact on any
  device: `lower=full` doubles it (a second full copy and its optimizer), `lower=lora` adds only two adapters and
  their moments. Activations are the rest, and the passes run one after another so only one branch's activations
  are alive at a time. Peak tensor memory (the CPU counterpart of torch.cuda.max_memory_allocated, from the
  allocator's records) shows it: `lower=lora` peaks at 1.03x `rl (lora)` at the default settings, `lower=full` at
  1.08x `rl (full)`, 1.01x with 256-token completions. Where the batch is so small that the training state is
  most of the peak (the 100M model with 4 sequences of 8 tokens) the ratio is the state's, 1.18x; with 16
  sequences of 64 tokens on the same model it is 1.08x. The resident-set peak (1.5x) also counts the allocator's
  fragmentation and pages not yet returned to the system, not live tensors.
- `lower=lora`'s training state relative to `rl (lora)` falls as the base grows against the adapters: 1.6x on the
  tiny model (its rank-32 adapters are as large as the 1M-parameter base), 1.15x on the 100M random-init model,
  and, from parameter counts of the published shapes (built on the meta device), 1.16x for Qwen2.5-0.5B and 1.05x
  for Qwen2.5-7B at rank 32; Qwen2.5-0.5B comes to 1.10x at rank 16 and 1.07x at rank 8.
"""
COMMON = ["train.threads=2", "rl.prompts_per_step=16", "rl.num_generations=8"]
SHORT, LONG = ["rl.max_completion_length=24"], ["rl.max_completion_length=256"]
# 256-token completions for 16 sequences (and 16 SFT examples): sequential decoding outweighs the training passes,
# the regime of RL on real models, where generation takes most of a step.
GEN_BOUND = [*LONG, "rl.prompts_per_step=4", "rl.num_generations=4", "sft.batch_size=16"]
# A ~100M-parameter random-init model (no pretraining) where the base, not the adapters, dominates the state.
WIDE = [
    "model.hidden_size=1024",
    "model.num_layers=8",
    "model.num_heads=16",
    "model.pretrain.steps=0",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "rl.max_completion_length=8",
    "sft.batch_size=2",
]
# The same model with a batch whose activations count as they do in real RL (16 sequences x 64 tokens, 16 SFT
# examples): peak memory there, not only the training state.
WIDE_BATCH = [
    *WIDE,
    "rl.prompts_per_step=4",
    "rl.num_generations=4",
    "rl.max_completion_length=64",
    "sft.batch_size=16",
]
CONFIGS = {
    # name: overrides; LoRA configurations at rank 32 for both recipes, as the recorded figures were measured
    "rl (full)": ["recipe=rl", *SHORT],
    "rl (lora)": ["recipe=rl", "model.finetune=lora", "lora.rank=32", *SHORT],
    "bridge lower=full": ["recipe=bridge", "bridge.lower=full", *SHORT],
    "bridge lower=lora": ["recipe=bridge", "model.finetune=lora", "lora.rank=32", *SHORT],
    "rl (full), 256-token completions": ["recipe=rl", *LONG],
    "bridge lower=full, 256-token completions": ["recipe=bridge", *LONG],
    "rl (full), 256 tokens x 16 sequences": ["recipe=rl", *GEN_BOUND],
    "bridge lower=full, 256 tokens x 16 sequences": ["recipe=bridge", *GEN_BOUND],
    "rl (lora rank 8, TRL's settings)": None,  # filled in below, after TRL_SETTINGS
    "rl (full), 100M model": ["recipe=rl", *WIDE],
    "rl (lora), 100M model": ["recipe=rl", "model.finetune=lora", "lora.rank=32", *WIDE],
    "bridge lower=full, 100M model": ["recipe=bridge", "bridge.lower=full", *WIDE],
    "bridge lower=lora, 100M model": ["recipe=bridge", "model.finetune=lora", "lora.rank=32", *WIDE],
    "rl (lora), 100M model, 16 x 64 tokens": ["recipe=rl", "model.finetune=lora", "lora.rank=32", *WIDE_BATCH],
    "bridge lower=lora, 100M model, 16 x 64 tokens": [
        "recipe=bridge",
        "model.finetune=lora",
        "lora.rank=32",
        *WIDE_BATCH,
    ],
}
# Configurations measured for memory only: one timed step is enough.
MEMORY_ONLY = {"rl (lora), 100M model, 16 x 64 tokens", "bridge lower=lora, 100M model, 16 x 64 tokens"}


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
    "Qwen2.5-0.5B": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "Qwen2.5-7B": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
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


def peak_tensor_mb_of_step(stage, policy) -> float:
    """Peak tensor memory (MB) during one `stage.step()`, on the CPU: the training state alive at its start plus
    the highest running sum of the allocations and frees torch's CPU allocator reports to the profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for param in policy.model.parameters():  # a stage clears gradients first thing; clear them before counting
        param.grad = None
    for value in vars(stage).values():
        if isinstance(value, dict):
            for tensor in value.values():
                if isinstance(tensor, torch.Tensor):
                    tensor.grad = None
    alive_at_start = training_state_mb(stage, policy)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        stage.step()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = highest = 0
    for _, nbytes in events:
        live += nbytes
        highest = max(highest, live)
    return alive_at_start + highest / 2**20


def with_forced_length(ctx):
    """Every completion runs to rl.max_completion_length (EOS suppressed while sampling); returns the hook's
    handle."""
    import torch

    eos = ctx.policy.tokenizer.eos_token_id

    def suppress_eos(module, inputs, output):
        if not torch.is_grad_enabled():  # sampling only: training passes score the sampled tokens as they are
            output[..., eos] = -1e9
        return output

    return ctx.policy.model.get_output_embeddings().register_forward_hook(suppress_eos)


def measure(overrides: list[str], steps: int, warmup: int) -> dict:
    import torch

    from bridgectl.config.compose import compose
    from bridgectl.stages import build_stage
    from bridgectl.training.setup import build_context

    cfg = compose([*COMMON, *overrides])
    baseline = rss_mb()
    ctx = build_context(cfg, show_progress=False)
    kind = cfg.recipe.stages[0]
    stage = build_stage(kind, ctx, steps + warmup + 1)  # built first: BRIDGE wraps the model in its adapters
    with_forced_length(ctx)
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
        peak, peak_rss = torch.cuda.max_memory_allocated(ctx.device) / 2**20, float("nan")
    else:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
        peak = peak_tensor_mb_of_step(stage, ctx.policy)
    return {
        "step_s": seconds,
        "peak_mb": peak,
        "peak_rss_mb": peak_rss,
        "device": str(ctx.device),
        "state_mb": training_state_mb(stage, ctx.policy),
        "gen_tokens_per_step": gen_tokens / steps,
        "gen_share": gen_seconds / steps / seconds,
        "torch_threads": torch.get_num_threads(),
    }


INTERLEAVED = ["rl (full)", "rl (lora)", "bridge lower=full", "bridge lower=lora"]


def measure_interleaved(rounds: int, warmup: int) -> dict:
    """Seconds per step (median of `rounds`) of the INTERLEAVED configurations, built in one process and stepped in
    turn, round after round."""
    from bridgectl.config.compose import compose
    from bridgectl.stages import build_stage
    from bridgectl.training.setup import build_context

    stages = {}
    for name in INTERLEAVED:
        cfg = compose([*COMMON, *CONFIGS[name]])
        ctx = build_context(cfg, show_progress=False)
        stages[name] = build_stage(cfg.recipe.stages[0], ctx, rounds + warmup)
        with_forced_length(ctx)
        for _ in range(warmup):
            stages[name].step()
    seconds = {name: [] for name in stages}
    for _ in range(rounds):
        for name, stage in stages.items():
            started = time.perf_counter()
            stage.step()
            seconds[name].append(time.perf_counter() - started)
    return {name: sorted(times)[len(times) // 2] for name, times in seconds.items()}


# ---- against TRL's GRPOTrainer and a plain model.generate loop (benchmark-only: pip install 'bridgectl[bench]') ----
TRL_SETTINGS = ["recipe=rl", "model.finetune=lora", "lora.rank=8", "lora.alpha=16", *SHORT]
CONFIGS["rl (lora rank 8, TRL's settings)"] = TRL_SETTINGS


def measure_trl(steps: int, warmup: int) -> dict:
    """Seconds per GRPO step of TRL's GRPOTrainer on the same tiny model, prompts, group size, completion length
    (forced to the full length with min_new_tokens, as bridgectl's EOS suppression does), LoRA config (rank 8, alpha
    16, every linear layer), learning rate and token-level loss; no KL, no gradient checkpointing, one update per
    generation, 2 threads."""
    import time as clock

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from bridgectl.config.compose import compose
    from bridgectl.models import tiny
    from bridgectl.tasks.arith import ArithTask

    cfg = compose([*COMMON, *TRL_SETTINGS])
    torch.set_num_threads(cfg.train.threads)
    path = tiny.base_model_dir(cfg.model, cfg.task, show_progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    task = ArithTask(cfg.task)
    stream = task.rl_prompts(0)
    problems = [next(stream) for _ in range((steps + warmup) * cfg.rl.prompts_per_step)]
    dataset = Dataset.from_dict({"prompt": [p.question for p in problems], "answer": [p.answer for p in problems]})

    def reward(completions, answer, **_):
        return task.rewards(completions, answer)

    rows = cfg.rl.prompts_per_step * cfg.rl.num_generations
    args = GRPOConfig(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "bridgectl-bench-trl"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=1,
        num_generations=cfg.rl.num_generations,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=cfg.rl.max_completion_length,
        generation_kwargs={"min_new_tokens": cfg.rl.max_completion_length},
        temperature=cfg.rl.temperature,
        learning_rate=cfg.rl.lr,
        lr_scheduler_type="constant",
        beta=0.0,
        loss_type="dapo",
        epsilon=cfg.rl.epsilon,
        max_grad_norm=cfg.optim.max_grad_norm,
        gradient_checkpointing=False,
        max_steps=steps + warmup,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
    )
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = clock.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(clock.perf_counter() - self.started)

    trainer.add_callback(Timer())
    trainer.train()
    timed = times[warmup:]
    return {"step_s": sum(timed) / len(timed), "steps": len(timed)}


def measure_generation(steps: int) -> dict:
    """Rollout tokens/s of bridgectl's sampler (core/rollout.generate: KV cache, stops when every row has ended,
    log-probs recorded on the way, one generator per prompt group) against transformers' model.generate on the
    same batch (16 prompts x 8),
    length forced to 24 new tokens on both sides, temperature 1, 2 threads."""
    import time as clock

    import torch

    from bridgectl.config.compose import compose
    from bridgectl.core.grpo import group_seeds
    from bridgectl.core.rollout import generate
    from bridgectl.training.setup import build_context

    cfg = compose([*COMMON, "recipe=rl", *SHORT])
    ctx = build_context(cfg, show_progress=False)
    model, tokenizer = ctx.policy.model.eval(), ctx.policy.tokenizer
    length = cfg.rl.max_completion_length
    stream = ctx.task.rl_prompts(0)
    prompts = [
        p.question
        for p in (next(stream) for _ in range(cfg.rl.prompts_per_step))
        for _ in range(cfg.rl.num_generations)
    ]

    hook = with_forced_length(ctx)

    def ours():  # as RL steps sample: one seeded generator per prompt group (core/grpo.sample_groups)
        generators = [torch.Generator().manual_seed(seed) for seed in group_seeds(ctx, cfg.rl.prompts_per_step)]
        return int(
            generate(model, tokenizer, prompts, length, temperature=1.0, group_generators=generators).lengths.sum()
        )

    def plain():
        encoded = tokenizer(prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **encoded,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=length,
                min_new_tokens=length,
                pad_token_id=tokenizer.pad_token_id,
            )
        return int((out[:, encoded["input_ids"].size(1) :] != tokenizer.pad_token_id).sum())

    samplers = {"bridgectl": ours, "model.generate": plain}
    seconds = {name: [] for name in samplers}
    tokens = {}
    for sampler in samplers.values():
        sampler()  # warm-up
    for _ in range(steps):  # interleaved, so drifting machine load hits both alike; median of the rounds
        for name, sampler in samplers.items():
            started = clock.perf_counter()
            tokens[name] = sampler()
            seconds[name].append(clock.perf_counter() - started)
    result = {name: tokens[name] / sorted(times)[len(times) // 2] for name, times in seconds.items()}
    hook.remove()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "trl":
        print(json.dumps(measure_trl(args.steps, args.warmup)))
        return
    if args.child == "interleaved":
        print(json.dumps(measure_interleaved(args.steps, args.warmup)))
        return
    if args.child == "generate":
        print(json.dumps(measure_generation(args.steps)))
        return
    if args.child:
        print(json.dumps(measure(CONFIGS[args.child], args.steps, args.warmup)))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    results = {}
    for name in CONFIGS:
        console.print(f"measuring {name} ...")  # the 100M model is built once (random init) into the cache
        steps = 1 if name in MEMORY_ONLY else args.steps
        out = subprocess.run(
            [sys.executable, __file__, "--child", name, "--steps", str(steps), "--warmup", str(args.warmup)],
            capture_output=True,
            text=True,
            env={**os.environ},
            check=True,
        )
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    rounds = 2 * args.steps + 1
    console.print(f"measuring rl and BRIDGE at the default settings, {rounds} interleaved rounds ...")
    out = subprocess.run(
        [sys.executable, __file__, "--child", "interleaved", "--steps", str(rounds), "--warmup", str(args.warmup)],
        capture_output=True,
        text=True,
        env={**os.environ},
        check=True,
    )
    interleaved = json.loads(out.stdout.strip().splitlines()[-1])
    console.print("measuring rollout generation against model.generate ...")
    out = subprocess.run(
        [sys.executable, __file__, "--child", "generate", "--steps", str(2 * args.steps + 1)],
        capture_output=True,
        text=True,
        env={**os.environ},
        check=True,
    )
    generation = json.loads(out.stdout.strip().splitlines()[-1])
    trl = None
    try:
        import trl as _trl  # noqa: F401  (benchmark-only dependency)

        console.print("measuring TRL's GRPOTrainer ...")
        out = subprocess.run(
            [sys.executable, __file__, "--child", "trl", "--steps", str(args.steps), "--warmup", str(args.warmup)],
            capture_output=True,
            text=True,
            env={**os.environ},
            check=True,
        )
        trl = json.loads(out.stdout.strip().splitlines()[-1])
    except ImportError:
        console.print("TRL is not installed: pip install 'bridgectl[bench]' for the comparison with GRPOTrainer")

    def ratio(a, b, key):
        return results[a][key] / results[b][key]

    rows = [
        (
            "rl step / TRL GRPOTrainer step (same model, prompts, 16x8, 24 tokens, LoRA r8, lr; CPU)",
            results["rl (lora rank 8, TRL's settings)"]["step_s"] / trl["step_s"] if trl else float("nan"),
            "<= 0.5",
        ),
        (
            "rollout tokens/s, bridgectl sampler / model.generate (same batch, 24 tokens)",
            generation["bridgectl"] / generation["model.generate"],
            ">= 1.0",
        ),
        (
            "BRIDGE step / rl step, default tiny settings (lower=full vs rl full; interleaved, medians)",
            interleaved["bridge lower=full"] / interleaved["rl (full)"],
            "<= 2.0",
        ),
        (
            "BRIDGE step / rl step, default tiny settings (lower=lora vs rl lora; interleaved, medians)",
            interleaved["bridge lower=lora"] / interleaved["rl (lora)"],
            "<= 2.0",
        ),
        (
            "BRIDGE step / rl step, 256-token completions, 128 sequences (lower=full)",
            ratio("bridge lower=full, 256-token completions", "rl (full), 256-token completions", "step_s"),
            "<= 1.5",
        ),
        (
            "BRIDGE step / rl step, 256-token completions, 16 sequences (lower=full)",
            ratio("bridge lower=full, 256 tokens x 16 sequences", "rl (full), 256 tokens x 16 sequences", "step_s"),
            "<= 1.5",
        ),
        (
            "training state (weights, grads, optimizer, shadow), bridge lower=full / rl full",
            ratio("bridge lower=full", "rl (full)", "state_mb"),
            "(reported)",
        ),
        ("training state, bridge lower=lora / rl lora", ratio("bridge lower=lora", "rl (lora)", "state_mb"), "<= 1.1"),
        (
            "training state, 100M model, bridge lower=full / rl full",
            ratio("bridge lower=full, 100M model", "rl (full), 100M model", "state_mb"),
            "(reported)",
        ),
        (
            "training state, 100M model, bridge lower=lora / rl lora",
            ratio("bridge lower=lora, 100M model", "rl (lora), 100M model", "state_mb"),
            "<= 1.1",
        ),
        *[
            (
                f"training state, {name} shapes (parameter counts), bridge lower=lora / rl lora",
                real_shape_state_ratio(shape)[0],
                "<= 1.1",
            )
            for name, shape in REAL_SHAPES.items()
        ],
        (
            "peak tensor memory, bridge lower=full / rl full",
            ratio("bridge lower=full", "rl (full)", "peak_mb"),
            "(reported)",
        ),
        (
            "peak tensor memory, bridge lower=lora / rl lora",
            ratio("bridge lower=lora", "rl (lora)", "peak_mb"),
            "<= 1.1",
        ),
        (
            "peak tensor memory, bridge lower=lora / rl full",
            ratio("bridge lower=lora", "rl (full)", "peak_mb"),
            "(reported)",
        ),
        (
            "peak tensor memory, 256-token completions, bridge lower=full / rl full",
            ratio("bridge lower=full, 256-token completions", "rl (full), 256-token completions", "peak_mb"),
            "(reported)",
        ),
        (
            "peak tensor memory, 100M model, 4 sequences x 8 tokens, bridge lower=lora / rl lora",
            ratio("bridge lower=lora, 100M model", "rl (lora), 100M model", "peak_mb"),
            "<= 1.1",
        ),
        (
            "peak tensor memory, 100M model, 16 sequences x 64 tokens, bridge lower=lora / rl lora",
            ratio("bridge lower=lora, 100M model, 16 x 64 tokens", "rl (lora), 100M model, 16 x 64 tokens", "peak_mb"),
            "<= 1.1",
        ),
        (
            "peak resident set (CPU, counts fragmentation), bridge lower=lora / rl lora",
            ratio("bridge lower=lora", "rl (lora)", "peak_rss_mb"),
            "(reported)",
        ),
    ]
    table = Table(title="bridgectl benchmarks (ratios from one run)")
    for column in ("measure", "ratio", "target"):
        table.add_column(column)
    for label, value, target in rows:
        table.add_row(label, f"{value:.2f}", target)
    console.print(table)

    lines = [
        "# Benchmark results",
        "",
        f"Produced by `make bench` ({args.steps} timed steps after {args.warmup} warm-up steps per configuration, "
        f"each in its own process, {results['rl (full)']['torch_threads']} torch threads, device "
        f"{results['rl (full)']['device']}). Ratios from one run. Every completion is forced to the same length "
        "(EOS suppressed while sampling), so every configuration generates the same tokens.",
        "",
        "| measure | ratio | target |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {value:.2f} | {target} |" for label, value, target in rows]
    lines += [
        "",
        "| configuration | s/step (own process) | generation share of the step | training state (MB) | "
        "peak tensor memory (MB) | peak resident set (MB over the pre-load baseline) | generated tokens/step |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {r['step_s']:.3f} | {r['gen_share']:.0%} | {r['state_mb']:.1f} | {r['peak_mb']:.0f} | "
        f"{r['peak_rss_mb']:.0f} | {r['gen_tokens_per_step']:.0f} |"
        for name, r in results.items()
    ]
    lines += [
        "",
        "Interleaved in one process (median s/step of "
        + str(rounds)
        + " rounds): "
        + ", ".join(f"{name} {seconds:.3f}" for name, seconds in interleaved.items())
        + ".",
    ]
    lines += [
        "",
        f"TRL GRPOTrainer: {trl['step_s']:.3f} s/step ({trl['steps']} timed steps)."
        if trl
        else "TRL GRPOTrainer: not measured (TRL not installed).",
        f"Rollout generation: bridgectl {generation['bridgectl']:.0f} tokens/s, model.generate "
        f"{generation['model.generate']:.0f} tokens/s (median of {2 * args.steps + 1} interleaved rounds).",
    ]
    kept = owned_sections(RESULTS)  # the sections bench_scale.py and bench_trl_natural.py write
    RESULTS.write_text("\n".join(lines) + "\n" + READING + ("\n" + kept if kept else ""))
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
