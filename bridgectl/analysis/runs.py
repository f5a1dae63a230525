"""`bridgectl runs`: what each run under a directory is doing, read from its files: name, recipe, seed, status
(bridgectl/rundir/liveness.py tells a live run from a killed one), steps done of the total, final accuracy per eval
split and wall-clock.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from bridgectl.analysis.compare import find_run_dirs, mostly_without_signal
from bridgectl.config.saved import config_problem
from bridgectl.errors import UserError
from bridgectl.rundir.liveness import read_heartbeat, status_of

ERROR_CHARS = 60
"""Errors are cut to this many characters in the table; the JSON output carries them whole."""


def last_metrics_row(path: Path, block: int = 8192) -> dict | None:
    """The last complete row of a metrics.jsonl, read from the file's end in growing blocks (a long run's log is
    not read whole); a line cut short by a kill is skipped. None without one."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            while True:
                start = max(0, size - block)
                handle.seek(start)
                lines = handle.read(size - start).split(b"\n")
                for line in reversed(lines[1:] if start > 0 else lines):  # the first may be part of a longer line
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(row, dict) and isinstance(row.get("step"), int):
                        return row
                if start == 0:
                    return None
                block *= 4
    except OSError:
        return None


def read_run(path: Path, root: Path, now: float | None = None) -> dict:
    """One run as `bridgectl runs` shows it (the JSON object of `--format json`). A run whose summary.json or
    config.yaml cannot be read has status "unreadable" and the reason as its error (the others are listed as
    usual); with a readable summary, its recipe, seed, steps and accuracies are still shown."""
    name = path.relative_to(root).as_posix() if path != root else path.name
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict):
        return {
            "name": name,
            "recipe": None,
            "seed": None,
            "status": "unreadable",
            "error": "summary.json is not valid JSON",
            "last_step": None,
            "steps_done": None,
            "steps_total": None,
            "eval": {},
            "wall_s": None,
            "host": None,
            "pid": None,
            "rl_steps": None,
            "no_signal_steps": None,
        }
    status = status_of(path, summary, now)
    problem = config_problem(path)
    if problem is not None:  # compare leaves it out, eval/export/--resume refuse it: say so, keep what summary says
        status = "unreadable"
    last = last_metrics_row(path / "metrics.jsonl")
    last_step = last["step"] if last else None
    final = status not in ("running", "died", "unknown")  # the summary's counters are the run's last word
    stages = summary.get("stages")
    beat = read_heartbeat(path) if status in ("running", "died") else None
    return {
        "name": name,
        "recipe": summary.get("recipe"),
        "seed": summary.get("seed"),
        "status": status,
        "error": problem or (summary.get("error") if status not in ("completed", "running") else None),
        "last_step": last_step,
        # while running, summary.json still holds a resumed run's counters from before: the log is current
        "steps_done": summary.get("steps", last_step) if final else last_step,
        "steps_total": sum(s["steps"] for s in stages) if isinstance(stages, list) else None,
        "eval": {split: result.get("accuracy") for split, result in (summary.get("eval") or {}).items()},
        "wall_s": summary.get("wall_s") if final else (last or {}).get("wall_s"),
        "host": beat.get("host") if beat else None,
        "pid": beat.get("pid") if beat else None,
        # RL steps, and those without a learning signal (every advantage 0): counted when the run ends
        "rl_steps": summary.get("rl_steps") if final else None,
        "no_signal_steps": summary.get("no_signal_steps") if final else None,
    }


def list_runs(directory: Path, now: float | None = None) -> list[dict]:
    """Every run under `directory` (a run directory itself, or searched recursively as `bridgectl compare` does),
    ordered by name. Raises UserError when the directory does not exist or holds no run."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(
            f"no directory {directory}",
            "give the directory that holds run directories, e.g. bridgectl runs runs/ (bridgectl run --out sets it)",
        )
    found = find_run_dirs([str(directory)])
    if not found:
        raise UserError(
            f"no runs under {directory}",
            "a run directory holds summary.json; train one with bridgectl run, or give the directory its --out named",
        )
    return sorted((read_run(path, directory, now) for path in found), key=lambda run: run["name"])


# ---- the table ---------------------------------------------------------------------------------------------------
def short_error(error: str | None) -> str:
    line = (error or "").strip().splitlines()[0] if error and error.strip() else ""
    return line if len(line) <= ERROR_CHARS else line[: ERROR_CHARS - 3] + "..."


def status_cell(run: dict) -> str:
    """The status column: with the step of a live or dead run, the error of a failed one, and a mark on any other
    run that trained most of its RL steps on no signal (compare.mostly_without_signal), e.g. "completed (no signal
    8/8)" (a failure is news enough, and its error needs the room)."""
    status = run["status"]
    if status == "running":
        return f"running (step {run['last_step'] if run['last_step'] is not None else '-'})"
    if status == "died":
        return f"died (last step {run['last_step'] if run['last_step'] is not None else '-'})"
    if status in ("failed", "unreadable") and run["error"]:
        return f"{status}: {short_error(run['error'])}"
    if mostly_without_signal(run):
        return f"{status} (no signal {run['no_signal_steps']}/{run['rl_steps']})"
    return status


def eval_splits(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(split for run in runs for split in run["eval"]))


def table_columns(runs: list[dict]) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, run -> cell) for the table; every cell is drawn from the run's JSON object."""

    def number(value, digits=0):
        return "-" if value is None else f"{value:.{digits}f}"

    columns = [
        ("run", lambda r: r["name"]),
        ("recipe", lambda r: str(r["recipe"] or "-")),
        ("seed", lambda r: "-" if r["seed"] is None else str(r["seed"])),
        ("status", status_cell),
        ("steps", lambda r: f"{number(r['steps_done'])}/{number(r['steps_total'])}"),
    ]
    columns += [
        (f"{split} acc %", lambda r, s=split: number(None if r["eval"].get(s) is None else 100 * r["eval"][s], 1))
        for split in eval_splits(runs)
    ]
    return columns + [("wall s", lambda r: number(r["wall_s"]))]
