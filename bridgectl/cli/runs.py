"""`bridgectl runs`: the runs under a directory, with their status."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from bridgectl.cli.common import (
    fail,
)
from bridgectl.core.ui import console
from bridgectl.errors import UserError


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
        fail(error.message, error.hint, 2)
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
