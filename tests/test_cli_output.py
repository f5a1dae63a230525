"""What `bridgectl run` prints: the dry run's config is YAML that can be copied back, and the results table speaks
of accuracy changes in points."""

from __future__ import annotations

import yaml
from omegaconf import OmegaConf
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.cli.run import _print_eval_table
from bridgectl.config.compose import compose


def test_dry_run_prints_yaml_equal_to_the_config_whatever_the_terminal_width(tmp_path):
    description = "a long description " * 12  # far wider than the 80 columns of the test terminal
    overrides = ["recipe=bridge", f"recipe.description='{description}'", "bridge.lam=0.3"]
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, ["run", "--dry-run", *overrides, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    printed = result.output.split("\nplan: ")[0]
    assert yaml.safe_load(printed) == OmegaConf.to_container(compose(overrides), resolve=True)
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_results_table_gives_the_change_in_points(capsys):
    summary = {
        "recipe": "rl",
        "wall_s": 12.0,
        "eval": {"test": {"accuracy": 0.897, "n": 300}},
        "eval_initial": {"test": {"accuracy": 0.25, "n": 300}},
    }
    _print_eval_table(summary, "runs/x")
    shown = capsys.readouterr().out
    assert "+64.7" in shown and "points" in shown and "+64.7%" not in shown  # 25.0 -> 89.7 is 64.7 points
