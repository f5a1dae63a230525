"""Composing a run's config: `compose(overrides)` builds it exactly as `bridgectl run` does (Hydra's compose API over
the YAML files in `bridgectl/conf/`, typed by the schema: bridgectl/schema.py and each stage's
stages/<stage>_config.py), then `validate` (bridgectl/config_checks.py) rejects values no run could use. Also:
overrides applied to a saved config, a saved config read back, users' recipe files, and each stage's step budget.
Every problem is raised as `UserError`, which the CLI prints as `Error:` + `Hint:` and exit code 2.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bridgectl.config_checks import validate
from bridgectl.config_keys import RENAMED, first_line, translate, unknown_key
from bridgectl.errors import UserError
from bridgectl.schema import CONF_DIR, Config, group_options, schema_types, user_recipes

__all__ = ["CONF_DIR", "apply_overrides", "compose", "group_options", "load_saved", "register_recipe_file",
           "stage_budgets", "upgraded", "validate"]

DICT_FIELDS = ("task.eval_sets",)  # config keys whose value is a {name: value} mapping


def register_recipe_file(path: Path) -> str:
    """Makes a user's recipe YAML selectable as `recipe=<its stem>`. The file holds `recipe:` (and optionally
    `train:` or any other section), like the shipped recipes; command-line overrides still win over it."""
    if not path.is_file():
        raise UserError(f"recipe file {path} does not exist", "give a path to a YAML file like bridgectl/conf/recipe/two_stage.yaml")
    try:
        content = OmegaConf.load(path)
    except Exception as error:  # yaml's own errors: any unreadable file is bad input
        raise UserError(f"recipe file {path} is not valid YAML: {first_line(error)}", "check its indentation") from None
    if not isinstance(content, DictConfig) or "recipe" not in content:
        raise UserError(f"recipe file {path} has no `recipe:` section",
                        "write `recipe: {name: mine, stages: [sft, rl]}` at the top level")
    try:  # check every key and type against the schema before the file becomes selectable
        OmegaConf.merge(OmegaConf.structured(Config), content)
    except OmegaConfBaseException as error:
        translated = translate(error)
        raise UserError(f"in recipe file {path}: {translated.message}", translated.hint) from None
    name = f"file:{path.stem}"
    ConfigStore.instance().store(group="recipe", name=name, node=content, package="_global_")
    user_recipes.add(name)
    return name


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The resolved, typed, validated config for these Hydra overrides."""
    # Hydra refuses new keys in a dict-valued field (`task.eval_sets={test: a.jsonl}`) unless forced with ++
    overrides = [f"++{item}" if item.split("=", 1)[0] in DICT_FIELDS else item for item in overrides]
    for group in ("recipe", "task", "model", "experiment"):
        for item in overrides:
            if item.startswith(f"{group}=") and item.split("=", 1)[1] not in group_options(group):
                raise UserError(f"unknown {group} '{item.split('=', 1)[1]}'",
                                f"choose one of: {', '.join(group_options(group))}")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise translate(error) from None
    validate(cfg)
    return cfg


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """Applies Hydra-syntax `key=value` overrides to an already resolved config (a run's config.yaml) in place and
    returns the keys whose value changed. Unknown keys and unparsable values are UserErrors."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    changed = []
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as error:
        raise UserError(f"bad override: {first_line(error)}", "overrides look like key=value, e.g. eval.n=500") from None
    for override in parsed:
        key = override.key_or_group
        if key in ("recipe", "task", "model") and isinstance(override.value(), str):  # a config group choice
            chosen, current = override.value(), cfg[key].name
            if chosen != current and Path(chosen).stem != current:
                raise UserError(f"{key}={chosen} does not match the saved config ({key} {current})",
                                f"a run keeps its {key}; start a new run for {chosen}")
            continue
        missing = object()
        before = OmegaConf.select(cfg, key, default=missing)
        if before is missing:
            raise unknown_key(key)
        try:
            OmegaConf.update(cfg, key, override.value(), merge=False)
        except OmegaConfBaseException as error:
            raise translate(error) from None
        after = OmegaConf.select(cfg, key)
        plain = (lambda v: OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v)
        if plain(before) != plain(after):
            changed.append(key)
    return changed


def load_saved(path: Path) -> DictConfig:
    """A run's config.yaml, typed by the schema, once it is known whole (run_config.check_whole: a file cut short or
    missing keys is refused, naming them, not filled with defaults). Only keys added to the schema since an older
    bridgectl wrote the file take their defaults."""
    from bridgectl.run_config import check_whole, read_config

    saved = upgraded(read_config(path))
    check_whole(path, path.read_text(), saved, schema_types())
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), saved)
    except OmegaConfBaseException as error:
        raise UserError(f"{path} does not match this version's config: {translate(error).message}",
                        "it was written by another bridgectl version or edited by hand") from None


def upgraded(saved: dict) -> dict:
    """A saved config (plain data) as this version reads it: renamed sections under their new names
    (config_keys.RENAMED), and for a recipe with a bridge stage, model.finetune set to what bridge.lower chose then
    (it alone decided what trained in such a run; model.finetune now does, with bridge.lower following it)."""
    saved = {RENAMED.get(name, name): value for name, value in saved.items()}
    lower = (saved.get("bridge") or {}).get("lower")
    if lower is not None and "bridge" in ((saved.get("recipe") or {}).get("stages") or []):
        saved["model"] = {**(saved.get("model") or {}), "finetune": lower}
    return saved


def stage_budgets(cfg: DictConfig) -> list[int]:
    """Steps of each stage: explicit `recipe.steps`, else `train.max_steps` split by `recipe.fractions` (largest
    remainder, at least one step per stage), summing exactly to `train.max_steps`."""
    if cfg.recipe.steps is not None:
        return [int(s) for s in cfg.recipe.steps]
    fractions = list(cfg.recipe.fractions or [1.0] * len(cfg.recipe.stages))
    total = cfg.train.max_steps
    shares = [total * f / sum(fractions) for f in fractions]
    budgets = [int(share) for share in shares]
    # largest remainder first; ties go to the later stage
    by_remainder = sorted(range(len(shares)), key=lambda i: (shares[i] - budgets[i], i), reverse=True)
    for i in by_remainder[:total - sum(budgets)]:
        budgets[i] += 1
    for i, budget in enumerate(budgets):  # a stage rounded to zero takes a step from the largest one
        if budget == 0:
            budgets[budgets.index(max(budgets))] -= 1
            budgets[i] = 1
    return budgets
