"""`bridgectl run --resume RUN_DIR`: the config a stopped run continues with, after checking that it may."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bridgectl.config.checks import validate
from bridgectl.config.compose import apply_overrides
from bridgectl.config.saved import load_run_config
from bridgectl.errors import UserError
from bridgectl.rundir.liveness import refuse_if_running


def resume_config(run_path: Path, overrides: list[str], allowed: list[str]):
    """The config `bridgectl run --resume` continues the run at `run_path` with, and that path: the run's saved
    config with the overrides on top. Raises UserError when it is not a run directory, its summary.json is damaged,
    it already completed, it is still running in another process, or an override changes a value of a key that is
    not in `allowed` (--allow-change)."""
    if not (run_path / "config.yaml").is_file() or not (run_path / "summary.json").is_file():
        raise UserError(
            f"{run_path} is not a run directory (no config.yaml and summary.json)",
            "give a directory made by bridgectl run",
        )
    try:
        summary = json.loads((run_path / "summary.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        summary = None
    if not isinstance(summary, dict):
        raise UserError(f"{run_path}/summary.json is not a JSON object", "the run directory is damaged")
    status = summary.get("status")
    if status == "completed":
        raise UserError(f"run {run_path} already completed", "start a new run; its weights are in checkpoints/final")
    if "LOCAL_RANK" not in os.environ:  # torchrun's processes: the launcher checked, and rank 0's heartbeat is new
        refuse_if_running(run_path, summary)  # two processes writing one run directory would mix their rows
    cfg = load_run_config(run_path / "config.yaml")
    changed = apply_overrides(cfg, overrides)
    refused = [key for key in changed if key not in allowed]
    if refused:
        raise UserError(
            f"the overrides change {', '.join(refused)} of the run being resumed",
            "resume with the run's own config, or allow each change: "
            + " ".join(f"--allow-change {key}" for key in refused),
        )
    validate(cfg)
    return cfg, run_path
