"""Reading a run directory's config.yaml, for every command that reads one: `compare` and `runs` (which leave out
and report a run whose file does not parse, and go on with the rest), and `eval`, `export`, `run --resume` and
`model.init_from` (which refuse it as bad input: exit 2 with Error: and Hint:, naming the file, never a YAML
traceback). A file cannot be read when it is missing or unreadable, is not UTF-8, does not parse as YAML (a
config.yaml written by a bridgectl that redacted its text held `entity: ***`, which YAML reads as an alias), or
holds something other than a mapping of config keys."""

from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from bridgectl.errors import UserError

DAMAGED_HINT = ("the run's config.yaml is damaged (edited by hand, or written by an older bridgectl that could write "
                "`***` unquoted): fix the line named, e.g. quote the value as '***', or leave the run out")


def unreadable(path: Path, error: Exception) -> UserError:
    """The UserError for config file `path` that failed to load with `error`: one line naming the file and where
    it broke (line and column for YAML's own errors)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        what = f"does not parse as YAML (line {mark.line + 1}, column {mark.column + 1}: {error.problem})"
    elif isinstance(error, yaml.YAMLError):
        what = f"does not parse as YAML ({str(error).strip().splitlines()[0]})"
    elif isinstance(error, UnicodeDecodeError):
        what = "is not UTF-8 text"
    elif isinstance(error, OSError):
        what = f"cannot be read ({error.strerror or type(error).__name__})"
    else:
        what = f"does not hold a mapping of config keys ({error})"
    return UserError(f"{path} {what}", DAMAGED_HINT)


def read_config(path: Path) -> dict:
    """The config in YAML file `path` as plain data, read by OmegaConf's YAML rules (as load_run_config reads it).
    Raises UserError (unreadable) when the file cannot be read, does not parse or is not a mapping."""
    try:
        content = OmegaConf.load(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise unreadable(path, error) from None
    if not isinstance(content, DictConfig):
        raise unreadable(path, ValueError(f"a {type(content).__name__.removesuffix('Config').lower()} at the top"))
    return OmegaConf.to_container(content)


def config_problem(run_path: Path) -> str | None:
    """Why the config.yaml of run directory `run_path` cannot be read, as "config.yaml does not parse ..." (the run
    is named beside it), or None when it reads or there is none (runs made before config.yaml existed, which
    `compare` reads as an empty config)."""
    path = run_path / "config.yaml"
    if not path.exists():
        return None
    try:
        read_config(path)
    except UserError as error:
        return error.message.replace(str(path), "config.yaml", 1)
    return None


def load_run_config(path: Path) -> DictConfig:
    """A run's config.yaml typed by the schema (config.load_saved), with a file that does not parse refused as
    UserError naming it, as a config of another version already is."""
    from bridgectl.config import load_saved  # Hydra and the schema load only when a run's config is

    try:
        return load_saved(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise unreadable(path, error) from None
