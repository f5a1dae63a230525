"""Time core/rollout.generate on a long-tailed batch with and without compaction (finished rows leaving the
decoding batch), and at other compaction thresholds (rollout._COMPACT_FRACTION: compact once at least that share of
the rows still in the batch have ended; inf = never, the old behaviour, as `model.generate` and TRL decode).

The model is a random Llama (--layers x --width, tied embeddings, --vocab entries of which only the tiny
tokenizer's 20 are ever sampled, so the output layer and the softmax cost what a bigger vocabulary costs). Every
row gets its own prompt (of its own length) and a forward hook fixes each row's completion length from it (EOS
forbidden before the row's last token, forced there). --tail long (reasoning completions): all but --long-rows
rows end after --short-length +-10 tokens, the long ones run to --max-new-tokens. --tail spread: the rows end one
after another, evenly through 1 ... --max-new-tokens (compaction's worst case: a row leaves at every few steps).
Rows are sampled in groups of --group with their own generators, as RL steps sample. Every setting samples the same
tokens (checked). Times are medians of --repeats interleaved rounds after a warm-up, wall clock and the process's
CPU time (steadier on a shared machine); "row-steps" counts the rows of every decoding forward pass, "compactions"
the times the batch shrank.

Usage: python benchmarks/decode_compaction.py [--tail long|spread] [--rows 64] [--long-rows 4]
           [--short-length 50] [--max-new-tokens 512] [--layers 4] [--width 256] [--vocab 8192] [--repeats 3]
           [--threads 1] [--fractions inf,0,0.125,0.25,0.5] [--rows-per-batch 0]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from bridgectl.core import rollout  # noqa: E402
from bridgectl.core.rollout import KV_CACHE, generate  # noqa: E402
from bridgectl.models.tiny import build_model, build_tokenizer  # noqa: E402


def length_hook(model, tokenizer, length_of: dict[int, int]):
    """Forces each row's completion length to length_of[prompt length in tokens]; counts decoding row-steps and
    how often the batch shrank (compactions). The prompt length and step are read off the attention mask (the
    sampler's mask is the chunk's prompt width plus one column per step), so the rule follows a row whichever
    rows around it have left the batch."""
    eos, n_tokens = tokenizer.eos_token_id, len(tokenizer)
    table = torch.zeros(max(length_of) + 1, dtype=torch.long)
    for prompt_length, length in length_of.items():
        table[prompt_length] = length
    counts = {"row_steps": 0, "compactions": 0, "last_rows": None}
    state = {}

    def hook(module, args, kwargs, output):
        mask = kwargs["attention_mask"]
        if kwargs.get(KV_CACHE) is None:  # a chunk's prefill
            state["prompt_width"] = mask.size(1)
            counts["last_rows"] = mask.size(0)
        else:
            counts["row_steps"] += mask.size(0)
            counts["compactions"] += mask.size(0) < counts["last_rows"]
            counts["last_rows"] = mask.size(0)
        step = mask.size(1) - state["prompt_width"]
        target = table[mask.sum(dim=1) - step]
        logits = output.logits[:, -1]
        logits[:, n_tokens:] = -math.inf  # only tokens the tokenizer can write back
        logits[:, eos] = torch.where(
            step >= target - 1, torch.full_like(logits[:, eos], 30.0), torch.full_like(logits[:, eos], -math.inf)
        )
        return output

    return model.register_forward_hook(hook, with_kwargs=True), counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--long-rows", type=int, default=4)
    parser.add_argument("--short-length", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fractions", default="inf,0,0.125,0.25,0.5")
    parser.add_argument("--rows-per-batch", type=int, default=0)
    parser.add_argument("--tail", choices=["long", "spread"], default="long")
    args = parser.parse_args()
    assert args.rows % args.group == 0

    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    model = build_model(
        SimpleNamespace(
            hidden_size=args.width,
            num_layers=args.layers,
            num_heads=args.width // 64,
            max_positions=args.max_new_tokens + 2 * args.rows + 8,
        ),
        args.vocab,
        seed=0,
    ).eval()

    # every row its own prompt, each a different length ("1+2*3*3...=": BOS + 4 + 2k tokens), so the hook can give
    # every row its own completion length; rows are shuffled (fixed permutation) so the long ones sit anywhere
    prompts = ["1+2" + "*3" * k + "=" for k in range(args.rows)]
    prompt_length = [len(tokenizer(p)["input_ids"]) for p in prompts]
    short = args.rows - args.long_rows
    if args.tail == "long":  # most rows end after short_length +-10 tokens, --long-rows run to the limit
        targets = [args.short_length - 10 + (20 * k) // max(1, short - 1) for k in range(short)]
        targets += [10**6] * args.long_rows
    else:  # "spread": rows end one after another, evenly through 1 ... max_new_tokens (compaction's worst case)
        targets = [1 + (args.max_new_tokens - 1) * k // (args.rows - 1) for k in range(args.rows)]
    length_of = dict(zip(prompt_length, targets))
    rows = [prompts[k] for k in sorted(range(args.rows), key=lambda k: (k * 7919) % args.rows)]
    handle, counts = length_hook(model, tokenizer, length_of)

    def run(fraction: float):
        rollout._COMPACT_FRACTION = fraction
        generators = [torch.Generator().manual_seed(1000 + g) for g in range(args.rows // args.group)]
        counts.update(row_steps=0, compactions=0)
        started, started_cpu = time.perf_counter(), time.process_time()
        result = generate(
            model,
            tokenizer,
            rows,
            args.max_new_tokens,
            temperature=1.0,
            group_generators=generators,
            rows_per_batch=args.rows_per_batch,
        )
        return (time.perf_counter() - started, time.process_time() - started_cpu), result, dict(counts)

    fractions = [float(f) for f in args.fractions.split(",")]
    reference = run(math.inf)[1]  # warm-up
    lengths = reference.lengths
    ended = lengths[lengths < args.max_new_tokens]
    print(
        f"{args.rows} rows ({args.group} per group), {args.layers} layers x {args.width}, vocab {args.vocab}, "
        f"{args.threads} threads, rows_per_batch {args.rows_per_batch}; completion lengths: {ended.numel()} rows "
        f"of {int(ended.min())}-{int(ended.max())} tokens, {int((lengths == args.max_new_tokens).sum())} rows of "
        f"{args.max_new_tokens}; {int(lengths.sum())} tokens in all"
    )
    times = {f: [] for f in fractions}
    stats = {}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits every setting alike
        for fraction in fractions:
            times[fraction].append((elapsed := run(fraction))[0])
            result, stats[fraction] = elapsed[1], elapsed[2]
            assert torch.equal(result.completion_ids, reference.completion_ids), fraction
            torch.testing.assert_close(result.sampling_logprobs, reference.sampling_logprobs, atol=1e-4, rtol=0)
    handle.remove()
    wall = {f: statistics.median(t[0] for t in times[f]) for f in fractions}
    cpu = {f: statistics.median(t[1] for t in times[f]) for f in fractions}
    print(
        f"{'compact at':>10} {'wall s':>8} {'cpu s':>8} {'tokens/s':>9} {'row-steps':>10} {'compactions':>11} "
        f"{'speedup (wall, cpu)':>20}"
    )
    for fraction in fractions:
        label = "never" if math.isinf(fraction) else f"{fraction:g}"
        speedup = (
            f"{wall[math.inf] / wall[fraction]:.2f}x, {cpu[math.inf] / cpu[fraction]:.2f}x" if math.inf in wall else "-"
        )
        print(
            f"{label:>10} {wall[fraction]:8.2f} {cpu[fraction]:8.2f} {float(lengths.sum()) / wall[fraction]:9.0f} "
            f"{stats[fraction]['row_steps']:>10} {stats[fraction]['compactions']:>11} {speedup:>20}"
        )


if __name__ == "__main__":
    main()
