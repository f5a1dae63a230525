"""Where a command may write: a new run's directory under --out, and any directory a command is about to fill."""

from __future__ import annotations

import os
from pathlib import Path

from bridgectl.errors import UserError

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
        raise UserError(
            f"{option} {path}: {existing} is not writable (permissions or a read-only file system)",
            f"give {option} a directory you can write",
        )


def new_run_path(out: Path, name: str) -> Path:
    """`out / name` for a new run, after checking that `name` is one directory name (no separator, not `.` or `..`,
    at most NAME_MAX_BYTES bytes), so the run cannot land outside `out`, and that `out` can be written."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute():
        raise UserError(
            f"--name {name!r} is not a plain directory name",
            "a name without / or \\, not . or .. (choose where runs go with --out)",
        )
    if len(name.encode()) > NAME_MAX_BYTES:
        raise UserError(
            f"--name is {len(name.encode())} bytes long, more than {NAME_MAX_BYTES}", "choose a shorter --name"
        )
    writable_directory(out, "--out")
    return out / name
