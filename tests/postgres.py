"""A real PostgreSQL server for the tests of a shared study: started from the Debian package's binaries in a
temporary directory on a free localhost port (about two seconds), trusted local logins, stopped and removed at the
end. `.ci/run` installs the package; where its binaries are missing the test fails saying how to install them
(it is not skipped: CI must run it)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

INSTALL_HINT = (
    "the PostgreSQL server binaries (initdb, pg_ctl) are not installed: `apt-get install postgresql` "
    "(what .ci/run does), or put their directory on PATH"
)


def server_binaries() -> Path | None:
    """The directory holding initdb and pg_ctl: on PATH, else the newest Debian /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def postgres_server():
    """Yields a postgresql:// URL of a fresh server's `postgres` database (superuser `bridgectl`, no password).
    As root the server runs as the `postgres` user (PostgreSQL refuses to run as root)."""
    binaries = server_binaries()
    if binaries is None:
        pytest.fail(INSTALL_HINT)
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    # not under pytest's tmp_path: as root that is readable by root alone, and the server runs as postgres
    home = Path(tempfile.mkdtemp(prefix="bridgectl-pg-"))
    data = home / "data"
    if as_root:
        shutil.chown(home, "postgres")
    port = free_port()

    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*prefix, str(binaries / "pg_ctl"), "-D", str(data), *args], capture_output=True, text=True, timeout=60
        )

    try:
        made = subprocess.run(
            [*prefix, str(binaries / "initdb"), "-D", str(data), "-U", "bridgectl", "--auth=trust", "--no-sync"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert made.returncode == 0, made.stdout + made.stderr
        options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        started = ctl("-o", options, "-l", str(home / "server.log"), "-w", "-t", "60", "start")
        log = (home / "server.log").read_text() if (home / "server.log").exists() else ""
        assert started.returncode == 0, started.stdout + started.stderr + log
        yield f"postgresql://bridgectl@127.0.0.1:{port}/postgres"
    finally:
        ctl("-m", "immediate", "stop")
        shutil.rmtree(home, ignore_errors=True)
