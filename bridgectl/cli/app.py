"""`bridgectl`: the command-line entry point. Each command (one module of bridgectl/cli/ each) checks its input
before anything is written, calls the package that does the work and prints its result; errors are printed as
`Error:` + `Hint:` with exit code 2 (bad input), 1 (training failed) or 130 (interrupted). Set BRIDGECTL_DEBUG=1
to see full tracebacks."""

from __future__ import annotations

import sys

import typer

from bridgectl.cli import compare, evaluate, recipes, run, runs, sweep
from bridgectl.cli.common import print_error
from bridgectl.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="Compare SFT, RL, two-stage, interleaved and BRIDGE post-training recipes.",
)
app.command()(run.run)
app.command()(recipes.recipes)
app.command("compare")(compare.compare_command)
app.command("runs")(runs.runs_command)
app.command("sweep")(sweep.sweep_command)
app.command("eval")(evaluate.eval_command)
app.command("export")(evaluate.export_command)
app.command("build-tiny")(recipes.build_tiny)


def main() -> None:
    try:
        app()
    except UserError as error:  # raised outside a command's own handling
        print_error(error.message, error.hint)
        sys.exit(2)


if __name__ == "__main__":
    main()
