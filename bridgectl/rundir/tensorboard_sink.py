"""TensorBoard as a view of the run directory (`tracker.tensorboard=true`): every row of metrics.jsonl becomes scalar
events in `<run>/tensorboard/`, one tag per numeric key (`stage` is text and stays out), x = the row's step, so
`tensorboard --logdir runs/` shows many runs, and a sweep's trial runs, side by side. Values are written in double
precision, so the events read back equal metrics.jsonl exactly (tests/test_tensorboard.py).

A resumed run (`bridgectl run --resume`) continues from a checkpoint after which the killed process may have logged
more steps. RunDir has cut metrics.jsonl back to the checkpoint; the resumed run writes a new event file from it and
deletes the earlier ones, so each step keeps one point, whichever order TensorBoard reads files in (by name, which
starts with the creation second: a run killed and resumed within one second would otherwise be read out of order).
Every event file opens with a SessionLog.START at step 0 (SummaryWriter's `purge_step`): a TensorBoard already
showing the run takes it for a restart and drops the points it had, then reads the new file's."""

from __future__ import annotations

import json
from pathlib import Path


class TensorBoardSink:
    def __init__(self, run_path: Path, resume: bool = False) -> None:
        from torch.utils.tensorboard import SummaryWriter

        directory = run_path / "tensorboard"
        earlier = sorted(directory.glob("events.out.tfevents.*")) if resume else []
        self.writer = SummaryWriter(str(directory), purge_step=0)
        if resume:
            for line in (run_path / "metrics.jsonl").read_text().splitlines():
                row = json.loads(line)
                self._add(row.pop("step"), row)
            self.writer.flush()
            for path in earlier:  # after the new file holds everything: a kill in between loses nothing
                path.unlink()

    def _add(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):  # None (a non-finite value) and strings have no point to plot
                self.writer.add_scalar(key, value, step, new_style=True, double_precision=True)

    def log(self, step: int, metrics: dict) -> None:
        self._add(step, metrics)
        # written through at every row, not every 2 minutes: a SIGKILLed run keeps the steps its checkpoint holds
        self.writer.flush()

    def log_completions(self, step: int, rows: list[dict]) -> None:
        pass  # completions.jsonl holds them; TensorBoard shows curves

    def finish(self, summary: dict) -> None:
        self.writer.close()
