"""What every command shares: printing an error with its hint and exit code, KEY=VALUE options, recipe
files given as overrides, and the launcher options run and sweep take."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer
import yaml
from rich.markup import escape

from bridgectl.config.compose import register_recipe_file
from bridgectl.core.ui import console
from bridgectl.errors import UserError
from bridgectl.launch.cluster import LAUNCHERS, make_executor


def print_error(message: str, hint: str) -> None:
    console.print(f"[red]Error:[/red] {escape(message)}")  # escape: `[sft, rl]` is not rich markup
    if hint:
        console.print(f"Hint: {escape(hint)}")


def fail(message: str, hint: str, code: int) -> None:
    print_error(message, hint)
    from bridgectl.launch.torchrun import record_exit_status

    record_exit_status(code)  # a torchrun worker: its launcher exits with this status (bridgectl/launch/torchrun.py)
    raise typer.Exit(code)


def parse_key_values(items: list[str], option: str) -> dict:
    """KEY=VALUE strings to a dict; values that read as numbers or booleans become those (YAML rules)."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{option} expects KEY=VALUE, got '{item}'", f"e.g. {option} timeout_min=120")
        parsed[key] = yaml.safe_load(value) if value else value
    return parsed


def resolve_overrides(overrides: list[str]) -> list[str]:
    """A `recipe=path/to/file.yaml` override registers that file as a recipe and selects it."""
    resolved = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "recipe" and value.endswith((".yaml", ".yml")):
            value = register_recipe_file(Path(value))
        resolved.append(f"{key}={value}" if _ else item)
    return resolved


def checked_launcher_options(launcher: str, launcher_opt: list[str] | None) -> dict:
    """--launcher checked and --launcher-opt KEY=VALUE parsed (run and sweep take both)."""
    if launcher not in LAUNCHERS:
        raise UserError(f"unknown launcher '{launcher}'", f"choose one of: {', '.join(LAUNCHERS)}")
    options = parse_key_values(launcher_opt or [], "--launcher-opt")
    if options and launcher == "local":
        raise UserError(
            "--launcher-opt applies to --launcher slurm or submitit-local", "drop it, or add --launcher slurm"
        )
    return options


def check_executor(launcher: str, options: dict) -> None:
    """submitit takes the launcher and its settings: checked in a scratch folder, so nothing is written before a
    job is submitted."""
    with tempfile.TemporaryDirectory() as scratch:
        make_executor(launcher, Path(scratch), options)
