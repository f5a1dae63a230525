"""`bridgectl eval` and `bridgectl export`: scoring a run or model, and a run as a standalone model."""

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
        fail(error.message, error.hint, 2)
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
        fail(error.message, error.hint, 2)
    console.print(f"exported {escape(what)} to {out}")
