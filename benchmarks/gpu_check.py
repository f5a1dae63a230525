"""`make gpu-check`: a ~0.5B-parameter model (Qwen2.5-0.5B's published shape, random weights: nothing is downloaded)
through `rl` and `bridge` steps with `model=hf`, on whatever device `train.device=auto` picks (bf16 on CUDA), and a
table of step time, rollout tokens/s and peak memory per recipe. Writes benchmarks/gpu_results.md.

Everything is built locally: a byte-level tokenizer whose vocabulary has the model's 151,936 entries (so every
sampled id decodes), the model saved with save_pretrained, and GSM8K-shaped jsonl files. With random weights the
completions are noise and every reward is 0, so GRPO's advantages are 0; the step still does all of its work
(sampling to the full completion length, since EOS is rare, and every forward and backward pass), which is what is
timed. The shapes are a real run's: hundreds of tokens per completion (384 by default), 64 rollouts and 16 SFT
examples per step, training passes in micro-batches of 8 rows with activation checkpointing (what `model=hf` sets),
so peak memory is what a user's step takes, not the whole batch's. Recipes run one after another in their own
processes until `--budget-s` (7 minutes by default) would be exceeded: the whole check stays under 8 minutes on one
GPU. `--shape tiny` runs the same pipeline on a 2-layer model in seconds (what CI-less machines can check).

With the vllm package installed (and a CUDA GPU), `rl` and `bridge lower=lora` also run with rollout.backend=vllm.

First, a decoding check (issue 30; `decode_check`, in a child process with a time limit): rollout tokens/s of the
built-in sampler (core/rollout.generate, what the rl steps use), of `model.generate`, and on CUDA of a static KV
cache step compiled with torch.compile(mode="reduce-overhead"), which runs it as CUDA graphs, compile time
included (first call) and not (second), at 64 rows x the completion length, greedy, every row to the full
length; and whether each gave the built-in sampler's tokens. It says whether a compiled decode step would pay on a
GPU, which no CPU measurement can.

Usage: python benchmarks/gpu_check.py [--steps 3] [--shape qwen2.5-0.5b|tiny] [--completion-length 384]
                                     [--micro-batch-size 8] [--budget-s 420] [--decode-limit-s 240]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "gpu_results.md"
SHAPES = {  # config.json of Qwen/Qwen2.5-0.5B; a tiny stand-in of the same architecture
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2048,
        tie_word_embeddings=True,
    ),
}
RECIPES = {  # name: overrides; LoRA rank 32 on every linear layer for both, as the memory figures of docs/benchmarks/index.md
    "rl (LoRA r32)": ["recipe=rl", "model.finetune=lora", "lora.rank=32"],
    "bridge lower=lora": ["recipe=bridge", "model.finetune=lora", "lora.rank=32"],
    "bridge lower=full": ["recipe=bridge", "bridge.lower=full"],
}
VLLM_RECIPES = {  # the same with rollouts from a colocated vLLM engine (rollout.backend=vllm), where vllm is installed
    "rl (LoRA r32), vLLM rollouts": [*RECIPES["rl (LoRA r32)"], "rollout.backend=vllm"],
    "bridge lower=lora, vLLM rollouts": [*RECIPES["bridge lower=lora"], "rollout.backend=vllm"],
}
ALL_RECIPES = {**RECIPES, **VLLM_RECIPES}
ROWS = [
    {
        "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
        "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
    }
    for a in range(1, 9)
    for b in range(1, 9)
]


def build_model(directory: Path, shape: dict) -> int:
    """Saves a random-init Qwen2 model of `shape` (bf16) and a tokenizer covering its vocabulary; returns the
    parameter count."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    # byte-level BPE as Qwen's, without merges: text is encoded byte by byte; the rest of the vocabulary is filler
    # tokens, so every id the model samples decodes
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokens = ["<pad>", "<s>", "</s>", *sorted(alphabet)]
    tokens += [f"w{index}" for index in range(len(tokens), shape["vocab_size"])]
    bpe = Tokenizer(models.BPE({token: index for index, token in enumerate(tokens)}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = Qwen2Config(**shape, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def run_recipe(name: str, model_dir: Path, data: Path, out: Path, args) -> dict:
    overrides = [
        *ALL_RECIPES[name],
        "model=hf",
        f"model.name_or_path={model_dir}",
        "task=gsm8k",
        f"task.path={data / 'train.jsonl'}",
        f"++task.eval_sets={{test:{data / 'test.jsonl'}}}",
        f"train.max_steps={args.steps}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "eval.n=8",
        "rl.prompts_per_step=8",
        "rl.num_generations=8",
        "sft.batch_size=16",
        f"rl.max_completion_length={args.completion_length}",
        f"eval.max_new_tokens={args.completion_length}",
        "train.threads=0",
        f"train.micro_batch_size={args.micro_batch_size}",
        "rollout.batch_size=64",
    ]
    run_name = name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "-")
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "bridgectl.cli.app", "run", *overrides, "--out", str(out), "--name", run_name],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / run_name / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "perf/step_s" in row][1:]  # the first step warms kernels and allocators up
    summary = json.loads((out / run_name / "summary.json").read_text())
    step_s = statistics.median(row["perf/step_s"] for row in steps)
    return {
        "step_s": step_s,
        # tokens that went through a training pass (completions and SFT targets) per second of the whole step
        "train_tokens_per_s": summary["train_tokens"] / summary["train_wall_s"],
        "gen_tokens_per_s": statistics.median(row["perf/gen_tokens_per_s"] for row in steps),
        "gen_tokens_per_step": statistics.median(row["train/response_len"] for row in steps) * 64,
        "peak_mb": summary["peak_mem_mb"],
        "wall_s": time.perf_counter() - started,
        "steps": len(steps),
        "logprob_gap": statistics.median(row["rollout/logprob_gap"] for row in steps)
        if "rollout/logprob_gap" in steps[0]
        else None,
    }


