"""Bad input to `bridgectl run` is answered with `Error:` + `Hint:`, exit code 2, no traceback, and no files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shipped_recipe
from typer.testing import CliRunner

from bridgectl.cli.app import app

BRIDGECTL = Path(sys.executable).parent / "bridgectl"

RECIPE_FILES = {
    "no_recipe.yaml": "train:\n  max_steps: 40\n",
    "broken.yaml": "recipe: [a, b\n  x: : y\n",
    "list.yaml": "- a\n- b\n",
}

# (id, arguments, text the message must contain, text the hint must contain)
BAD_INPUTS = [
    ("unknown recipe", ["recipe=nope"], "unknown recipe 'nope'", "two_stage"),
    ("unknown task", ["task=nope"], "unknown task 'nope'", "arith"),
    ("unknown model", ["model=nope"], "unknown model 'nope'", "tiny"),
    ("unknown top-level key", ["seeed=1"], "unknown key 'seeed'", "did you mean 'seed'"),
    ("unknown nested key", ["train.max_step=3"], "unknown key 'train.max_step'", "did you mean 'train.max_steps'"),
    (
        "unknown nested key rl",
        ["rl.num_generaton=4"],
        "unknown key 'rl.num_generaton'",
        "did you mean 'rl.num_generations'",
    ),
    ("wrong type", ["train.max_steps=abc"], "bad value for 'train.max_steps'", ""),
    ("zero steps", ["train.max_steps=0"], "train.max_steps must be positive", "train.max_steps="),
    ("negative steps", ["train.max_steps=-5"], "train.max_steps must be positive", "train.max_steps="),
    ("non-positive recipe.steps", ["recipe=two_stage", "recipe.steps=[0,3]"], "recipe.steps must be positive", ""),
    ("zero sft lr", ["sft.lr=0"], "sft.lr must be positive", "sft.lr="),
    ("negative rl lr", ["rl.lr=-1"], "rl.lr must be positive", "rl.lr="),
    ("group of one", ["rl.num_generations=1"], "rl.num_generations must be at least 2", "rl.num_generations="),
    ("unknown stage", ["recipe.stages=[sft,foo]"], "unknown stage 'foo'", "sft, rl, interleaved"),
    ("fractions length", ["recipe=two_stage", "recipe.fractions=[1.0]"], "recipe.fractions has 1 entries", ""),
    ("malformed override", ["seed"], "seed", "key=value"),
    ("malformed nested override", ["train.max_steps"], "train.max_steps", "key=value"),
    ("missing recipe file", ["recipe=missing.yaml"], "missing.yaml does not exist", ""),
    ("recipe file without recipe", ["recipe=no_recipe.yaml"], "no `recipe:` section", ""),
    ("recipe file that is a list", ["recipe=list.yaml"], "no `recipe:` section", ""),
    ("invalid YAML", ["recipe=broken.yaml"], "not valid YAML", ""),
    ("lambda above one", ["bridge.lam=1.5"], "bridge.lam must be in [0, 1]", "bridge.lam=0.5"),
    ("lambda below zero", ["bridge.lam=-0.1"], "bridge.lam must be in [0, 1]", "bridge.lam=0.5"),
    ("lambda ramp end outside", ["bridge.lam_start=0.2", "bridge.lam_end=2"], "bridge.lam_end must be in [0, 1]", ""),
    ("lambda ramp half given", ["bridge.lam_start=0.2"], "go together", "bridge.lam_end"),
    ("zero bridge beta", ["bridge.beta=0"], "bridge.beta must be positive", "rl.beta"),
    ("negative bridge alpha", ["bridge.alpha=-1e-4"], "bridge.alpha must be positive", ""),
    ("unknown lower mode", ["bridge.lower=half"], "unknown bridge.lower 'half'", "full or lora"),
    ("unknown lora forward", ["lora.forward=fused"], "unknown lora.forward 'fused'", "auto, merged or unmerged"),
    ("unknown shadow mode", ["bridge.shadow=ghost"], "unknown bridge.shadow 'ghost'", "lookahead"),
    (
        "shadow rollouts with lookahead",
        ["bridge.shadow=lookahead", "bridge.shadow_rollouts=true"],
        "needs the persistent shadow",
        "",
    ),
    ("negative mix weight", ["recipe=mix", "mix.mu=-1"], "mix.mu", ""),
    ("negative pretraining steps", ["model.pretrain.steps=-1"], "model.pretrain.steps must be >= 0", ""),
    ("fewer steps than stages", ["recipe=two_stage", "train.max_steps=1"], "fewer than the 2 stages", "recipe.steps"),
]


@pytest.fixture(autouse=True)
def no_training(training_refused):
    """Bad input must be refused before any training (conftest.training_refused)."""
    return training_refused


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for name, text in RECIPE_FILES.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def plain(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at the console width


def check_user_error(output: str, message: str, hint: str) -> None:
    lines = output.splitlines()
    assert any(line.startswith("Error:") for line in lines), output
    assert any(line.startswith("Hint:") for line in lines), output
    assert "Traceback" not in output
    error_part, _, hint_part = plain(output).partition("Hint:")
    assert message in error_part, output
    assert hint in hint_part, output


@pytest.mark.slow
@pytest.mark.parametrize("args,message,hint", [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real"])
def test_bad_input_exits_2_with_error_and_hint(workdir, no_training, args, message, hint, dry_run):
    out = workdir / "out"
    before = snapshot(workdir)
    result = CliRunner().invoke(app, ["run", "--out", str(out), *(["--dry-run"] if dry_run else []), *args])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    check_user_error(result.output, message, hint)
    assert not out.exists() or not any(out.iterdir())
    assert snapshot(workdir) == before  # nothing written anywhere in the working directory either
    assert no_training == []


@pytest.mark.parametrize(
    "args,message,hint",
    [
        (["recipe.stages=[]"], "recipe.stages is empty", "e.g. recipe.stages=[sft,rl]"),
        (
            ["task.train_ops=[3,2]"],
            "task.train_ops must be [min, max] with 1 <= min <= max, got [3, 2]",
            "e.g. task.train_ops=[2,4]",
        ),
    ],
    ids=["empty-stages", "reversed-ops"],
)
def test_hint_and_message_keep_their_brackets(workdir, args, message, hint):
    """Messages are shown verbatim: square brackets in them (`[sft,rl]`, `[min, max]`) are not console markup."""
    result = CliRunner().invoke(app, ["run", "--dry-run", "--out", str(workdir / "out"), *args])
    assert result.exit_code == 2
    check_user_error(result.output, message, hint)


def test_recipe_file_hint_shows_the_example_verbatim(workdir):
    result = CliRunner().invoke(app, ["run", "--dry-run", "--out", str(workdir / "out"), "recipe=no_recipe.yaml"])
    assert result.exit_code == 2
    check_user_error(result.output, "no `recipe:` section", "recipe: {name: mine, stages: [sft, rl]}")


def test_valid_input_does_reach_the_runner(workdir, no_training):
    """Control for the stand-in runner: valid input without --dry-run does start training (so the bad-input
    tests above would notice a run starting)."""
    result = CliRunner().invoke(app, ["run", "--out", "runs", "--name", "ok", "recipe=sft", "train.max_steps=3"])
    assert no_training == [Path("runs") / "ok"]
    assert result.exit_code == 1
    assert "training was started" in plain(result.output)


def test_existing_run_directory_is_refused_and_left_untouched(workdir, no_training):
    run_dir = workdir / "runs" / "x"
    run_dir.mkdir(parents=True)
    (run_dir / "keep.txt").write_text("precious")
    for extra in (["--dry-run"], []):
        result = CliRunner().invoke(app, ["run", "--name", "x", "--out", "runs", *extra, "recipe=sft"])
        assert result.exit_code == 2, result.output
        check_user_error(result.output, "already exists", "--name")
        assert (run_dir / "keep.txt").read_text() == "precious"
        assert [p.name for p in run_dir.iterdir()] == ["keep.txt"]
    assert no_training == []


def test_recipes_lists_every_builtin_recipe_with_its_stages():
    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    recipes_table, stages_table = result.output.split("stages (recipe.stages")
    rows = {}
    for line in recipes_table.splitlines():
        cells = [cell.strip() for cell in line.replace("┃", "│").replace("|", "│").split("│")]
        cells = [cell for cell in cells if cell]
        if cells and cells[0] in {"sft", "rl", "two_stage", "interleaved"}:
            rows[cells[0]] = cells
    # stages and budgets as bridgectl/conf/recipe/*.yaml set them
    for name in ("sft", "rl", "two_stage", "interleaved"):
        expected = shipped_recipe(name)
        assert None not in expected["budgets"]  # the shipped recipes split their steps exactly
        stages = " -> ".join(f"{kind}({steps})" for kind, steps in zip(expected["stages"], expected["budgets"]))
        assert rows[name][1:3] == [stages, str(expected["max_steps"])], rows[name]
    from bridgectl.stages import STAGES

    listed = {
        cells[0]
        for line in stages_table.splitlines()
        if (cells := [c.strip() for c in line.replace("|", "│").split("│") if c.strip()])
    }
    assert set(STAGES) <= listed  # every registered stage, with its update rule


def test_dry_run_prints_the_plan_and_writes_nothing(workdir):
    result = CliRunner().invoke(app, ["run", "--dry-run", "--out", "runs", "--name", "planned", "recipe=two_stage"])
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    expected = shipped_recipe("two_stage")
    plan = ", ".join(f"{kind} x {steps}" for kind, steps in zip(expected["stages"], expected["budgets"]))
    assert f"plan: recipe two_stage: {plan} steps -> runs/planned" in text
    assert f"max_steps: {expected['max_steps']}" in result.output  # the resolved config is printed too
    assert snapshot(workdir) == {name: text.encode() for name, text in RECIPE_FILES.items()}
    assert not (workdir / "runs").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--dry-run", "recipe=nope"], "unknown recipe 'nope'"),
        (["run", "--dry-run", "train.max_step=3"], "did you mean 'train.max_steps'"),
        (["run", "--dry-run", "recipe=broken.yaml"], "not valid YAML"),
    ],
)
def test_installed_entry_point(workdir, args, message):
    """The real console script (not just the Typer app): same exit code and messages, no traceback."""
    assert BRIDGECTL.exists()
    env = dict(os.environ, COLUMNS="200")
    result = subprocess.run(
        [str(BRIDGECTL), *args, "--out", str(workdir / "out")],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=env,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    check_user_error(output, "", "")
    assert message in plain(output)
    assert not (workdir / "out").exists()


@pytest.mark.parametrize(
    "content,key",
    [
        ("recipe:\n  name: w\n  stagez: [sft]\n", "stagez"),  # misspelled key inside the recipe file
        ("recipe:\n  name: w\n  stages: [sft]\ntrain:\n  max_steps: abc\n", "max_steps"),  # wrong type inside it
    ],
    ids=["misspelled-key", "wrong-type"],
)
def test_errors_inside_a_recipe_file_name_the_offending_key(workdir, content, key):
    (workdir / "mine.yaml").write_text(content)
    result = CliRunner().invoke(app, ["run", "--dry-run", "--out", str(workdir / "out"), "recipe=mine.yaml"])
    assert result.exit_code == 2, result.output
    check_user_error(result.output, "", "")
    error_part = plain(result.output).partition("Hint:")[0]
    assert key in error_part, f"the error does not say which key is wrong:\n{result.output}"
    assert not (workdir / "out").exists()
