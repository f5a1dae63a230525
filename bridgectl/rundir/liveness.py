"""Whether a run is alive: the heartbeat a running run keeps, and how a reader tells a live run from a killed one.

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

from bridgectl.errors import UserError

HEARTBEAT_FILE = "heartbeat.json"
HEARTBEAT_SECONDS = 15.0
"""How often a running run rewrites its heartbeat (as the sweep does for its trials: bridgectl/sweep/claims.py)."""
STALE_AFTER_SECONDS = 120.0
"""A run of another host whose heartbeat is older than this (eight missed beats) is taken for dead."""


# ---- writing: the running process -----------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process from /proc/<pid>/stat (Linux); None elsewhere."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name, in parentheses, may hold spaces
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
        self._thread = threading.Thread(
            target=self._loop, args=(interval,), daemon=True, name="bridgectl-run-heartbeat"
        )
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
    beat = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start_ticks": stat[1] if stat else None,
        "started": time.time(),
    }
    return Heartbeat(run_path / HEARTBEAT_FILE, beat, interval)


# ---- reading: is it alive? -----------------------------------------------------------------------------------
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
    raise UserError(
        f"run {run_path} is still running (pid {beat.get('pid')} on {beat.get('host')}{doing}; "
        f"heartbeat {age:.0f} s ago)",
        "wait for it to end, or stop it first (SIGINT or SIGTERM: it checkpoints and stops with status "
        "interrupted), then resume; a run on another host counts as dead once its heartbeat is "
        f"{STALE_AFTER_SECONDS:.0f} s old",
    )
