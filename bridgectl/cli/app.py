"""`bridgectl`: the command-line entry point. Each command checks its input before anything is written, calls the
module that does the work (runner, sweep, evaluation, compare, ...) and prints its result; errors are printed as
`Error:` + `Hint:` with exit code 2 (bad input), 1 (training failed) or 130 (interrupted). Set BRIDGECTL_DEBUG=1
to see full tracebacks."""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import typer
import yaml
from omegaconf import OmegaConf
from rich.markup import escape
from rich.table import Table

from bridgectl.config.compose import compose, group_options, register_recipe_file, stage_budgets
from bridgectl.core.ui import console
from bridgectl.errors import UserError
from bridgectl.launch.cluster import LAUNCHERS, make_executor

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="Compare SFT, RL, two-stage, interleaved and BRIDGE post-training recipes.",
)


def _print_error(message: str, hint: str) -> None:
    console.print(f"[red]Error:[/red] {escape(message)}")  # escape: `[sft, rl]` is not rich markup
    if hint:
        console.print(f"Hint: {escape(hint)}")


def _fail(message: str, hint: str, code: int) -> None:
    _print_error(message, hint)
    from bridgectl.launch.torchrun import record_exit_status

    record_exit_status(code)  # a torchrun worker: its launcher exits with this status (bridgectl/launch/torchrun.py)
    raise typer.Exit(code)


def _key_values(items: list[str], option: str) -> dict:
    """KEY=VALUE strings to a dict; values that read as numbers or booleans become those (YAML rules)."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{option} expects KEY=VALUE, got '{item}'", f"e.g. {option} timeout_min=120")
        parsed[key] = yaml.safe_load(value) if value else value
    return parsed


def _resolve_overrides(overrides: list[str]) -> list[str]:
    """A `recipe=path/to/file.yaml` override registers that file as a recipe and selects it."""
    resolved = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "recipe" and value.endswith((".yaml", ".yml")):
            value = register_recipe_file(Path(value))
        resolved.append(f"{key}={value}" if _ else item)
    return resolved


def _launcher_options(launcher: str, launcher_opt: list[str] | None) -> dict:
    """--launcher checked and --launcher-opt KEY=VALUE parsed (run and sweep take both)."""
    if launcher not in LAUNCHERS:
        raise UserError(f"unknown launcher '{launcher}'", f"choose one of: {', '.join(LAUNCHERS)}")
    options = _key_values(launcher_opt or [], "--launcher-opt")
    if options and launcher == "local":
        raise UserError(
            "--launcher-opt applies to --launcher slurm or submitit-local", "drop it, or add --launcher slurm"
        )
    return options


def _check_executor(launcher: str, options: dict) -> None:
    """submitit takes the launcher and its settings: checked in a scratch folder, so nothing is written before a
    job is submitted."""
    with tempfile.TemporaryDirectory() as scratch:
        make_executor(launcher, Path(scratch), options)


def _default_name(cfg) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.recipe.name}-{cfg.task.name}-seed{cfg.seed}-{stamp}"


@app.command()
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
        launcher_options = _launcher_options(launcher, launcher_opt)
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
            cfg = compose(_resolve_overrides(list(overrides or [])))
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
            _check_executor(launcher, launcher_options)
    except UserError as error:
        _fail(error.message, error.hint, 2)
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
        _fail(error.message, error.hint, 2)
    except Exception as error:
        if os.environ.get("BRIDGECTL_DEBUG"):
            raise
        _fail(
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
        _fail(error.message, error.hint, 2)
    console.print(
        f"submitted job {job.job_id}: {nnodes} node(s) x {nproc} process(es) -> {run_path} "
        f"(job files in {job.paths.folder})"
    )
    try:
        status = wait_for_job(job, run_path, total_steps)
    except RuntimeError as error:
        _fail(str(error), f"the job's log: {job.paths.stdout}", 1)
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


@app.command()
def recipes() -> None:
    """List the built-in recipes and their stages."""
    table = Table(title="recipes (bridgectl run recipe=NAME)")
    for column in ("recipe", "stages", "default steps", "what it does"):
        table.add_column(column)
    for option in group_options("recipe"):
        cfg = compose([f"recipe={option}"])
        budgets = stage_budgets(cfg)
        stages = " -> ".join(f"{k}({b})" for k, b in zip(cfg.recipe.stages, budgets))
        table.add_row(option, stages, str(sum(budgets)), cfg.recipe.description)
    console.print(table)
    from bridgectl.stages import STAGES

    kinds = Table(title="stages (recipe.stages=[...]; one file each in bridgectl/stages/)")
    for column in ("stage", "update rule (keys)", "from"):
        kinds.add_column(column)
    for kind, info in STAGES.items():
        kinds.add_row(kind, info.rule, info.source)
    console.print(kinds)


def _print_comparison(rows: list, notes: list[str]) -> None:
    """compare.compare's rows (compare_rows.GroupRow) as one table per task and model, then the notes."""
    from bridgectl.analysis import tables

    for (task, model), section in tables.sections_of(rows).items():
        table = Table(title=f"task {task}, model {model}: final greedy pass@1")
        columns = tables.display_columns(section)
        for header, _ in columns:
            table.add_column(header)
        for row in section:
            table.add_row(*(escape(fn(row)) for _, fn in columns))
        console.print(table)
        header, lines = tables.differences_table(section)
        widths = [max(len(cell) for cell in column) for column in zip(header, *lines)] if lines else []
        if lines and sum(widths) + 3 * len(widths) + 1 <= console.width:
            differences = Table(title=tables.DIFFERENCES_TITLE, title_justify="left")
            for name in header:
                differences.add_column(escape(name))
            for cells in lines:
                differences.add_row(*(escape(cell) for cell in cells))
            console.print(differences)
        elif lines:  # one column per group would not fit: a line per key or fact
            console.print(escape(tables.DIFFERENCES_TITLE + ":"))
            for line in tables.differences_lines(header, lines):
                console.print("  " + escape(line))
    for note in notes:
        console.print(escape(note))


