"""Property-style: randomised bad input is always refused the same way (issue 25). Each case mixes one override
that is bad by construction (drawn from the schema's per-key probes in test_config_schema, from malformed override
syntax, and from unknown keys with random names) with up to three valid ones in random order; `run`, `run
--dry-run` and `eval` must exit 2 with Error: and Hint:, print no traceback, never start training and leave the
workspace (the --out directory and the current directory) exactly as it was. Seeded, so a failure reproduces;
BRIDGECTL_PROPERTY_CASES raises the number of cases for a longer search."""

from __future__ import annotations

import os
import random
import string
from pathlib import Path

import pytest
from test_config_schema import CASES
from typer.testing import CliRunner

from bridgectl.cli.app import app

VALID = [
    "seed=3",
    "recipe=rl",
    "recipe=sft",
    "train.max_steps=7",
    "rl.num_generations=4",
    "eval.n=5",
    "task.max_operand=7",
    "bridge.lam=0.3",
    "train.threads=1",
    "lora.rank=8",
]
MALFORMED = [
    "=1",
    "seed==",
    "seed=[1,",
    "rl.lr={a:",
    "seed=1=2",
    "recipe=",
    "recipe=not_a_recipe",
    "task=not_a_task",
    "model=not_a_model",
    "rl..lr=1",
    "seed=${",
    "+",
    "~",
]


def random_key(rng: random.Random) -> str:
    """A dotted key that no schema has: a random word, alone or under a real section."""
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))) + "_zz"
    return rng.choice([word, f"rl.{word}", f"train.{word}", f"bridge.{word}"])


def bad_override(rng: random.Random) -> list[str]:
    kind = rng.choice(["schema", "schema", "malformed", "unknown"])
    if kind == "schema":
        return list(rng.choice(CASES)[1])
    if kind == "malformed":
        return [rng.choice(MALFORMED)]
    return [f"{random_key(rng)}={rng.choice(['1', 'abc', '[1,2]', 'null'])}"]


def case(index: int) -> list[str]:
    rng = random.Random(index)
    valid = rng.sample(VALID, rng.randint(0, 3))
    # a valid override may not set the same key as the bad one (it would replace the bad value)
    bad = bad_override(rng)
    bad_keys = {item.split("=")[0].lstrip("+~") for item in bad}
    overrides = [item for item in valid if item.split("=")[0] not in bad_keys] + bad
    rng.shuffle(overrides)
    # the bad override's context (e.g. `rl.epsilon_high=0.1` with `rl.epsilon=0.2`) stays in its own order
    return [item for item in overrides if item not in bad] + bad


N_CASES = int(os.environ.get("BRIDGECTL_PROPERTY_CASES", "60"))


def snapshot(root: Path) -> set[tuple[str, int]]:
    return {(str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.slow
@pytest.mark.parametrize("index", range(N_CASES))
def test_random_bad_overrides_exit_2_and_touch_nothing(tmp_path, monkeypatch, training_refused, index):
    overrides = case(index)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "kept.txt").write_text("a file of the user's")
    before = snapshot(tmp_path)
    commands = [
        ["run", *overrides, "--out", "runs"],
        ["run", "--dry-run", *overrides, "--out", "runs"],
        ["eval", "tiny", *overrides],
    ]
    for command in commands:
        result = CliRunner().invoke(app, command)
        said = " ".join(result.output.split())
        assert result.exit_code == 2, (command, said)
        assert said.startswith("Error:") and "Hint:" in said and "Traceback" not in result.output, (command, said)
    assert training_refused == []
    assert snapshot(tmp_path) == before, overrides


# ---- sweep specs --------------------------------------------------------------------------------------------------
GOOD_SPEC = {
    "name": "prop",
    "base": ["recipe=sft", "train.max_steps=1"],
    "seeds": [0],
    "objective": {"metric": "eval/test/accuracy", "direction": "maximize"},
    "sampler": "grid",
    "params": {"bridge.lam": {"type": "float", "values": [0.3, 0.5]}},
}
# values of the wrong YAML type or shape for each field, one of which replaces the good value
WRONG = {
    "name": [[1, 2], {"a": 1}, 3],
    "base": ["recipe=sft", 5, {"a": 1}],
    "seeds": ["abc", 3, [0, 1.5], [None]],
    "objective": [3, "eval/test/accuracy", {"metric": 3}, {"metrc": "x"}, {"direction": "sideways"}],
    "sampler": [3, "annealing", ["grid"]],
    "n_trials": ["x", True, 0, -2, 1.5],
    "pruner": ["wise", 7],
    "params": [
        [1, 2],
        "bridge.lam",
        {"bridge.lam": 0.5},
        {"bridge.lamda": {"type": "float", "values": [1]}},
        {"bridge.lam": {"type": "float", "low": "a", "high": 1}},
    ],
    "colour": ["blue"],
}


def bad_spec(index: int) -> dict:
    rng = random.Random(1000 + index)
    spec = {key: value for key, value in GOOD_SPEC.items() if rng.random() > 0.2 or key in ("params",)}
    field = rng.choice(sorted(WRONG))
    spec[field] = rng.choice(WRONG[field])
    return spec


@pytest.mark.parametrize("index", range(N_CASES // 2))
def test_random_bad_sweep_specs_exit_2_and_touch_nothing(tmp_path, monkeypatch, training_refused, index):
    import yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(bad_spec(index)))
    before = snapshot(tmp_path)
    for command in (["sweep", "spec.yaml", "--out", "out"], ["sweep", "spec.yaml", "--dry-run", "--out", "out"]):
        result = CliRunner().invoke(app, command)
        said = " ".join(result.output.split())
        assert result.exit_code == 2, (bad_spec(index), said)
        assert said.startswith("Error:") and "Hint:" in said and "Traceback" not in result.output, said
    assert training_refused == [] and snapshot(tmp_path) == before
