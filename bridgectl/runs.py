"""`bridgectl runs`: what each run under a directory is doing, read from its files: name, recipe, seed, status,
steps done of the total, final accuracy per eval split and wall-clock.

A run's summary.json says "running" from its start until a final status replaces it, so a run whose process was
killed outright (SIGKILL, an out-of-memory kill, a lost machine) says "running" forever. The heartbeat tells the
two apart: while it trains, the run's process keeps `<run>/heartbeat.json` ({host, pid, start_ticks, time, and
the phase: loading, initial evaluation, training, final checkpoint, final evaluation, final weights}) fresh from a
background thread (start_heartbeat), so a long step does not look dead. A "running" run is reported running
only when that process is still alive (on this host: the pid exists, is not a zombie and started when the recorded
one did, so a reused pid does not count; on another host: its heartbeat is fresh), and "died" otherwise.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from bridgectl.errors import UserError
from bridgectl.run_config import config_problem, load_run_config

HEARTBEAT_FILE = "heartbeat.json"
HEARTBEAT_SECONDS = 15.0
"""How often a running run rewrites its heartbeat (as the sweep does for its trials: bridgectl/sweep_claims.py)."""
STALE_AFTER_SECONDS = 120.0
"""A run of another host whose heartbeat is older than this (eight missed beats) is taken for dead."""
ERROR_CHARS = 60
"""Errors are cut to this many characters in the table; the JSON output carries them whole."""


# ---- writing: the running process -----------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process from /proc/<pid>/stat (Linux); None elsewhere."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name, in parentheses, may hold spaces
    return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)


def _write_heartbeat(path: Path, beat: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps(dict(beat, time=time.time())))
        os.replace(tmp, path)  # a reader sees the old beat or the new one, never half of one
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: no half-written temporary file stays behind
        raise


class Heartbeat:
    """The running run's heartbeat (start_heartbeat): calling it stops the beats (safe twice); `phase(name)` records
    what the run is doing in the next beat, written at once."""

    def __init__(self, path: Path, beat: dict, interval: float) -> None:
        """Writes the first beat now and starts the daemon thread that writes one every `interval` seconds."""
        self.path, self.beat, self._lock = path, beat, threading.Lock()
        _write_heartbeat(path, beat)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True,
                                        name="bridgectl-run-heartbeat")
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._write()

    def _write(self) -> None:
        """One beat; one that fails to write is skipped: the run only looks older."""
        with self._lock:  # the thread and phase() write the same temporary file
            if self._stop.is_set() and threading.current_thread() is self._thread:
                return
            try:
                _write_heartbeat(self.path, self.beat)
            except OSError:
                pass

    def phase(self, name: str) -> None:
        """Records that the run is now in phase `name` (while it still beats)."""
        self.beat = dict(self.beat, phase=name)
        if not self._stop.is_set():
            self._write()

    def __call__(self) -> None:
        self._stop.set()
        self._thread.join()  # no beat is written after this returns (the run directory may be removed next)


def start_heartbeat(run_path: Path, interval: float = HEARTBEAT_SECONDS) -> Heartbeat:
    """Writes `<run_path>/heartbeat.json` now and every `interval` seconds from a daemon thread; returns the
    Heartbeat, which stops it when called (safe to call twice). A beat that fails to write is skipped: the run only
    looks older."""
    stat = _proc_stat(os.getpid())
    beat = {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": stat[1] if stat else None,
            "started": time.time()}
    return Heartbeat(run_path / HEARTBEAT_FILE, beat, interval)


# ---- reading: `bridgectl runs` -----------------------------------------------------------------------------------
def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether process `pid` of this host is alive and, where /proc tells, the same process that recorded
    `start_ticks` (not a later one given the same pid) and not a zombie (killed, not yet reaped by its parent)."""
    if not isinstance(pid, int) or pid <= 0:  # os.kill(0 or -n, 0) would ask about a whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    stat = _proc_stat(pid)
    if stat is None:  # no /proc (macOS), or it ended just now: the signal check is all there is
        return True
    state, ticks = stat
    return state not in ("Z", "X") and (start_ticks is None or ticks == start_ticks)


