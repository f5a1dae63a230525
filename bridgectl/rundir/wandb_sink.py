"""W&B as a view of the run directory (`tracker.wandb.mode=online|offline`): the run is named after the run directory,
grouped by sweep study (else recipe), tagged with recipe, task and model; it gets the full config, every metric row
metrics.jsonl gets, a table of sampled completions with their rewards, and the final summary. Secrets never reach
it: config, completions and summary pass through core/redaction.redact (values of environment variables that hold
keys, tokens or passwords).

A resumed run (`bridgectl run --resume`) continues the same W&B run: the id is kept in `<run>/wandb_run.json` and
given back to wandb.init with resume="allow". The resumed process first asks what the W&B run already holds (online:
the server's `starting_step`; offline: the history steps in the earlier `offline-run-*` logs of that id), replays the
rows of metrics.jsonl after that step (a kill loses the steps W&B had not yet written) and leaves out the rows it
already holds, so each step is in the history once. Offline, `wandb sync <run>/wandb/offline-run-*` uploads the logs
of one run in the order they started (`wandb sync --help`, wandb 0.31)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bridgectl.errors import UserError
from bridgectl.rundir.redaction import redact  # also imported from here by bridgectl/sweep/study.py

RUN_ID_FILE = "wandb_run.json"  # in the run directory: {"id": the W&B run id}


class WandbSink:
    def __init__(self, wandb_cfg, run_name: str, config: dict, tags: dict | None, directory, resume: bool = False):
        import wandb

        directory, tags = Path(directory), tags or {}
        group = wandb_cfg.group or tags.get("study") or config["recipe"]["name"]
        run_id = _saved_run_id(directory) if resume else None
        offline_through = _last_offline_step(directory / "wandb", run_id) if run_id else -1  # before init adds a log
        self._wandb = wandb
        try:
            self.run = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                mode=wandb_cfg.mode,
                name=run_name,
                group=group,
                tags=[
                    f"recipe:{config['recipe']['name']}",
                    f"task:{config['task']['name']}",
                    f"model:{config['model']['name']}",
                ],
                config=redact(config),
                dir=str(directory),
                job_type="train",
                reinit="create_new",
                id=run_id,
                resume="allow" if run_id else None,  # allow: a run never synced starts under this id
                settings=wandb.Settings(console="off", save_code=False, x_disable_meta=True),
            )
        except Exception as error:  # no credentials for online mode, no network, a bad entity
            raise UserError(
                f"W&B could not start a run: {type(error).__name__}: {error}",
                "run `wandb login` (or set WANDB_API_KEY), or use tracker.wandb.mode=offline",
            ) from None
        _write_run_id(directory, self.run.id)  # at once: a run killed from here on resumes into this W&B run
        self._completions, self._held_through = [], -1
        if resume:  # RunDir has cut the logs back to the checkpoint: what is left is the run so far
            if run_id:  # "allow" resumed at the step after the last one W&B holds, or started afresh (0)
                self._held_through = max(self.run.starting_step - 1, offline_through)
            for row in _read_jsonl(directory / "metrics.jsonl"):
                self.log(row.pop("step"), row)
            self._completions = _read_jsonl(directory / "completions.jsonl")  # the table stays whole

    def log(self, step: int, metrics: dict) -> None:
        if step <= self._held_through:  # already in the W&B run, from the process this one resumes
            return
        self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def log_completions(self, step: int, rows: list[dict]) -> None:
        self._completions += [redact({"step": step, **row}) for row in rows]

    def finish(self, summary: dict) -> None:
        columns = ["step", "split", "prompt", "completion", "reward", "gold"]
        if self._completions:
            table = self._wandb.Table(
                columns=columns, data=[[row.get(c) for c in columns] for row in self._completions]
            )
            self.run.log({"completions": table})
        for key, value in redact(summary).items():
            if isinstance(value, (int, float, str, bool, dict, list)):
                self.run.summary[key] = value
        self.run.finish(exit_code=0 if summary.get("status") == "completed" else 1)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _saved_run_id(directory: Path) -> str | None:
    try:
        return json.loads((directory / RUN_ID_FILE).read_text())["id"]
    except (OSError, ValueError, KeyError):  # none yet (W&B off until now, a run from before ids were kept)
        return None


def _write_run_id(directory: Path, run_id: str) -> None:
    tmp = directory / f".{RUN_ID_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"id": run_id}))
    os.replace(tmp, directory / RUN_ID_FILE)  # a kill leaves the old file or the new one


def _last_offline_step(wandb_dir: Path, run_id: str) -> int:
    """The highest history step in the offline logs of W&B run `run_id` (-1: none)."""
    steps = [step for log in wandb_dir.glob(f"offline-run-*/run-{run_id}.wandb") for step in _history_steps(log)]
    return max(steps, default=-1)


def _history_steps(log: Path) -> list[int]:
    """The step of every history record in a W&B transaction log (`run-<id>.wandb`): after a 7-byte file header, a
    LevelDB-style log of 32 KiB blocks, each record a 7-byte header (checksum, length, type: 1 full, 2 first,
    3 middle, 4 last) and its data. A record cut short by a kill ends the reading."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    data, position, block, pending, steps = log.read_bytes(), 7, 32768, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        if kind not in (1, 2, 3, 4) or position + 7 + length > len(data):
            break
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(pending)
            except DecodeError:
                break
            if record.WhichOneof("record_type") == "history":
                steps.append(record.history.step.num)
    return steps