@app.command("compare")
def compare_command(
    paths: Optional[List[str]] = typer.Argument(
        None, help="Run directories, directories of runs, or globs (default: runs)."
    ),
    by: Optional[List[str]] = typer.Option(
        None, "--by", help="Config key(s) to group by (default: recipe); repeat for several."
    ),
    metric: str = typer.Option("eval/test/accuracy", "--metric", help="Metric for time-to-target."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Group to compare against (e.g. rl)."),
    pool: Optional[List[str]] = typer.Option(
        None,
        "--pool",
        help="Pool runs that differ in this config key (or section) into one group on purpose; the table says so. Repeat for several.",
    ),
    at_seconds: Optional[float] = typer.Option(
        None,
        "--at-seconds",
        help="Also show each eval metric as of this wall-clock second of every run (the equal-wall-clock view).",
    ),
    at_flops: Optional[float] = typer.Option(
        None,
        "--at-flops",
        help="Also show each eval metric as of this many FLOPs of every run's sampling and training (the equal-compute view; metrics.jsonl's compute/cum_flops).",
    ),
    at_tokens: Optional[float] = typer.Option(
        None,
        "--at-tokens",
        help="Also show each eval metric as of this many generated + trained tokens of every run (compute/cum_tokens).",
    ),
    output_format: str = typer.Option("table", "--format", help="table, markdown, csv or json."),
    report: Optional[Path] = typer.Option(
        None, "--report", help="Also write report.md, comparison.csv and PNG plots here."
    ),
    against: Optional[str] = typer.Option(
        None, "--against", help="Reference: recorded run directories or a published-results YAML in baselines/."
    ),
    wandb: bool = typer.Option(
        False, "--wandb", help="Also log the table and plots to W&B (offline without credentials)."
    ),
) -> None:
    """Compare finished runs side by side: mean, std and 95% t interval per group, Welch differences, costs."""
    from bridgectl.analysis import compare as comparison
    from bridgectl.analysis import tables

    try:
        if output_format not in ("table", "markdown", "csv", "json"):
            raise UserError(f"unknown --format '{output_format}'", "choose table, markdown, csv or json")
        loaded = comparison.load_runs(list(paths or ["runs"]))
        if not loaded.runs:
            raise UserError(
                "no completed runs to compare",
                "failed and interrupted runs are left out: "
                + ", ".join(f"{n} {s}" for s, n in loaded.left_out.items())
                + "".join(f"; {reason}" for reason in loaded.unreadable),
            )
        for option, value, example in (
            ("--at-seconds", at_seconds, "120"),
            ("--at-flops", at_flops, "2e12"),
            ("--at-tokens", at_tokens, "5e6"),
        ):
            if value is not None and value <= 0:
                raise UserError(f"{option} must be positive, got {value:g}", f"e.g. {option} {example}")
        rows = comparison.compare(
            loaded, list(by or ["recipe"]), metric, baseline, at_seconds, at_flops, at_tokens, pool=list(pool or [])
        )
        reference = comparison.load_reference(against, list(by or ["recipe"]), metric) if against else None
    except UserError as error:
        _fail(error.message, error.hint, 2)
    notes = tables.footnotes(loaded, rows)
    for reason in loaded.unreadable:  # on stderr: the table, CSV or JSON on stdout stays whole
        typer.echo(f"Warning: left out an unreadable run: {reason}", err=True)
    for copy in loaded.copies:
        typer.echo(f"Warning: counted once: {copy}", err=True)
    if loaded.malformed_lines:
        typer.echo(f"Warning: skipped {loaded.malformed_lines} malformed metrics.jsonl line(s)", err=True)
    if output_format == "markdown":
        typer.echo(tables.to_markdown(rows, notes), nl=False)
    elif output_format == "csv":
        typer.echo(tables.to_csv(rows), nl=False)
    elif output_format == "json":  # one JSON document, the --against deltas inside it
        against_entries = comparison.against_rows(rows, reference, metric) if reference is not None else None
        typer.echo(tables.to_json(rows, notes, against_entries))
    else:
        _print_comparison(rows, notes)
    if reference is not None and output_format != "json":
        typer.echo(comparison.against_markdown(comparison.against_rows(rows, reference, metric), reference))
    if report is not None or wandb:
        import tempfile

        from bridgectl.analysis.report import log_to_wandb, write_report

        report_dir = report or Path(tempfile.mkdtemp(prefix="bridgectl-report-"))
        written = write_report(loaded, rows, list(by or ["recipe"]), metric, report_dir)
        if report is not None:
            typer.echo(f"report: {len(written)} files in {report}", err=True)
        if wandb:
            directory = log_to_wandb(rows, [p for p in written if p.suffix == ".png"], list(by or ["recipe"]))
            typer.echo(f"W&B: logged to {directory}", err=True)


@app.command("runs")
def runs_command(
    directory: Path = typer.Argument(Path("runs"), help="A directory of runs, searched recursively (default: runs)."),
    output_format: str = typer.Option("table", "--format", help="table or json (one object per run)."),
) -> None:
    """List the runs under a directory: recipe, seed, status (running, died, completed, failed, interrupted),
    steps, final accuracy per eval split, wall-clock."""
    import json

    from bridgectl.analysis import runs as run_listing

    try:
        if output_format not in ("table", "json"):
            raise UserError(f"unknown --format '{output_format}'", "choose table or json")
        found = run_listing.list_runs(directory)
    except UserError as error:
        _fail(error.message, error.hint, 2)
    if output_format == "json":
        typer.echo(json.dumps(found, indent=2))
        return
    table = Table(title=f"runs under {escape(str(directory))}")
    columns = run_listing.table_columns(found)
    for header, _ in columns:
        table.add_column(header, justify="left" if header in ("run", "recipe", "status") else "right")
    for run_info in found:
        table.add_row(*(escape(cell(run_info)) for _, cell in columns))
    console.print(table)


@app.command("sweep")
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
        launcher_options = _launcher_options(launcher, launcher_opt)
        parsed = load_spec(spec, nproc, nnodes)
        if parsed.nnodes > 1 and launcher == "local":
            raise UserError(
                f"trials over {parsed.nnodes} nodes are cluster jobs",
                "add --launcher slurm (or submitit-local to try it on this machine)",
            )
        if launcher != "local":
            _check_executor(launcher, launcher_options)
    except UserError as error:
        _fail(error.message, error.hint, 2)
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
            _fail(error.message, error.hint, 2)
        except RuntimeError as error:  # a cluster job died; its trial is retried when the sweep resumes
            _fail(str(error), "re-run the same command to resume the study", 1)
    compared = sweeping.trial_comparison(parsed, out / parsed.name)  # rows and footnotes, as compare prints them
    if compared is not None:
        _print_comparison(*compared)
    sweeping.print_outcome(study, parsed)


@app.command("eval")
def eval_command(
    target: str = typer.Argument(..., help="A run directory (its checkpoints/final) or a model directory / Hub id."),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="Overrides, e.g. eval.n=500 eval.k=8 task.eval_sets={test:test.jsonl}"
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", help="JSON file to write (default: <run>/eval-<time>.json)."
    ),
    checkpoint: Optional[str] = typer.Option(
        None, "--checkpoint", help="A resumable checkpoint of the run (e.g. step-000050) instead of its final weights."
    ),
) -> None:
    """Greedy pass@1 (and pass@k, maj@k, mean@n with eval.k) of a trained run or a model on every eval split."""
    from bridgectl.core.evaluate import reported_ks
    from bridgectl.training.eval_run import run_eval

    try:
        results, path = run_eval(target, list(overrides or []), output, checkpoint_name=checkpoint)
    except UserError as error:
        _fail(error.message, error.hint, 2)
    table = Table(title=f"eval of {escape(target)}")
    sampled = any("k" in row for row in results.values())
    columns = ["split", "n", "greedy pass@1 %"] + (["j", "pass@j %", "maj@j %", "mean@n %"] if sampled else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, row in results.items():
        greedy = [split, str(row["n"]), f"{100 * row['greedy_pass@1']:.1f}"]
        if "k" not in row:
            table.add_row(*greedy, *([""] * (len(columns) - 3)))
            continue
        for index, j in enumerate(reported_ks(row["k"])):
            table.add_row(
                *(greedy if index == 0 else ["", "", ""]),
                str(j),
                f"{100 * row[f'pass@{j}']:.1f}",
                f"{100 * row[f'maj@{j}']:.1f}",
                f"{100 * row['mean@' + str(row['samples'])]:.1f}" if index == 0 else "",
            )
    console.print(table)
    for split, row in results.items():
        if "reward_mean" in row:
            parts = ", ".join(
                f"{key.split('/', 1)[1]} {value:.3f}" for key, value in row.items() if key.startswith("rewards/")
            )
            console.print(f"{split}: reward {row['reward_mean']:.3f} on the greedy answers ({parts})")
    if sampled:
        console.print(
            "pass@j: unbiased estimator 1 - C(n-c, j)/C(n, j) from n sampled answers per problem, c of "
            "them right; maj@j: majority vote of the first j; mean@n: mean reward of all n."
        )
    console.print(f"written to {path}")


@app.command("export")
def export_command(
    run_dir: Path = typer.Argument(..., help="A run directory made by bridgectl run."),
    out: Path = typer.Option(..., "--out", help="New (or empty) directory to write the model into."),
    checkpoint: Optional[str] = typer.Option(
        None, "--checkpoint", help="A resumable checkpoint of the run (e.g. step-000050) instead of its final weights."
    ),
    adapter_only: bool = typer.Option(
        False,
        "--adapter-only",
        help="Write one peft LoRA adapter over the run's base instead of a merged model (LoRA runs only).",
    ),
    push_to_hub: Optional[str] = typer.Option(
        None, "--push-to-hub", help="Also upload the directory to this Hub model repo (created if missing)."
    ),
) -> None:
    """Write a run's weights as a standalone Hugging Face model directory (adapters merged), or one LoRA adapter."""
    from bridgectl.training.export import export_run

    try:
        what = export_run(run_dir, out, checkpoint_name=checkpoint, adapter_only=adapter_only, push_to_hub=push_to_hub)
    except UserError as error:
        _fail(error.message, error.hint, 2)
    console.print(f"exported {escape(what)} to {out}")


@app.command("build-tiny")
def build_tiny(
    overrides: Optional[List[str]] = typer.Argument(None, help="Overrides of model.* and task.* keys."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write here instead of the cache."),
) -> None:
    """(Re)build the tiny base model's weights by deterministic pretraining on task text."""
    try:
        cfg = compose(list(overrides or []))
    except UserError as error:
        _fail(error.message, error.hint, 2)
    from bridgectl.models import tiny

    if out is not None:
        if out.exists():
            _fail(f"{out} already exists", "give a new directory; nothing is overwritten", 2)
        path = tiny.pretrain(cfg.model, cfg.task, out)
    else:
        path = tiny.base_model_dir(cfg.model, cfg.task)
    console.print(f"tiny base model: {path}")


def main() -> None:
    try:
        app()
    except UserError as error:  # raised outside a command's own handling
        _print_error(error.message, error.hint)
        sys.exit(2)


if __name__ == "__main__":
    main()
