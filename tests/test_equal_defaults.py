"""Equal defaults across recipes (issue 36, item 3): unless the user sets them, every recipe trains adapters of the
same rank, alpha and target modules, so a default comparison does not give one recipe more capacity; and the
"Defaults that differ, with model=hf" table (docs/guides/coming-from-trl.md) is the one bridgectl.config.defaults_table
renders from the config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.config.compose import CONF_DIR, compose
from bridgectl.config.defaults_table import (
    DEFAULTS_TABLE_END,
    DEFAULTS_TABLE_START,
    README,
    defaults_table,
    defaults_table_in,
    hf_defaults_config,
    with_defaults_table,
    write_defaults_table,
)

RECIPES = sorted(path.stem for path in (CONF_DIR / "recipe").glob("*.yaml"))
HF = ["model=hf", "model.name_or_path=x"]


def lora_settings(recipe: str | None) -> tuple[int, int, list[str]]:
    """(lora.rank, lora.alpha, lora.target_modules) of `recipe` (None: the default one) composed under model=hf,
    nothing else set."""
    cfg = compose([*HF, f"recipe={recipe}"] if recipe else HF)
    return cfg.lora.rank, cfg.lora.alpha, list(cfg.lora.target_modules)


@pytest.mark.slow
def test_every_shipped_recipe_trains_the_same_lora_parameters():
    # the glob finds every shipped recipe; these are the ones the issue names, so none may go missing unnoticed
    assert {"bridge", "rl", "sft", "two_stage", "mix", "chord", "bridge_no_meta", "bridge_no_upper"} <= set(RECIPES)
    settings = {recipe: lora_settings(recipe) for recipe in RECIPES}
    assert len({repr(value) for value in settings.values()}) == 1, settings
    assert settings["bridge"] == lora_settings(None)  # what a bare model=hf run (and the docs' table) gets


def dry_run_lora(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: str) -> dict:
    """The `lora:` section `bridgectl run --dry-run` prints for `recipe` under model=hf."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "--dry-run", "--out", str(tmp_path / "runs"), *HF, f"recipe={recipe}"])
    assert result.exit_code == 0, result.output
    printed, plan = result.output.split("\nplan: ", 1)  # the resolved config as YAML, then the plan line
    assert plan.startswith(f"recipe {recipe}:")
    return yaml.safe_load(printed)["lora"]


def test_dry_run_shows_bridge_and_rl_with_the_same_lora_rank(tmp_path, monkeypatch):
    bridge, rl = dry_run_lora(tmp_path, monkeypatch, "bridge"), dry_run_lora(tmp_path, monkeypatch, "rl")
    assert bridge["rank"] == rl["rank"] == compose(HF).lora.rank
    assert (bridge["alpha"], bridge["target_modules"]) == (rl["alpha"], rl["target_modules"])


def test_bridge_keeps_w_rank_as_its_own_setting():
    """w is BRIDGE's extra adapter: its rank stays bridge.w_rank, apart from theta's lora.rank."""
    cfg = compose([*HF, "recipe=bridge", "lora.rank=4", "bridge.w_rank=12"])
    assert (cfg.lora.rank, cfg.bridge.w_rank) == (4, 12)


# ---- the docs' defaults table ------------------------------------------------------------------------------
def test_readme_defaults_table_is_the_generated_one():
    """A changed default fails here until `python -m bridgectl.config.defaults_table` rewrites the docs page's block."""
    assert defaults_table_in(README.read_text()) == defaults_table()


def test_defaults_table_reads_bridgectls_column_from_the_config():
    cfg = hf_defaults_config()
    table = defaults_table(cfg)
    for key in (
        "rl.lr",
        "sft.lr",
        "rl.max_completion_length",
        "optim.schedule",
        "lora.rank",
        "model.finetune",
        "train.micro_batch_size",
    ):
        assert f"`{key}=" in table, key
    assert f"`lora.rank={cfg.lora.rank}`" in table
    assert f"= {cfg.rl.prompts_per_step * cfg.rl.num_generations} completions per update" in table
    changed = cfg.copy()
    OmegaConf.update(changed, "rl.lr", 3.0e-6)
    OmegaConf.update(changed, "lora.rank", 24)
    OmegaConf.update(changed, "rl.num_generations", 5)
    other = defaults_table(changed)
    assert "`rl.lr=3e-6`" in other and "`lora.rank=24`" in other and "`lora.rank=24`" not in table
    assert f"= {cfg.rl.prompts_per_step * 5} completions per update" in other
    assert other != table and len(other.splitlines()) == len(table.splitlines())


def test_a_key_the_config_lacks_is_an_error_not_a_blank_cell():
    cfg = OmegaConf.create(OmegaConf.to_container(hf_defaults_config()))  # untyped, so a key can go
    del cfg.rl["min_p"]  # as if the key had been renamed in the schema
    with pytest.raises(KeyError, match="rl.min_p"):
        defaults_table(cfg)


def test_rewriting_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    before, after = "# title\n\nintro:\n\n", "\nrest | of | file\n"
    readme.write_text(f"{before}{DEFAULTS_TABLE_START}\n| stale | table |\n{DEFAULTS_TABLE_END}{after}")
    assert write_defaults_table(readme)
    assert readme.read_text() == f"{before}{DEFAULTS_TABLE_START}\n{defaults_table()}{DEFAULTS_TABLE_END}{after}"
    assert not write_defaults_table(readme)  # already up to date: unchanged
    for broken in (
        "no markers at all",
        f"{DEFAULTS_TABLE_END}\n{DEFAULTS_TABLE_START}\n",
        f"{DEFAULTS_TABLE_START}\n{DEFAULTS_TABLE_END}\n{DEFAULTS_TABLE_START}\n{DEFAULTS_TABLE_END}\n",
    ):
        with pytest.raises(ValueError):
            with_defaults_table(broken, "| t |\n")
