"""Composing a run's config: `compose(overrides)` builds it exactly as `bridgectl run` does (Hydra's compose API over
the YAML files in `bridgectl/conf/`, typed by the schema: bridgectl/config/schema.py and each stage's
stages/<stage>_config.py), then `validate` (bridgectl/config/checks.py) rejects values no run could use. Also:
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

from bridgectl.config.checks import validate
from bridgectl.config.keys import first_line, translate, unknown_key
from bridgectl.config.schema import CONF_DIR, Config, group_options, user_recipes
from bridgectl.errors import UserError

__all__ = [
    "CONF_DIR",
    "apply_overrides",
    "compose",
    "group_options",
    "register_recipe_file",
    "stage_budgets",
    "validate",
]

DICT_FIELDS = ("task.eval_sets",)  # config keys whose value is a {name: value} mapping


def register_recipe_file(path: Path) -> str:
    """Makes a user's recipe YAML selectable as `recipe=<its stem>`. The file holds `recipe:` (and optionally
    `train:` or any other section), like the shipped recipes; command-line overrides still win over it."""
    if not path.is_file():
        raise UserError(
            f"recipe file {path} does not exist", "give a path to a YAML file like bridgectl/conf/recipe/two_stage.yaml"
        )
    try:
        content = OmegaConf.load(path)
    except Exception as error:  # yaml's own errors: any unreadable file is bad input
        raise UserError(f"recipe file {path} is not valid YAML: {first_line(error)}", "check its indentation") from None
    if not isinstance(content, DictConfig) or "recipe" not in content:
        raise UserError(
            f"recipe file {path} has no `recipe:` section",
            "write `recipe: {name: mine, stages: [sft, rl]}` at the top level",
        )
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
                raise UserError(
                    f"unknown {group} '{item.split('=', 1)[1]}'", f"choose one of: {', '.join(group_options(group))}"
                )
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise translate(error) from None
    validate(cfg)
    return cfg


def _plain(value):
    """A config value as plain data (containers converted), so an override is compared by value."""
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """Applies Hydra-syntax `key=value` overrides to an already resolved config (a run's config.yaml) in place and
    returns the keys whose value changed. Unknown keys and unparsable values are UserErrors."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    changed = []
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as error:
        raise UserError(
            f"bad override: {first_line(error)}", "overrides look like key=value, e.g. eval.n=500"
        ) from None
    for override in parsed:
        key = override.key_or_group
        if key in ("recipe", "task", "model") and isinstance(override.value(), str):  # a config group choice
            chosen, current = override.value(), cfg[key].name
            if chosen != current and Path(chosen).stem != current:
                raise UserError(
                    f"{key}={chosen} does not match the saved config ({key} {current})",
                    f"a run keeps its {key}; start a new run for {chosen}",
                )
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
        if _plain(before) != _plain(after):
            changed.append(key)
    return changed


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
    for i in by_remainder[: total - sum(budgets)]:
        budgets[i] += 1
    for i, budget in enumerate(budgets):  # a stage rounded to zero takes a step from the largest one
        if budget == 0:
            budgets[budgets.index(max(budgets))] -= 1
            budgets[i] = 1
    return budgets
