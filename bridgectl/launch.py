"""`bridgectl run --nproc N`: the torchrun launch. The command that was given runs again in N data-parallel
processes on this host under `torch.distributed.run`; each of them sees LOCAL_RANK and RANK, joins the process
group and trains its share of every batch (bridgectl/core/distributed.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rich.markup import escape

from bridgectl.core.ui import console


def launch_data_parallel(nproc: int, overrides: list[str], run_path: Path, resume: Path | None,
                         allow_change: list[str]) -> int:
    """Runs `bridgectl run` with `overrides` in `nproc` processes under torchrun (one host), into `run_path`, or
    continuing `resume` with the `allow_change` keys; waits for them and returns torchrun's exit status (130 when
    interrupted)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "bridgectl.cli", "run", *overrides]
    if resume is not None:
        command += ["--resume", str(resume), *(f"--allow-change={key}" for key in allow_change)]
    else:  # the name is fixed here: each process would otherwise stamp its own time into the default name
        command += ["--out", str(run_path.parent), "--name", run_path.name]
    console.print(f"launching {nproc} data-parallel processes: {escape(' '.join(command[2:]))}")
    try:
        return subprocess.run(command).returncode
    except KeyboardInterrupt:  # torchrun passed the signal on; its processes checkpoint and stop
        return 130
