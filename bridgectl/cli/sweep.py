"""`bridgectl sweep`: an Optuna study over run configs (bridgectl/sweep/)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from bridgectl.cli.common import (
    check_executor,
    checked_launcher_options,
    fail,
)
from bridgectl.cli.compare import print_comparison
from bridgectl.core.ui import console
from bridgectl.errors import UserError


def sweep_command(
    spec: Path = typer.Argument(..., help="Sweep spec YAML (format: sweeps/README.md)."),
    workers: int = typer.Option(1, "--workers", help="Trials run at once, as separate processes (or cluster jobs)."),
    storage: Optional[str] = typer.Option(
        None, "--storage", help="Optuna RDB URL (default: a journal file in the sweep directory)."
    ),
    out: Path = typer.Option(Path("runs/sweeps"), "--out", help="Parent of the sweep directory <out>/<name>/."),
    launcher: str = typer.Option(
        "local",
        "--launcher",
        help="local (processes here), slurm (one sbatch job per worker, via submitit) or submitit-local.",
    ),
    launcher_opt: Optional[List[str]] = typer.Option(
        None,
        "--launcher-opt",
        help="KEY=VALUE for submitit's update_parameters, e.g. timeout_min=120, slurm_partition=gpu (repeatable).",
    ),
    nproc: Optional[int] = typer.Option(
        None,
        "--nproc",
        help="Data-parallel processes per run (default: the spec's nproc, else 1): each seed of a trial runs under torchrun, as bridgectl run --nproc does.",
    ),
    nnodes: Optional[int] = typer.Option(
        None,
        "--nnodes",
        help="Machines per run (default: the spec's nnodes, else 1): above 1 each seed of a trial is a --launcher job of that many torchrun nodes, as bridgectl run --launcher slurm --nnodes submits it.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the spec and print the plan; run nothing."),
) -> None:
    """Run (or resume) an Optuna study over `bridgectl run` configs, then compare its trials."""
    from bridgectl.sweep import study as sweeping
    from bridgectl.sweep.spec import load_spec

    try:
        if "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError(
                "bridgectl sweep is running under torchrun: every process would be an Optuna worker of "
                "its own, training different trials in one process group",
                "start bridgectl sweep directly; it starts its trials' processes itself",
            )
        if workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}", "e.g. --workers 2")
        if storage is not None:
            storage = sweeping.storage_url(storage, workers)
            sweeping.open_database(storage)  # a server that is not there: exit 2 now, nothing written
        launcher_options = checked_launcher_options(launcher, launcher_opt)
        parsed = load_spec(spec, nproc, nnodes)
        if parsed.nnodes > 1 and launcher == "local":
            raise UserError(
                f"trials over {parsed.nnodes} nodes are cluster jobs",
                "add --launcher slurm (or submitit-local to try it on this machine)",
            )
        if launcher != "local":
            check_executor(launcher, launcher_options)
    except UserError as error:
        fail(error.message, error.hint, 2)
    total = len(parsed.grid()) if parsed.sampler == "grid" else parsed.n_trials
    processes = f" in {parsed.nproc} processes each" if parsed.nproc > 1 else ""
    if parsed.nnodes > 1:
        processes = f" as {launcher} jobs of {parsed.nnodes} nodes x {parsed.nproc} processes"
    console.print(
        f"sweep [cyan]{parsed.name}[/cyan]: {total} trials x {len(parsed.seeds)} seeds{processes}, sampler "
        f"{parsed.sampler}, objective {parsed.direction} {parsed.metric} -> {out / parsed.name}"
    )
    if dry_run:
        for key, param in parsed.params.items():
            console.print(f"  {key}: {escape(str(param))}")
        console.print(f"  every run: {escape(' '.join(parsed.base))} (+ params, seed)")
        return
    from bridgectl.core.ui import progress_bar

    with progress_bar() as progress:
        on_progress = sweeping.progress_view(progress, progress.add_task("trials", total=total, info=""))
        try:
            study = sweeping.run_sweep(
                spec,
                out,
                workers,
                storage,
                on_progress=on_progress,
                launcher=launcher,
                launcher_options=launcher_options,
                nproc=nproc,
                nnodes=nnodes,
            )
        except KeyboardInterrupt:
            console.print(f"Interrupted: the study in {out / parsed.name} is kept; re-run the same command to resume")
            raise typer.Exit(130) from None
        except UserError as error:
            fail(error.message, error.hint, 2)
        except RuntimeError as error:  # a cluster job died; its trial is retried when the sweep resumes
            fail(str(error), "re-run the same command to resume the study", 1)
    compared = sweeping.trial_comparison(parsed, out / parsed.name)  # rows and footnotes, as compare prints them
    if compared is not None:
        print_comparison(*compared)
    sweeping.print_outcome(study, parsed)
