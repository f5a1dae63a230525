"""`bridgectl run`: one training run, here, in several processes (torchrun) or as a cluster job."""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from omegaconf import OmegaConf
from rich.markup import escape
from rich.table import Table

from bridgectl.cli.common import (
    check_executor,
    checked_launcher_options,
    fail,
    resolve_overrides,
)
from bridgectl.config.compose import compose, stage_budgets
from bridgectl.core.ui import console
from bridgectl.errors import UserError


def _default_name(cfg) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.recipe.name}-{cfg.task.name}-seed{cfg.seed}-{stamp}"


def run(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="Hydra overrides, e.g. recipe=rl seed=1 train.max_steps=40"
    ),
    out: Path = typer.Option(Path("runs"), "--out", help="Directory that holds run directories."),
    name: Optional[str] = typer.Option(None, "--name", help="Run directory name (default: recipe-task-seed-time)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and plan; write nothing."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue this run directory from its newest checkpoint."
    ),
    allow_change: Optional[List[str]] = typer.Option(
        None, "--allow-change", help="With --resume: a config key the overrides may change (repeatable)."
    ),
    nproc: int = typer.Option(
        1, "--nproc", help="Data-parallel processes (one per GPU; gloo processes on CPU), launched through torchrun."
    ),
    nnodes: int = typer.Option(
        1,
        "--nnodes",
        help="Machines the run spans (torchrun's name): start the same command on each, with --rdzv-endpoint and --name; --out must be on a file system every node sees.",
    ),
    rdzv_endpoint: Optional[str] = typer.Option(
        None,
        "--rdzv-endpoint",
        help="HOST:PORT of the rendezvous every node joins (torchrun's c10d rendezvous; any node's address).",
    ),
    rdzv_id: Optional[str] = typer.Option(
        None, "--rdzv-id", help="The rendezvous id, the same on every node (default: the run's name)."
    ),
    launcher: str = typer.Option(
        "local",
        "--launcher",
        help="local (torchrun here), slurm (one job of --nnodes tasks submitted through submitit, each a torchrun node) or submitit-local (that job on this machine).",
    ),
    launcher_opt: Optional[List[str]] = typer.Option(
        None,
        "--launcher-opt",
        help="KEY=VALUE for submitit's update_parameters, e.g. timeout_min=240, slurm_partition=gpu, gpus_per_node=8 (repeatable).",
    ),
) -> None:
    """Train one recipe into a new run directory and print eval accuracy before and after."""
    on_cluster = launcher != "local" and "LOCAL_RANK" not in os.environ
    try:
        launcher_options = checked_launcher_options(launcher, launcher_opt)
        if on_cluster and (rdzv_endpoint or rdzv_id):
            raise UserError(
                "--rdzv-endpoint and --rdzv-id are set by the job with --launcher "
                f"{launcher}: its first node hosts the rendezvous",
                "drop them",
            )
        if resume is not None:
            from bridgectl.training.resume import resume_config

            cfg, run_path = resume_config(resume, list(overrides or []), list(allow_change or []))
        else:
            if allow_change:
                raise UserError("--allow-change applies to --resume only", "drop it, or add --resume RUN_DIR")
            cfg = compose(resolve_overrides(list(overrides or [])))
            from bridgectl.rundir.paths import new_run_path

            if nnodes > 1 and name is None and not on_cluster:
                raise UserError(
                    "--nnodes needs --name: every node must write to the same run directory",
                    "add --name NAME (the default name holds each node's own start time)",
                )
            run_path = new_run_path(out, name if name is not None else _default_name(cfg))
            # torchrun's processes: the launcher checked; several nodes: rank 0 claims the directory once the
            # processes have met (another node's launcher may already have started it)
            if run_path.exists() and "LOCAL_RANK" not in os.environ and (nnodes == 1 or on_cluster):
                raise UserError(
                    f"run directory {run_path} already exists",
                    "choose another --name or --out (runs are never overwritten), or continue it "
                    f"with --resume {run_path}",
                )
        budgets = stage_budgets(cfg)
        if nproc < 1 or nnodes < 1:
            raise UserError(f"--nproc and --nnodes must be at least 1, got {nproc} and {nnodes}", "e.g. --nproc 2")
        if nnodes > 1 and rdzv_endpoint is None and not on_cluster:
            raise UserError(
                "--nnodes needs --rdzv-endpoint HOST:PORT, where the nodes meet",
                "give one node's address and a free port, the same on every node: --rdzv-endpoint node1:29500",
            )
        from bridgectl.core.distributed import check_batch_split

        check_batch_split(cfg, nproc * nnodes)
        from bridgectl.tasks.rewards import load_reward_functions

        load_reward_functions(cfg.task)  # imports task.reward_funcs: a bad one exits 2 before --nproc launches
        if on_cluster:
            check_executor(launcher, launcher_options)
    except UserError as error:
        fail(error.message, error.hint, 2)
    plan = ", ".join(f"{kind} x {steps}" for kind, steps in zip(cfg.recipe.stages, budgets))
    if dry_run:  # plain output, not the console's: it would wrap long strings at the terminal width, breaking YAML
        typer.echo(OmegaConf.to_yaml(cfg, resolve=True))
        console.print(f"plan: recipe {cfg.recipe.name}: {plan} steps -> {run_path}")
        return
    if on_cluster:
        _run_as_job(
            launcher,
            launcher_options,
            nproc,
            nnodes,
            list(overrides or []),
            run_path,
            resume is not None,
            list(allow_change or []),
            sum(budgets),
        )
        return
    worker_rank = int(os.environ.get("RANK", "0"))  # set by torchrun in the processes it starts
    if (nproc > 1 or nnodes > 1) and "LOCAL_RANK" not in os.environ:
        from bridgectl.launch.torchrun import Rendezvous, launch_data_parallel

        rendezvous = Rendezvous(nnodes, rdzv_endpoint, rdzv_id or run_path.name) if nnodes > 1 else None
        returncode = launch_data_parallel(
            nproc, list(overrides or []), run_path, resume, list(allow_change or []), rendezvous
        )
        if returncode != 0:  # torchrun's exit status becomes ours
            raise typer.Exit(returncode)
        return
    if worker_rank == 0:
        console.print(
            f"[bold]bridgectl run[/bold] recipe [cyan]{cfg.recipe.name}[/cyan] ({plan} steps), "
            f"task {cfg.task.name}, model {cfg.model.name}, seed {cfg.seed} -> {run_path}"
        )
    from bridgectl.launch.torchrun import run_tags
    from bridgectl.training.runner import run as run_training  # torch and transformers load only when training

    try:
        summary = run_training(
            cfg, run_path, resume=resume is not None, show_progress=worker_rank == 0, tags=run_tags()
        )
    except KeyboardInterrupt as stopped:
        console.print(
            f"Interrupted: {run_path} has status 'interrupted' ({escape(str(stopped) or 'Ctrl-C')}); "
            f"continue with: bridgectl run --resume {run_path}"
        )
        from bridgectl.launch.torchrun import record_exit_status

        record_exit_status(130)
        raise typer.Exit(130) from None
    except UserError as error:  # found while loading data or the model; the run directory was removed
        fail(error.message, error.hint, 2)
    except Exception as error:
        if os.environ.get("BRIDGECTL_DEBUG"):
            raise
        fail(
            f"training failed: {type(error).__name__}: {error}",
            f"the run directory {run_path} has the details; set BRIDGECTL_DEBUG=1 for a traceback",
            1,
        )
    if "LOCAL_RANK" in os.environ:
        from bridgectl.core.distributed import shutdown

        shutdown()
    if worker_rank == 0:
        _print_eval_table(summary, run_path)
    if "LOCAL_RANK" in os.environ:
        # A torchrun worker whose run completed leaves at once, skipping the interpreter's teardown of torch's C++
        # state: twice in about forty sharded test runs under load, a worker aborted there ("terminate called
        # without an active exception", SIGABRT) after its run had completed and been written, failing the launch.
        # Not reproduced alone, cause not pinned down. Everything is written; the verifier helper stops on EOF.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _run_as_job(
    launcher: str,
    options: dict,
    nproc: int,
    nnodes: int,
    overrides: list[str],
    run_path: Path,
    resume: bool,
    allow_change: list[str],
    total_steps: int,
) -> None:
    """`bridgectl run --launcher slurm|submitit-local`: one job of `nnodes` torchrun tasks (bridgectl/launch/cluster.py),
    waited for with the run's progress; exits with the run's status."""
    import json

    from bridgectl.launch.cluster import submit_run, wait_for_job

    try:
        job = submit_run(launcher, options, nproc, nnodes, overrides, run_path, resume, allow_change)
    except UserError as error:
        fail(error.message, error.hint, 2)
    console.print(
        f"submitted job {job.job_id}: {nnodes} node(s) x {nproc} process(es) -> {run_path} "
        f"(job files in {job.paths.folder})"
    )
    try:
        status = wait_for_job(job, run_path, total_steps)
    except RuntimeError as error:
        fail(str(error), f"the job's log: {job.paths.stdout}", 1)
    if status == 130:
        console.print(
            f"Interrupted: job {job.job_id} cancelled; continue with: bridgectl run --resume {run_path} "
            f"--launcher {launcher} ..."
        )
    if status != 0:
        raise typer.Exit(status)
    _print_eval_table(json.loads((run_path / "summary.json").read_text()), run_path)


def _print_eval_table(summary: dict, run_path: Path) -> None:
    table = Table(title=f"{summary['recipe']}: greedy pass@1 ({summary['wall_s']:.0f} s)")
    for column in ("split", "n", "before %", "after %", "change (points)"):
        table.add_column(column, justify="right" if column != "split" else "left")
    for split, result in summary["eval"].items():
        before = summary["eval_initial"][split]["accuracy"]
        after = result["accuracy"]
        # a change of accuracy is in percentage points, not a percentage of the starting accuracy
        table.add_row(
            split, str(result["n"]), f"{100 * before:.1f}", f"{100 * after:.1f}", f"{100 * (after - before):+.1f}"
        )
    console.print(table)
    console.print(f"run directory: {run_path}")