def decode_child(model_dir: str, rows: int, new_tokens: int) -> None:
    """Prints decode_check's measurements as one JSON line (run in a child process: a hung compilation is cut off
    by the parent's time limit, and its memory goes with the process)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_decode import static_cache_step, static_decode  # benchmarks/bench_decode.py

    from bridgectl.core.rollout import generate

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    model = model.to(device).eval()
    prompts = [row["question"] for row in ROWS[:rows]]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    result = {"rows": len(prompts), "new_tokens": new_tokens, "device": str(device)}

    def timed(name, fn):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        result[name] = len(prompts) * new_tokens / (time.perf_counter() - started)  # tokens/s
        return out

    never = [-1]  # no row ends: every variant decodes the same number of tokens
    generate(model, tokenizer, prompts[:2], 4, greedy=True, end_ids=never)  # kernels and allocator warmed up
    reference = timed(
        "built-in sampler",
        lambda: generate(model, tokenizer, prompts, new_tokens, greedy=True, end_ids=never).completion_ids,
    )
    with torch.no_grad():
        out = timed(
            "model.generate",
            lambda: model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            ),
        )
    result["model.generate same tokens"] = bool(torch.equal(out[:, ids.size(1) :], reference))
    if cuda:
        step, cache = static_cache_step(model, len(prompts), ids.size(1) + new_tokens)
        compiled = torch.compile(step, mode="reduce-overhead", dynamic=False)
        first = timed("CUDA graphs, first call", lambda: static_decode(model, ids, mask, new_tokens, compiled, cache))
        timed("CUDA graphs, second call", lambda: static_decode(model, ids, mask, new_tokens, compiled, cache))
        result["CUDA graphs same tokens"] = bool(torch.equal(first, reference))
    print(json.dumps(result), flush=True)


def decode_check(model_dir: Path, rows: int, new_tokens: int, limit_s: float) -> tuple[list[str], float]:
    """decode_child's measurements as markdown lines, and the seconds it took (an error or the time limit is
    reported in the lines, not raised: the recipes still run)."""
    started = time.perf_counter()
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--decode-child", str(model_dir), str(rows), str(new_tokens)],
            capture_output=True,
            text=True,
            timeout=limit_s,
            env=os.environ.copy(),
        )
    except subprocess.TimeoutExpired:
        return [f"Decoding check: cut off at its limit of {limit_s:.0f} s."], time.perf_counter() - started
    if out.returncode != 0:
        return [
            f"Decoding check failed (exit status {out.returncode}):",
            "",
            "```",
            *out.stderr.strip().splitlines()[-15:],
            "```",
        ], time.perf_counter() - started
    result = json.loads(out.stdout.strip().splitlines()[-1])
    base = result["model.generate"]
    lines = [
        f"Decoding ({result['rows']} rows x {result['new_tokens']} tokens, greedy, every row to the full "
        f"length, on {result['device']}; one run each):",
        "",
        "| decoding | tokens/s | / model.generate | same tokens as the built-in sampler |",
        "|---|---|---|---|",
    ]
    for name in ("built-in sampler", "model.generate", "CUDA graphs, first call", "CUDA graphs, second call"):
        if name in result:
            same = {
                "model.generate": result["model.generate same tokens"],
                "CUDA graphs, first call": result.get("CUDA graphs same tokens"),
            }.get(name, "")
            lines.append(f"| {name} | {result[name]:.0f} | {result[name] / base:.2f}x | {same} |")
    if "CUDA graphs, first call" not in result:
        lines += ["", "The compiled (CUDA graphs) step runs on CUDA only."]
    return lines, time.perf_counter() - started


def default_recipes() -> list[str]:
    """Every recipe, with the vLLM ones where vLLM can run (a CUDA GPU and the vllm package)."""
    import importlib.util

    import torch

    with_vllm = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
    return list(ALL_RECIPES) if with_vllm else list(RECIPES)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--completion-length", type=int, default=384)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="start no further recipe once this many seconds have passed, or would by its end",
    )
    parser.add_argument("--recipes", nargs="*", default=None, choices=list(ALL_RECIPES))
    parser.add_argument(
        "--decode-limit-s",
        type=float,
        default=240.0,
        help="time limit of the decoding check, which runs first and counts toward --budget-s",
    )
    parser.add_argument("--decode-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.decode_child:
        decode_child(args.decode_child[0], int(args.decode_child[1]), int(args.decode_child[2]))
        return ""
    args.recipes = args.recipes or default_recipes()

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no GPU)"
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = scratch / "data"
        data.mkdir()
        (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS[8:]))
        (data / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS[:8]))
        parameters = build_model(scratch / "model", SHAPES[args.shape])
        print(f"{args.shape}: {parameters / 1e6:.1f}M parameters, random init, bf16 weights; device {device}")
        results, started, skipped = {}, time.perf_counter(), []
        print("decoding check ...", flush=True)
        decode_lines, decode_s = decode_check(scratch / "model", 64, args.completion_length, args.decode_limit_s)
        print("\n".join(decode_lines), flush=True)
        for name in args.recipes:
            elapsed = time.perf_counter() - started
            slowest = max((r["wall_s"] for r in results.values()), default=0.0)
            if elapsed + 1.5 * slowest > args.budget_s:  # BRIDGE takes up to ~1.5x an rl run's time
                skipped.append(name)
                continue
            print(f"running {name} ({args.steps} steps) ...", flush=True)
            results[name] = run_recipe(name, scratch / "model", data, scratch / "runs", args)
            print(json.dumps(results[name]), flush=True)

    lines = [
        "# GPU check",
        "",
        f"Produced by `make gpu-check` on {device}: {args.shape} shape ({parameters / 1e6:.1f}M parameters, "
        f"random init), `model=hf`, dtype auto (bf16 on CUDA), 8 prompts x 8 samples, completions of "
        f"{args.completion_length} tokens (EOS is rare with random weights), 16 SFT examples, training passes "
        f"in micro-batches of {args.micro_batch_size} rows with activation checkpointing; medians over "
        f"{args.steps - 1} steps after the first; {time.perf_counter() - started:.0f} s in all.",
        "",
        "| recipe | s/step | rollout tokens/s | trained tokens/s | generated tokens/step | peak memory (MB) "
        "| vLLM log-prob gap |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {r['step_s']:.2f} | {r['gen_tokens_per_s']:.0f} | {r['train_tokens_per_s']:.0f} | "
        f"{r['gen_tokens_per_step']:.0f} | {r['peak_mb']:.0f} | "
        f"{'' if r['logprob_gap'] is None else format(r['logprob_gap'], '.4f')} |"
        for name, r in results.items()
    ]
    if skipped:
        lines += ["", f"Not run within --budget-s {args.budget_s:.0f}: {', '.join(skipped)}."]
    lines += ["", *decode_lines, "", f"(The decoding check took {decode_s:.0f} s, before the recipes.)"]
    if any(name in VLLM_RECIPES for name in results):
        lines += [
            "",
            "Peak memory is PyTorch's allocator peak: with vLLM rollouts the engine's reserved share "
            "(rollout.gpu_memory_utilization) is not all in it. The log-prob gap is the mean absolute "
            "difference per sampled token between vLLM's and the trained model's log-probs.",
        ]
    if "rl (LoRA r32)" in results:
        base = results["rl (LoRA r32)"]
        lines += ["", "| ratio against rl (LoRA r32) | step time | peak memory |", "|---|---|---|"]
        lines += [
            f"| {name} | {r['step_s'] / base['step_s']:.2f} | {r['peak_mb'] / base['peak_mb']:.2f} |"
            for name, r in results.items()
            if name != "rl (LoRA r32)"
        ]
    text = "\n".join(lines) + "\n"
    if args.shape == "qwen2.5-0.5b":
        RESULTS.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
