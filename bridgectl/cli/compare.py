"""`bridgectl compare`: the comparison of finished runs (bridgectl/analysis/), in the terminal or as markdown,
csv, json, a report or a W&B run."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from bridgectl.cli.common import (
    fail,
)
from bridgectl.core.ui import console
from bridgectl.errors import UserError


def print_comparison(rows: list, notes: list[str]) -> None:
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
        fail(error.message, error.hint, 2)
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
        print_comparison(rows, notes)
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
