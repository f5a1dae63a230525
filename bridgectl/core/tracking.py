"""The run directory, source of truth for `compare` and `sweep` (its files are documented in the README):

    config.yaml        fully resolved config
    metrics.jsonl      one JSON object per logged step: {"step", "stage", "wall_s", <metric>: value, ...}
    summary.json       {"status", "recipe", "seed", "eval", "eval_initial", "wall_s", "peak_mem_mb", ...}
    completions.jsonl  sampled rollouts and eval answers: prompt, completion, reward, step
    checkpoints/       safetensors weights
    tensorboard/       with tracker.tensorboard: metrics.jsonl as TensorBoard events (core/tensorboard_sink.py)
    wandb_run.json     with tracker.wandb: the W&B run id, which a resumed run continues (core/wandb_sink.py)
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bridgectl.core.redaction import redact
from bridgectl.errors import UserError


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, rename: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak-memory window, so runs that share a process (a sweep) each report their own peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets the resident-set high-water mark (VmHWM)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak since the last reset: tensor memory on CUDA, the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _truncate_after(path: Path, step: int) -> None:
    """Keeps the rows of a jsonl log with "step" <= `step` (and no torn last line), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class RunDir:
    """Appends metrics and completions as training goes, writes the summary at the end. Its `sinks` (W&B,
    TensorBoard: log, log_completions, finish) receive the same rows; the files stay the source of truth."""

    def __init__(self, path: Path, sinks=(), resume_after_step: int | None = None, wall_offset: float = 0.0,
                 enabled: bool = True) -> None:
        """A new run directory; or, with `resume_after_step`, an existing one whose logs are cut back to the rows
        of steps up to that one (the checkpoint a resumed run continues from), with its clock continuing from
        `wall_offset` seconds. `enabled=False` (data-parallel ranks other than 0) writes nothing."""
        self.path, self.sinks, self._summary, self.enabled = path, list(sinks), {}, enabled
        self.started = time.perf_counter() - wall_offset
        if not enabled:
            self._metrics = self._completions = self._problems = None
            return
        if resume_after_step is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:  # the claim: one atomic mkdir, before anything is written, so two runs given one name cannot mix
                self.path.mkdir()
            except FileExistsError:
                raise UserError(f"run directory {self.path} already exists (another run claimed it first)",
                                "choose another --name or --out (runs are never overwritten)") from None
            (self.path / "checkpoints").mkdir()
        else:
            for name in ("metrics.jsonl", "completions.jsonl", "eval_problems.jsonl"):
                _truncate_after(self.path / name, resume_after_step)
        self._metrics = open(self.path / "metrics.jsonl", "a")
        self._completions = open(self.path / "completions.jsonl", "a")
        self._problems = open(self.path / "eval_problems.jsonl", "a")

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.started

    def write_config(self, cfg: DictConfig) -> None:
        """config.yaml: the resolved config, redacted as data and then written by the YAML writer, which quotes
        `***` (redacting the YAML text would leave `entity: ***`, an alias no reader can parse)."""
        if not self.enabled:
            return
        data = redact(OmegaConf.to_container(cfg, resolve=True))
        atomic_write_text(self.path / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(data)))

    def log_metrics(self, step: int, stage: str, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "stage": stage, "wall_s": round(self.wall_s, 3)}
        row.update({key: _finite(value) for key, value in metrics.items()})
        row = redact(row)  # numbers pass unchanged; a stage name is text like any other
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        for sink in self.sinks:
            sink.log(step, {key: value for key, value in row.items() if key != "step"})

    def log_completions(self, step: int, rows: list[dict]) -> None:
        if not self.enabled:
            return
        rows = [redact(row) for row in rows]
        for row in rows:
            self._completions.write(json.dumps({"step": step, **row}) + "\n")
        self._completions.flush()
        for sink in self.sinks:
            sink.log_completions(step, rows)

    def log_problems(self, step: int, rows: list[dict]) -> None:
        """Per-problem evaluation results (core/evaluate.problem_records), one line per split: compact, and what
        paired comparisons read."""
        if not self.enabled:
            return
        for row in rows:
            self._problems.write(json.dumps(redact({"step": step, **row}), separators=(",", ":")) + "\n")
        self._problems.flush()

    def write_summary(self, summary: dict) -> None:
        self._summary = dict(summary)
        if not self.enabled:
            return
        atomic_write_text(self.path / "summary.json", json.dumps(redact(summary), indent=2))

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        self._completions.close()
        self._problems.close()
        sinks, self.sinks = self.sinks, []  # closing twice (an error path, then finally) finishes them once
        for sink in sinks:
            sink.finish(self._summary)
