"""Keys and types: unknown keys (with bridgectl's name for a TRL name, or the closest key), values of the wrong type,
keys added or removed by Hydra's `+key` / `~key`, each as a UserError with a hint naming what the key takes."""

from __future__ import annotations

import difflib
from typing import Any, Union, get_args, get_origin

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from bridgectl.config.schema import example, schema_defaults, schema_types
from bridgectl.config.trl_names import trl_hint
from bridgectl.errors import UserError

RENAMED = {"interleave": "interleaved"}
"""Sections renamed since an earlier version: old name -> new (a saved config.yaml is read with the new name)."""


def first_line(error: Exception) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def translate(error: Exception) -> UserError:
    """Hydra/OmegaConf errors as one readable line and a hint naming the valid choices."""
    cause = error.__cause__ or error
    full_key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and full_key:
        return unknown_key(full_key)
    if isinstance(cause, ValidationError) and full_key:
        return UserError(f"bad value for '{full_key}': {first_line(cause)}", type_hint(full_key))
    return UserError(
        first_line(error), "overrides look like key=value, e.g. `bridgectl run recipe=rl train.max_steps=40 seed=1`"
    )


def unknown_key(full_key: str) -> UserError:
    """An unknown key, with bridgectl's name for a TRL name (trl_names.py), else the closest key of its section."""
    section, _, rest = full_key.partition(".")
    if section in RENAMED:
        new = RENAMED[section]
        return UserError(
            f"unknown key '{full_key}'", f"the {section} section is now {new}: write {new}.{rest or '<key>'}"
        )
    parent, _, leaf = full_key.rpartition(".")
    if trl_hint(leaf):
        return UserError(f"unknown key '{full_key}'", trl_hint(leaf))
    node = OmegaConf.select(schema_defaults(), parent) if parent else schema_defaults()
    valid = list(node.keys()) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f"did you mean '{parent + '.' if parent else ''}{close[0]}'? " if close else ""
    return UserError(f"unknown key '{full_key}'", hint + f"keys under '{parent or 'the root'}': {', '.join(valid)}")


_SINGULAR = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
_PLURAL = {int: "whole numbers", float: "numbers", bool: "true/false values", str: "strings"}


def _type_words(kind: Any) -> str:
    if get_origin(kind) is Union:  # Optional[X]
        return _type_words(next(arg for arg in get_args(kind) if arg is not type(None))) + " or null"
    if get_origin(kind) is list:
        return f"a list of {_PLURAL[get_args(kind)[0]]}"
    if get_origin(kind) is dict:
        return f"a mapping of names to {_PLURAL[get_args(kind)[1]]}"
    return _SINGULAR.get(kind, str(kind))


def type_hint(full_key: str) -> str:
    """What a key takes, and its default as an override, for a value of the wrong type."""
    key = full_key.split("[")[0]  # a list element: task.train_ops[0]
    while key and key not in schema_types():  # an entry of a mapping: task.eval_sets.test
        key = key.rpartition(".")[0]
    if not key:  # a whole section: model.pretrain=3
        first = next((name for name in schema_types() if name.startswith(f"{full_key}.")), None)
        return (
            f"{full_key} is a section: set its keys one by one, e.g. {first}={example(first)}"
            if first
            else "`bridgectl run --dry-run` shows every key with a value of the right type"
        )
    default = example(key)
    if isinstance(default, (ListConfig, list)):
        written = "[" + ",".join(str(item) for item in default) + "]" if len(default) else ""
    else:
        written = str(default).lower() if isinstance(default, bool) else str(default)
    shown = f", e.g. {key}={written}" if written and written != "None" and not any(c in written for c in " \n{") else ""
    return f"{key} takes {_type_words(schema_types()[key])}{shown} (`bridgectl run --dry-run` shows every key)"


def check_keys(cfg: DictConfig) -> None:
    """The schema's keys, each with a value, and no others: Hydra's `+key=value` adds a key and `~key` deletes one
    even under the typed schema, and its merge lets lists into a list or mapping of plain values."""
    types = schema_types()
    seen = set()

    def walk(node: dict, prefix: str) -> None:
        for name, value in node.items():
            key = f"{prefix}{name}"
            if key not in types and not isinstance(value, dict):
                raise unknown_key(key)
            if key not in types:
                walk(value, f"{key}.")
                continue
            seen.add(key)
            if value == "???":
                raise UserError(f"{key} has no value", f"give it {_type_words(types[key])}: {key}=...")
            items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
            if any(isinstance(item, (dict, list)) for item in items):
                raise UserError(f"bad value for '{key}': a list or mapping inside it", type_hint(key))

    try:  # resolved: an interpolation (seed=${train.max_steps}) must name a key, and give a value of the right type
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as error:
        raise UserError(
            f"bad value for '{error.full_key}': {first_line(error)}",
            "an interpolation ${key} names an existing key whose value fits, e.g. eval.temperature=${rl.temperature}",
        ) from None
    walk(plain, "")
    for key in [key for key in types if key not in seen]:  # schema order: ~rl names rl.lr
        raise UserError(
            f"'{key}' has no value (removed with ~?)",
            f"every key keeps a value; set it instead, e.g. {key}={example(key)}",
        )
