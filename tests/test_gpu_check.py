"""benchmarks/gpu_check.py, the script a session with a GPU runs (`make gpu-check`), on its tiny shape: it builds a
model and tokenizer locally, checks decoding speed, runs rl and bridge through `bridgectl run model=hf`, and
tabulates step time, rollout tokens/s and peak memory, so the device's minutes are not spent finding a broken
script."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402

pytestmark = pytest.mark.slow  # processes, runs and studies: make test-fast leaves these out


def test_gpu_check_runs_rl_and_bridge_on_the_tiny_shape():
    text = gpu_check.main(
        [
            "--shape",
            "tiny",
            "--steps",
            "2",
            "--completion-length",
            "8",
            "--micro-batch-size",
            "3",
            "--budget-s",
            "100000",
            "--recipes",
            "rl (LoRA r32)",
            "bridge lower=lora",
        ]
    )
    first_table = text.split("ratio against rl")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in first_table.splitlines() if line.startswith("| ")}
    assert {"rl (LoRA r32)", "bridge lower=lora"} <= rows.keys()
    cells = [cell.strip() for cell in rows["bridge lower=lora"].split("|")[2:-1]]
    step_s, tokens_per_s, trained_per_s, tokens_per_step, peak = (float(v) for v in cells[:5])
    assert step_s > 0 and tokens_per_s > 0 and trained_per_s > 0 and peak > 0
    assert cells[5] == ""  # no log-prob gap without vLLM rollouts
    assert tokens_per_step == 64 * 8  # 8 prompts x 8 samples, every completion at the full 8 tokens
    assert "| bridge lower=lora | " in text.split("ratio against rl")[1]
    # the decoding check, run first: the built-in sampler and model.generate decode the same greedy tokens (the
    # compiled CUDA-graph step is measured on CUDA only)
    decoding = text.split("Decoding (")[1]
    assert decoding.startswith("64 rows x 8 tokens")
    table = {
        cells[0]: cells[1:]
        for cells in (
            [c.strip() for c in line.split("|")[1:-1]] for line in decoding.splitlines() if line.startswith("| ")
        )
    }
    assert float(table["built-in sampler"][0]) > 0 and float(table["model.generate"][0]) > 0
    assert table["model.generate"][2] == "True"
    assert "CUDA only" in decoding
