"""The run directory, source of truth for `compare` and `sweep` (its files are documented in docs/guides/run-directory.md):

config.yaml        fully resolved config, between a first line recording its key count and an end line
                   (run_config.check_whole refuses a file cut short or missing keys)
metrics.jsonl      one JSON object per logged step: {"step", "stage", "wall_s", <metric>: value, ...}
summary.json       {"status", "recipe", "seed", "eval", "eval_initial", "wall_s", "peak_mem_mb", ...}
completions.jsonl  sampled rollouts and eval answers: prompt, completion, reward, step
checkpoints/       step-NNNNNN/ resumable checkpoints with their manifest (core/checkpoint.py), final/ the weights
tensorboard/       with tracker.tensorboard: metrics.jsonl as TensorBoard events (rundir/tensorboard_sink.py)
wandb_run.json     with tracker.wandb: the W&B run id, which a resumed run continues (rundir/wandb_sink.py)
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

from bridgectl.config.saved import config_text
from bridgectl.errors import UserError
from bridgectl.rundir.redaction import redact


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, rename: a kill leaves the old file or the new one, never half of one. A
    write that fails (a full disk) removes its temporary file and raises, the old file untouched."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _append(handle, text: str) -> None:
    """Appends `text` to the unbuffered binary log `handle` whole or not at all: a write that fails part way (a
    full disk) is cut back off the file before the error is raised, so the log keeps only complete rows."""
    data = text.encode()
    start = os.fstat(handle.fileno()).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[handle.write(view) :]
    except BaseException:
        os.ftruncate(handle.fileno(), start)
        raise


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


LOGS = ("metrics.jsonl", "completions.jsonl", "eval_problems.jsonl")
"""The run directory's append-only logs, cut back when a run resumes."""


class RunDir:
    """Appends metrics and completions as training goes, writes the summary at the end. Its `sinks` (W&B,
    TensorBoard: log, log_completions, finish) receive the same rows; the files stay the source of truth."""

    def __init__(
        self,
        path: Path,
        sinks=(),
        resume_after_step: int | None = None,
        wall_offset: float = 0.0,
        enabled: bool = True,
        existing: bool = False,
    ) -> None:
        """A new run directory; or, with `resume_after_step`, an existing one whose logs are cut back to the rows
        of steps up to that one (the checkpoint a resumed run continues from), with its clock continuing from
        `wall_offset` seconds; or, with `existing` alone, an existing one whose logs open only with cut_back (a
        resumed run picks its checkpoint first, and may write its summary before). `enabled=False` (data-parallel
        ranks other than 0) writes nothing."""
        self.path, self.sinks, self._summary, self.enabled = path, list(sinks), {}, enabled
        self.started = time.perf_counter() - wall_offset
        self._metrics = self._completions = self._problems = None
        if not enabled:
            return
        if resume_after_step is not None:
            self.cut_back(resume_after_step, wall_offset)
        elif not existing:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:  # the claim: one atomic mkdir, before anything is written, so two runs given one name cannot mix
                self.path.mkdir()
            except FileExistsError:
                raise UserError(
                    f"run directory {self.path} already exists (another run claimed it first)",
                    "choose another --name or --out (runs are never overwritten)",
                ) from None
            (self.path / "checkpoints").mkdir()
            self._open_logs()

    def _open_logs(self) -> None:
        # unbuffered: each row reaches the file in one write, which _append can take back if it fails
        self._metrics, self._completions, self._problems = (open(self.path / name, "ab", buffering=0) for name in LOGS)

    def cut_back(self, step: int, wall_offset: float = 0.0, log_bytes: dict | None = None) -> None:
        """Resuming from the checkpoint of `step`: each log is cut back to what it held when that checkpoint was
        written (`log_bytes`, its sizes then, recorded in the checkpoint), or, for a checkpoint without them or a
        log shorter than recorded, to its rows of steps up to `step`; then the logs are opened and the clock
        continues from `wall_offset` seconds."""
        self.started = time.perf_counter() - wall_offset
        if not self.enabled:
            return
        for name in LOGS:
            path, size = self.path / name, (log_bytes or {}).get(name)
            if size is not None and path.exists() and path.stat().st_size >= size:
                # the sizes, not the steps: rows of the checkpoint's own step written after it (the final
                # evaluation follows the last step's checkpoint) go too
                os.truncate(path, size)
            else:
                _truncate_after(path, step)
        self._open_logs()

    def log_bytes(self) -> dict[str, int] | None:
        """The size of each log now (recorded in a checkpoint, for cut_back); None where nothing is written."""
        if not self.enabled or self._metrics is None:
            return None
        return {
            name: os.fstat(handle.fileno()).st_size
            for name, handle in zip(LOGS, (self._metrics, self._completions, self._problems))
        }

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.started

    def write_config(self, cfg: DictConfig) -> None:
        """config.yaml: the resolved config, redacted as data and then written by the YAML writer, which quotes
        `***` (redacting the YAML text would leave `entity: ***`, an alias no reader can parse)."""
        if not self.enabled:
            return
        data = redact(OmegaConf.to_container(cfg, resolve=True))
        atomic_write_text(self.path / "config.yaml", config_text(data))  # with its key count and end line

    def log_metrics(self, step: int, stage: str, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "stage": stage, "wall_s": round(self.wall_s, 3)}
        row.update({key: _finite(value) for key, value in metrics.items()})
        row = redact(row)  # numbers pass unchanged; a stage name is text like any other
        _append(self._metrics, json.dumps(row) + "\n")
        for sink in self.sinks:
            sink.log(step, {key: value for key, value in row.items() if key != "step"})

    def log_completions(self, step: int, rows: list[dict]) -> None:
        if not self.enabled:
            return
        rows = [redact(row) for row in rows]
        _append(self._completions, "".join(json.dumps({"step": step, **row}) + "\n" for row in rows))
        for sink in self.sinks:
            sink.log_completions(step, rows)

    def log_problems(self, step: int, rows: list[dict]) -> None:
        """Per-problem evaluation results (core/evaluate.problem_records), one line per split: compact, and what
        paired comparisons read."""
        if not self.enabled:
            return
        _append(
            self._problems,
            "".join(json.dumps(redact({"step": step, **row}), separators=(",", ":")) + "\n" for row in rows),
        )

    def write_summary(self, summary: dict) -> None:
        self._summary = dict(summary)
        if not self.enabled:
            return
        atomic_write_text(self.path / "summary.json", json.dumps(redact(summary), indent=2))

    def close(self) -> None:
        if not self.enabled:
            return
        for handle in (self._metrics, self._completions, self._problems):
            if handle is not None:
                handle.close()
        sinks, self.sinks = self.sinks, []  # closing twice (an error path, then finally) finishes them once
        for sink in sinks:
            sink.finish(self._summary)
