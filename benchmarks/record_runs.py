"""Copies a sweep's completed runs into baselines/ without their weights: each run directory becomes
`<recipe>-seed<N>/` with config.yaml, summary.json, metrics.jsonl, eval_problems.jsonl (every problem's result, for
paired comparisons) and completions.jsonl (the sampled and evaluated answers, to read what the model wrote).
Runs that are not completed are skipped; a run already recorded is replaced, so re-running after a resumed sweep
adds the new runs.

Usage: python benchmarks/record_runs.py runs/sweeps/smollm2_wordmath baselines/smollm2-wordmath
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

KEPT = ("config.yaml", "summary.json", "metrics.jsonl", "eval_problems.jsonl", "completions.jsonl")


def record(sweep_dir: Path, out: Path) -> list[str]:
    """The names of the runs written under `out`."""
    written = []
    for summary_path in sorted(sweep_dir.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        if summary.get("status") != "completed":
            continue
        name = f"{summary['recipe']}-seed{summary['seed']}"
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for file in KEPT:
            if (summary_path.parent / file).is_file():
                shutil.copy2(summary_path.parent / file, target / file)
        written.append(name)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    names = record(args.sweep_dir, args.out)
    print(f"recorded {len(names)} runs in {args.out}: {', '.join(names) or 'none'}")


if __name__ == "__main__":
    main()