def read_heartbeat(run_path: Path) -> dict | None:
    try:
        beat = json.loads((run_path / HEARTBEAT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return beat if isinstance(beat, dict) else None


def status_of(run_path: Path, summary: dict, now: float | None = None) -> str:
    """The run's status: its summary's final status (completed, failed, interrupted, or a sweep's pruned); for a
    summary still saying "running", "running" if its process is alive (process_alive on this host, a heartbeat
    younger than STALE_AFTER_SECONDS from another host), else "died"; "unknown" for a run without a heartbeat
    (made before runs recorded one)."""
    status = summary.get("status", "unknown")
    if status != "running":
        return status
    beat = read_heartbeat(run_path)
    if beat is None:
        return "unknown"
    if beat.get("host") == socket.gethostname():
        return "running" if process_alive(beat.get("pid"), beat.get("start_ticks")) else "died"
    now = time.time() if now is None else now
    return "running" if now - beat.get("time", 0.0) <= STALE_AFTER_SECONDS else "died"


def refuse_if_running(run_path: Path, summary: dict, now: float | None = None) -> None:
    """Raises UserError when the run at `run_path` (its summary `summary`) is running in another process, by
    status_of's rule (the one that tells running from died): two processes would write one run directory. The
    calling process's own heartbeat does not count (a sweep retries a trial in the process that ran it)."""
    if status_of(run_path, summary, now) != "running":
        return
    beat = read_heartbeat(run_path) or {}
    if beat.get("host") == socket.gethostname() and beat.get("pid") == os.getpid():
        return
    age = (time.time() if now is None else now) - beat.get("time", 0.0)
    doing = f", {beat['phase']}" if beat.get("phase") else ""
    raise UserError(f"run {run_path} is still running (pid {beat.get('pid')} on {beat.get('host')}{doing}; "
                    f"heartbeat {age:.0f} s ago)",
                    "wait for it to end, or stop it first (SIGINT or SIGTERM: it checkpoints and stops with status "
                    "interrupted), then resume; a run on another host counts as dead once its heartbeat is "
                    f"{STALE_AFTER_SECONDS:.0f} s old")


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
        return {"name": name, "recipe": None, "seed": None, "status": "unreadable", "error": "summary.json is not "
                "valid JSON", "last_step": None, "steps_done": None, "steps_total": None, "eval": {},
                "wall_s": None, "host": None, "pid": None, "rl_steps": None, "no_signal_steps": None}
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
        "name": name, "recipe": summary.get("recipe"), "seed": summary.get("seed"), "status": status,
        "error": problem or (summary.get("error") if status not in ("completed", "running") else None),
        "last_step": last_step,
        # while running, summary.json still holds a resumed run's counters from before: the log is current
        "steps_done": summary.get("steps", last_step) if final else last_step,
        "steps_total": sum(s["steps"] for s in stages) if isinstance(stages, list) else None,
        "eval": {split: result.get("accuracy") for split, result in (summary.get("eval") or {}).items()},
        "wall_s": summary.get("wall_s") if final else (last or {}).get("wall_s"),
        "host": beat.get("host") if beat else None, "pid": beat.get("pid") if beat else None,
        # RL steps, and those without a learning signal (every advantage 0): counted when the run ends
        "rl_steps": summary.get("rl_steps") if final else None,
        "no_signal_steps": summary.get("no_signal_steps") if final else None,
    }


def list_runs(directory: Path, now: float | None = None) -> list[dict]:
    """Every run under `directory` (a run directory itself, or searched recursively as `bridgectl compare` does),
    ordered by name. Raises UserError when the directory does not exist or holds no run."""
    from bridgectl.compare import find_run_dirs  # only here: training imports this module for the heartbeat

    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"no directory {directory}", "give the directory that holds run directories, e.g. "
                        "bridgectl runs runs/ (bridgectl run --out sets it)")
    found = find_run_dirs([str(directory)])
    if not found:
        raise UserError(f"no runs under {directory}", "a run directory holds summary.json; train one with "
                        "bridgectl run, or give the directory its --out named")
    return sorted((read_run(path, directory, now) for path in found), key=lambda run: run["name"])


