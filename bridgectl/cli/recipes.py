"""`bridgectl recipes` and `bridgectl build-tiny`: what can be run, and the built-in tiny base model."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from bridgectl.cli.common import (
    fail,
)
from bridgectl.config.compose import compose, group_options, stage_budgets
from bridgectl.core.ui import console
from bridgectl.errors import UserError


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


def build_tiny(
    overrides: Optional[List[str]] = typer.Argument(None, help="Overrides of model.* and task.* keys."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write here instead of the cache."),
) -> None:
    """(Re)build the tiny base model's weights by deterministic pretraining on task text."""
    try:
        cfg = compose(list(overrides or []))
    except UserError as error:
        fail(error.message, error.hint, 2)
    from bridgectl.models import tiny

    if out is not None:
        if out.exists():
            fail(f"{out} already exists", "give a new directory; nothing is overwritten", 2)
        path = tiny.pretrain(cfg.model, cfg.task, out)
    else:
        path = tiny.base_model_dir(cfg.model, cfg.task)
    console.print(f"tiny base model: {path}")
