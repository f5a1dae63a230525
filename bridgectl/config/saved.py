"""Reading a run directory's config.yaml, for every command that reads one: `compare` and `runs` (which leave out
and report a run whose file does not parse, and go on with the rest), and `eval`, `export`, `run --resume` and
`model.init_from` (which refuse it as bad input: exit 2 with Error: and Hint:, naming the file, never a YAML
traceback). A file cannot be read when it is missing or unreadable, is not UTF-8, does not parse as YAML (a
config.yaml written by a bridgectl that redacted its text held `entity: ***`, which YAML reads as an alias), or
holds something other than a mapping of config keys.

A file that parses may still have been cut short or lost keys, and a run resumed, evaluated or exported with defaults
in their place would use another config than the one it trained with. So bridgectl writes config.yaml between a first
line recording how many keys it holds and a last line marking its end (config_text), and check_whole refuses, naming
the missing keys, a file whose end line is gone or that holds fewer keys than its first line records. That is how
damage is told from age: a file an older bridgectl wrote holds every key it recorded, and only keys added since are
missing (they take their defaults, as they always did). A file written before the count was recorded has no first
line to go by; of it only what every version wrote is required: some keys, and `seed` last (the last key of every
config.yaml bridgectl wrote: a file cut short loses its end first)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bridgectl.errors import UserError

CONFIG_END = "# end of config.yaml"
"""The last line of every config.yaml bridgectl writes: a file without it was cut short."""


def count_keys(data: dict) -> int:
    """The keys of nested mapping `data` as its YAML lists them: each key whose value is not a non-empty mapping
    (a section's keys count, the section does not; an empty mapping such as `eval_sets: {}` counts as one)."""
    return sum(count_keys(value) if isinstance(value, dict) and value else 1 for value in data.values())


def config_text(data: dict) -> str:
    """The text of config.yaml for the plain (resolved, redacted) config `data`: its YAML between a first line
    recording how many keys it holds and CONFIG_END, which check_whole reads back."""
    body = OmegaConf.to_yaml(OmegaConf.create(data))
    return (
        f"# bridgectl run config: {count_keys(data)} keys; its last line is '{CONFIG_END}' "
        f"(bridgectl/config/saved.py)\n{body}{CONFIG_END}\n"
    )


DAMAGED_HINT = (
    "the run's config.yaml is damaged (edited by hand, or written by an older bridgectl that could write "
    "`***` unquoted): fix the line named, e.g. quote the value as '***', or leave the run out"
)
_HEADER = re.compile(r"# bridgectl run config: (\d+) keys\b")
LAST_KEY = "seed"
"""The last key of every config.yaml any bridgectl version wrote (the schema's last field)."""
CUT_HINT = (
    "bridgectl writes config.yaml whole and never fills a run's missing keys with defaults (the run would "
    "go on with another config): restore the file from a copy of the run directory, or start a new run"
)


def _present(data: dict, key: str) -> bool:
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_whole(path: Path, text: str, data: dict, schema_keys: Iterable[str]) -> None:
    """Raises UserError when config file `path` (its `text`, parsed as `data`) is not whole: cut short (its end line
    gone), or holding fewer keys than its first line records; for a file without that line (written before it
    existed), when it holds no key or does not end with LAST_KEY. The message names the schema's keys it lacks."""
    header = _HEADER.match(text)
    held = count_keys(data)
    if header is not None:
        recorded = int(header.group(1))
        problems = (
            [] if text.rstrip("\n").rpartition("\n")[2] == CONFIG_END else [f"its last line is not '{CONFIG_END}'"]
        )
        if held < recorded:
            problems.append(f"it holds {held} of the {recorded} keys its first line records")
    elif not data:
        problems = ["it holds no keys"]
    else:  # written before the count was recorded: only what every version wrote is required
        problems = (
            [] if list(data)[-1] == LAST_KEY else [f"it does not end with `{LAST_KEY}`, the last key bridgectl writes"]
        )
    if not problems:
        return
    missing = [key for key in schema_keys if not _present(data, key)]
    shown = ", ".join(missing[:12]) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
    raise UserError(
        f"{path} is cut short or has lost keys: {'; '.join(problems)}" + (f"; missing: {shown}" if missing else ""),
        CUT_HINT,
    )


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
    """A run's config.yaml typed by the schema (load_saved), with a file that does not parse refused as
    UserError naming it, as a config of another version already is."""
    try:
        return load_saved(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise unreadable(path, error) from None


def load_saved(path: Path) -> DictConfig:
    """A run's config.yaml, typed by the schema, once it is known whole (run_config.check_whole: a file cut short or
    missing keys is refused, naming them, not filled with defaults). Only keys added to the schema since an older
    bridgectl wrote the file take their defaults."""
    # the schema (and Hydra's config store) load only when a run's config is typed, not for reading one as data
    from bridgectl.config.keys import translate
    from bridgectl.config.schema import Config, schema_types

    saved = upgraded(read_config(path))
    check_whole(path, path.read_text(), saved, schema_types())
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), saved)
    except OmegaConfBaseException as error:
        raise UserError(
            f"{path} does not match this version's config: {translate(error).message}",
            "it was written by another bridgectl version or edited by hand",
        ) from None


def upgraded(saved: dict) -> dict:
    """A saved config (plain data) as this version reads it: renamed sections under their new names
    (config/keys.RENAMED), and for a recipe with a bridge stage, model.finetune set to what bridge.lower chose then
    (it alone decided what trained in such a run; model.finetune now does, with bridge.lower following it)."""
    from bridgectl.config.keys import RENAMED

    saved = {RENAMED.get(name, name): value for name, value in saved.items()}
    lower = (saved.get("bridge") or {}).get("lower")
    if lower is not None and "bridge" in ((saved.get("recipe") or {}).get("stages") or []):
        saved["model"] = {**(saved.get("model") or {}), "finetune": lower}
    return saved
