"""Where an `rl` or BRIDGE step's time goes on a real model: sampling, each RL pass (BRIDGE: joint, then shadow)
and the SFT pass, timed around the core functions the stage calls, for 3 steps of one recipe in this process.

Usage: python benchmarks/bridge_passes.py rl|bridge MODEL_DIR [experiment=NAME] [overrides...]
  MODEL_DIR  SmolLM2-135M-Instruct's directory (benchmarks/smollm2_dir.py writes it)
  experiment=smollm2-wordmath (default: the real-model study's settings) or smollm2-gsm8k (the laptop run's; its
  GSM8K-format problems are written to a temporary file by bench_trl_natural.write_problems unless task.path is
  given). Prints one line per step; docs/benchmarks/index.md's "BRIDGE's step at the real-model settings" is its output.
"""

from __future__ import annotations

import collections
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    import bridgectl.stages.bridge as bridge_stage
    import bridgectl.stages.rl as rl_stage
    from bridgectl.config.compose import compose
    from bridgectl.training.setup import build_context

    recipe, model_dir, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    experiment = next((o for o in overrides if o.startswith("experiment=")), "experiment=smollm2-wordmath")
    overrides = [o for o in overrides if o != experiment]
    if experiment == "experiment=smollm2-gsm8k" and not any(o.startswith("task.path=") for o in overrides):
        from bench_trl_natural import write_problems  # benchmarks/bench_trl_natural.py

        data = Path(tempfile.mkdtemp()) / "gsm8k.jsonl"
        write_problems(data, 64)
        overrides += [f"task.path={data}", f"task.eval_sets={{test:{data}}}"]
    times = collections.defaultdict(list)

    def timed(name, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            out = function(*args, **kwargs)
            times[name].append(time.perf_counter() - started)
            return out

        return wrapper

    for module in (bridge_stage, rl_stage):  # the names each stage module calls
        for name in ("sample_groups", "rl_backward", "sft_backward"):
            if hasattr(module, name):
                setattr(module, name, timed(name, getattr(module, name)))
    cfg = compose([experiment, f"model.name_or_path={model_dir}", f"recipe={recipe}", "eval.n=4", *overrides])
    ctx = build_context(cfg, show_progress=False)
    stage = (bridge_stage.BridgeStage if recipe == "bridge" else rl_stage.RLStage)(ctx, 10)
    for step in range(3):
        seen = {name: len(calls) for name, calls in times.items()}
        started = time.perf_counter()
        stage.step()
        total = time.perf_counter() - started
        passes = {name: [round(t, 1) for t in calls[seen.get(name, 0) :]] for name, calls in times.items()}
        print(f"{recipe} step {step + 1}: {total:.1f} s; seconds per call {passes}", flush=True)


if __name__ == "__main__":
    main()