# ---- the table ---------------------------------------------------------------------------------------------------
def short_error(error: str | None) -> str:
    line = (error or "").strip().splitlines()[0] if error and error.strip() else ""
    return line if len(line) <= ERROR_CHARS else line[:ERROR_CHARS - 3] + "..."


def status_cell(run: dict) -> str:
    """The status column: with the step of a live or dead run, the error of a failed one, and a mark on any other
    run that trained most of its RL steps on no signal (compare.mostly_without_signal), e.g. "completed (no signal
    8/8)" (a failure is news enough, and its error needs the room)."""
    from bridgectl.compare import mostly_without_signal  # only here: training imports this module for the heartbeat

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

    columns = [("run", lambda r: r["name"]), ("recipe", lambda r: str(r["recipe"] or "-")),
               ("seed", lambda r: "-" if r["seed"] is None else str(r["seed"])), ("status", status_cell),
               ("steps", lambda r: f"{number(r['steps_done'])}/{number(r['steps_total'])}")]
    columns += [(f"{split} acc %", lambda r, s=split: number(None if r["eval"].get(s) is None
                                                             else 100 * r["eval"][s], 1))
                for split in eval_splits(runs)]
    return columns + [("wall s", lambda r: number(r["wall_s"]))]


# ---- where a command may write ----------------------------------------------------------------------------------
NAME_MAX_BYTES = 200
"""Longest run name: file systems allow 255 bytes per name, and a run's temporary files add a suffix to it."""


def writable_directory(path: Path, option: str) -> None:
    """Raises UserError unless files can be created under directory `path` (which may not exist yet): the path, or
    its nearest existing ancestor, must be a directory this process may write. Checked before any work, so a
    command never trains or evaluates for minutes and then fails to write."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {path}: {existing} is a file, not a directory", f"give {option} a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: {existing} is not writable (permissions or a read-only file system)",
                        f"give {option} a directory you can write")


def new_run_path(out: Path, name: str) -> Path:
    """`out / name` for a new run, after checking that `name` is one directory name (no separator, not `.` or `..`,
    at most NAME_MAX_BYTES bytes), so the run cannot land outside `out`, and that `out` can be written."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute():
        raise UserError(f"--name {name!r} is not a plain directory name",
                        "a name without / or \\, not . or .. (choose where runs go with --out)")
    if len(name.encode()) > NAME_MAX_BYTES:
        raise UserError(f"--name is {len(name.encode())} bytes long, more than {NAME_MAX_BYTES}",
                        "choose a shorter --name")
    writable_directory(out, "--out")
    return out / name


# ---- resuming a run ----------------------------------------------------------------------------------------------
def resume_config(run_path: Path, overrides: list[str], allowed: list[str]):
    """The config `bridgectl run --resume` continues the run at `run_path` with, and that path: the run's saved
    config with the overrides on top. Raises UserError when it is not a run directory, its summary.json is damaged,
    it already completed, it is still running in another process, or an override changes a value of a key that is
    not in `allowed` (--allow-change)."""
    from bridgectl.config import apply_overrides, validate  # only here: training imports this module

    if not (run_path / "config.yaml").is_file() or not (run_path / "summary.json").is_file():
        raise UserError(f"{run_path} is not a run directory (no config.yaml and summary.json)",
                        "give a directory made by bridgectl run")
    try:
        summary = json.loads((run_path / "summary.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        summary = None
    if not isinstance(summary, dict):
        raise UserError(f"{run_path}/summary.json is not a JSON object", "the run directory is damaged")
    status = summary.get("status")
    if status == "completed":
        raise UserError(f"run {run_path} already completed", "start a new run; its weights are in "
                        "checkpoints/final")
    if "LOCAL_RANK" not in os.environ:  # torchrun's processes: the launcher checked, and rank 0's heartbeat is new
        refuse_if_running(run_path, summary)  # two processes writing one run directory would mix their rows
    cfg = load_run_config(run_path / "config.yaml")
    changed = apply_overrides(cfg, overrides)
    refused = [key for key in changed if key not in allowed]
    if refused:
        raise UserError(f"the overrides change {', '.join(refused)} of the run being resumed",
                        "resume with the run's own config, or allow each change: "
                        + " ".join(f"--allow-change {key}" for key in refused))
    validate(cfg)
    return cfg, run_path
