"""`bridgectl run --nproc N [--nnodes M --rdzv-endpoint HOST:PORT]`: the torchrun launch. The command that was given
runs again in N data-parallel processes on this host under `torch.distributed.run` (on each of M hosts, meeting at
torchrun's c10d rendezvous); each of them sees LOCAL_RANK and RANK, joins the process group and trains its share
of every batch (bridgectl/core/distributed.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from bridgectl.core.ui import console


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes of a multi-node run meet (torchrun's c10d rendezvous, its option names)."""

    nnodes: int
    """Machines in the run; the same command runs on each."""
    endpoint: str
    """HOST:PORT of the rendezvous (one node's address), the same on every node."""
    id: str
    """The rendezvous id, the same on every node (the run's name by default)."""

    def torchrun_options(self) -> list[str]:
        return [
            f"--nnodes={self.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.id}",
        ]


def torchrun_command(
    nproc: int,
    overrides: list[str],
    run_path: Path,
    resume: Path | None,
    allow_change: list[str],
    rendezvous: Rendezvous | None = None,
) -> list[str]:
    """The torchrun command line that runs `bridgectl run` with `overrides` in `nproc` processes, on this host alone
    or, with `rendezvous`, as one node of several, into `run_path`, or continuing `resume` with the `allow_change`
    keys."""
    where = ["--standalone"] if rendezvous is None else rendezvous.torchrun_options()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *where,
        f"--nproc_per_node={nproc}",
        "-m",
        "bridgectl.cli.app",
        "run",
        *overrides,
    ]
    if resume is not None:
        command += ["--resume", str(resume), *(f"--allow-change={key}" for key in allow_change)]
    else:  # the name is fixed here: each process would otherwise stamp its own time into the default name
        command += ["--out", str(run_path.parent), "--name", run_path.name]
    return command


def launch_data_parallel(
    nproc: int,
    overrides: list[str],
    run_path: Path,
    resume: Path | None,
    allow_change: list[str],
    rendezvous: Rendezvous | None = None,
) -> int:
    """Runs `bridgectl run` under torchrun (torchrun_command: each node runs this with the same arguments; the
    ranks are assigned at the rendezvous, and rank 0, wherever it lands, claims and writes the run directory);
    waits for it and returns the workers' exit status (130 when interrupted)."""
    command = torchrun_command(nproc, overrides, run_path, resume, allow_change, rendezvous)
    nodes = "" if rendezvous is None else f" on each of {rendezvous.nnodes} nodes"
    console.print(f"launching {nproc} data-parallel processes{nodes}: {escape(' '.join(command[2:]))}")
    with tempfile.TemporaryDirectory(prefix="bridgectl-exit-") as statuses:
        try:
            returncode = subprocess.run(command, env={**os.environ, EXIT_DIR: statuses}).returncode
        except KeyboardInterrupt:  # torchrun passed the signal on; its processes checkpoint and stop
            return 130
        return workers_status(Path(statuses), returncode)


def run_tags() -> dict | None:
    """The tags (a sweep's study, trial and params) a launcher passed to the run's processes (RUN_TAGS)."""
    import json

    value = os.environ.get(RUN_TAGS)
    return json.loads(value) if value else None


RUN_TAGS = "BRIDGECTL_RUN_TAGS"
"""The environment variable through which a sweep hands a torchrun-launched run its tags (JSON): summary.json and
W&B carry them from the run's start, as they do for a trial run in the sweep's own process."""


EXIT_DIR = "BRIDGECTL_EXIT_DIR"
"""The environment variable naming where torchrun's workers leave their exit status (record_exit_status)."""


def record_exit_status(code: int) -> None:
    """A worker's exit status, left for its launcher (torchrun itself exits 1 whatever its workers did): so a
    refused run (2) or an interrupted one (130) ends every node's command with that status."""
    directory = os.environ.get(EXIT_DIR)
    if directory and "LOCAL_RANK" in os.environ:
        try:
            (Path(directory) / f"rank-{os.environ.get('RANK', '0')}").write_text(str(code))
        except OSError:
            pass


def workers_status(directory: Path, returncode: int) -> int:
    """The command's exit status: 0 when torchrun succeeded; else the status this node's workers recorded when
    they agree (every worker that recorded one: 2 for a refused run on every rank), torchrun's otherwise."""
    if returncode == 0:
        return 0
    recorded = {path.read_text().strip() for path in directory.glob("rank-*")}
    if len(recorded) == 1:
        (status,) = recorded
        if status.isdigit() and status != "0":
            return int(status)
    return returncode
