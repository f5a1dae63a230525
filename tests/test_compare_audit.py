"""`bridgectl compare` checks what it pools and states what differs (bridgectl/analysis/audit.py), on hand-made run
directories whose configs are known: runs of different configs are never silently seeds of one group, one run
reached twice counts once, n counts the runs that have the metric, and every table says what differs between its
groups."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml
from typer.testing import CliRunner

from bridgectl.analysis import compare
from bridgectl.cli.app import app

BASE_CONFIG = {
    "recipe": {"name": "sft", "stages": ["sft"], "description": "x"},
    "seed": 0,
    "task": {"name": "arith"},
    "model": {"name": "hf", "finetune": "lora"},
    "lora": {"rank": 8, "alpha": 16, "target_modules": ["all-linear"]},
    "sft": {"lr": 2e-4},
    "rl": {"lr": 1e-5, "max_completion_length": 1024},
    "bridge": {"lam": 0.5, "w_rank": 8, "upper": "cooperative", "alpha": 1e-5, "beta": 1e-5},
    "train": {"max_steps": 10, "threads": 2},
    "eval": {"max_new_tokens": 1024},
    "tracker": {"wandb": {"mode": "disabled"}},
}


def write_run(root: Path, name: str, accuracy: float | None = 0.5, recipe: str = "sft", **overrides) -> Path:
    """A completed run whose config.yaml is BASE_CONFIG with `overrides` (dotted keys), its seed and recipe in
    summary.json as the runner writes them."""
    config = json.loads(json.dumps(BASE_CONFIG))
    config["recipe"].update(name=recipe, stages=["bridge" if recipe == "bridge" else recipe])
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = root / name
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "metrics.jsonl").write_text(json.dumps({"step": 0, "wall_s": 1.0, "name": name}) + "\n")
    evaluation = {"test": {"accuracy": accuracy, "n": 100}} if accuracy is not None else {}
    summary = {
        "status": "completed",
        "recipe": recipe,
        "seed": config["seed"],
        "task": "arith",
        "model": "hf",
        "eval": evaluation,
        "steps": config["train"]["max_steps"],
        "wall_s": 10.0,
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def run_compare(*args: str):
    return CliRunner().invoke(app, ["compare", *args])


def test_runs_of_different_configs_are_refused_naming_keys_values_and_runs(tmp_path):
    """The user's case: sft runs of three learning rates and two step counts, two of them seed 0, pooled as n=4."""
    write_run(tmp_path / "mine", "sft-0", seed=0, sft__lr=2e-4, train__max_steps=4)
    write_run(tmp_path / "mine", "sft-1", seed=1, sft__lr=2e-4, train__max_steps=4)
    write_run(tmp_path / "sweep", "lr1", seed=0, sft__lr=1e-4, train__max_steps=8)
    write_run(tmp_path / "sweep", "lr4", seed=1, sft__lr=4e-4, train__max_steps=8)
    result = run_compare(str(tmp_path / "mine"), str(tmp_path / "sweep"))
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Error:" in text and "Traceback" not in text
    assert "sft.lr = 0.0002 (sft-0, sft-1); 0.0001 (lr1); 0.0004 (lr4)" in text
    assert "train.max_steps = 4 (sft-0, sft-1); 8 (lr1, lr4)" in text
    assert "--by sft.lr --by train.max_steps" in text and "--pool sft.lr --pool train.max_steps" in text
    # the user's own two seeds alone agree: no refusal
    assert run_compare(str(tmp_path / "mine"), "--format", "json").exit_code == 0


def test_pool_on_purpose_is_stated_and_by_splits(tmp_path):
    for seed, lr in enumerate([1e-4, 4e-4]):
        write_run(tmp_path, f"r{seed}", 0.4 + 0.2 * seed, seed=seed, sft__lr=lr)
    pooled = run_compare(str(tmp_path), "--pool", "sft.lr", "--format", "markdown")
    assert pooled.exit_code == 0, pooled.output
    assert "| sft * ! | 2 |" in pooled.output
    assert "group sft pools runs of different configs on purpose (--pool): sft.lr = 0.0001, 0.0004" in pooled.output
    section = run_compare(str(tmp_path), "--pool", "sft", "--format", "json")  # a section pools its keys
    assert section.exit_code == 0 and json.loads(section.output)["groups"][0]["pooled/sft.lr"] == "0.0001, 0.0004"
    split = json.loads(run_compare(str(tmp_path), "--by", "recipe", "--by", "sft.lr", "--format", "json").output)
    assert sorted(g["group"] for g in split["groups"]) == ["sft, 0.0001", "sft, 0.0004"]
    assert all(g["n"] == 1 and "pooled/sft.lr" not in g for g in split["groups"])


def test_keys_that_cannot_change_results_do_not_split_a_group(tmp_path):
    write_run(tmp_path, "a", seed=0, train__threads=2, tracker__wandb__mode="disabled", train__micro_batch_size=4)
    write_run(tmp_path, "b", seed=1, train__threads=8, tracker__wandb__mode="offline", train__micro_batch_size=16)
    # the rank of theta's adapters means nothing to a full fine-tuning run
    write_run(tmp_path, "c", seed=2, model__finetune="full", lora__rank=8)
    write_run(tmp_path, "d", seed=3, model__finetune="full", lora__rank=32)
    assert run_compare(str(tmp_path / "a"), str(tmp_path / "b")).exit_code == 0
    assert run_compare(str(tmp_path / "c"), str(tmp_path / "d")).exit_code == 0
    lora = run_compare(str(tmp_path / "a"), str(tmp_path / "d"))  # a LoRA run beside a full one: refused
    assert lora.exit_code == 2 and "model.finetune" in lora.output


def test_re_runs_of_one_seed_are_not_two_seeds(tmp_path):
    write_run(tmp_path, "first", 0.5, seed=0)
    write_run(tmp_path, "again", 0.6, seed=0)
    refused = run_compare(str(tmp_path))
    assert refused.exit_code == 2 and "several runs of seed 0 (x2)" in " ".join(refused.output.split())
    assert "--pool seed" in " ".join(refused.output.split())
    assert run_compare(str(tmp_path), "--pool", "seed").exit_code == 0


def test_one_run_reached_twice_counts_once(tmp_path, monkeypatch):
    write_run(tmp_path / "runs", "a", 0.5, seed=0)
    write_run(tmp_path / "runs", "b", 0.7, seed=1)
    monkeypatch.chdir(tmp_path)
    os.symlink(tmp_path / "runs" / "a", tmp_path / "runs" / "link-to-a")
    rows = compare.compare(
        compare.load_runs(["runs/a", str(tmp_path / "runs" / "a"), "runs/*"]), ["recipe"], "eval/test/accuracy", None
    )
    assert rows[0].n == 2 and rows[0].metrics["eval/test/accuracy"].mean == 0.6
    shutil.copytree(tmp_path / "runs" / "a", tmp_path / "copy-of-a")  # a copy of the directory: the same run
    loaded = compare.load_runs(["runs", "copy-of-a"])
    assert len(loaded.runs) == 2 and len(loaded.copies) == 1 and "copy-of-a" in loaded.copies[0]
    result = run_compare("runs", "copy-of-a", "--format", "markdown")
    assert result.exit_code == 0 and "Warning: counted once:" in result.output and "| sft * | 2 |" in result.output


def test_n_counts_the_runs_that_have_the_metric(tmp_path):
    write_run(tmp_path, "a", 0.5, seed=0)
    write_run(tmp_path, "b", 0.7, seed=1)
    write_run(tmp_path, "c", None, seed=2)  # evaluated nothing on test
    row = compare.compare(compare.load_runs([str(tmp_path)]), ["recipe"], "eval/test/accuracy", None)[0]
    accuracy = row.metrics["eval/test/accuracy"]
    assert row.n == 3 and accuracy.n == 2 and accuracy.mean == 0.6 and row.missing == {"eval/test/accuracy": ["c"]}
    output = run_compare(str(tmp_path), "--format", "markdown").output
    assert "| sft * | 3 | 60.0 ± 14.1" in output and "(n=2) |" in output
    assert (
        "group sft: 1 of 3 runs have no eval/test/accuracy (c); its mean and intervals are over the other 2"
        in " ".join(output.split())
    )
    flat = json.loads(run_compare(str(tmp_path), "--format", "json").output)["groups"][0]
    assert flat["eval/test/accuracy/n"] == 2 and flat["n"] == 3


def test_every_comparison_states_what_differs_between_its_groups(tmp_path):
    """BRIDGE at rank 32 beside rl and sft at rank 8 (the old defaults): the rank is marked as a difference that
    is not the recipe, the recipe's own keys are not, and the fairness facts stand side by side."""
    for seed in (0, 1):
        write_run(tmp_path, f"bridge-{seed}", recipe="bridge", seed=seed, lora__rank=32, train__max_steps=120)
        write_run(tmp_path, f"rl-{seed}", recipe="rl", seed=seed, train__max_steps=150)
        write_run(tmp_path, f"sft-{seed}", recipe="sft", seed=seed, train__max_steps=300)
    markdown = run_compare(str(tmp_path), "--format", "markdown").output
    table = {
        line.split(" | ")[0].strip("| "): line.split(" | ")[1:]
        for line in markdown.splitlines()
        if line.startswith("| ")
    }
    assert table[""] == ["bridge", "rl", "sft |"]
    assert table["! lora.rank"] == ["32", "8", "8 |"] and table["! train.max_steps"] == ["120", "150", "300 |"]
    assert table["recipe.stages"] == ['["bridge"]', '["rl"]', '["sft"] |']  # the recipe itself: not marked
    assert table["trains"][0] == "LoRA r=32 alpha=16 on all-linear + w r=8" and table["updates"] == [
        "120",
        "150",
        "300 |",
    ]
    assert table["learning rates"] == ["bridge.alpha=1e-05 bridge.beta=1e-05", "rl.lr=1e-05", "sft.lr=0.0002 |"]
    assert table["length limits"] == ["rollouts 1024, eval 1024", "rollouts 1024, eval 1024", "eval 1024 |"]
    assert not any(key.startswith("bridge.") for key in table)  # a stage section only bridge runs: no difference
    document = json.loads(run_compare(str(tmp_path), "--format", "json").output)
    rank = next(d for d in document["differences"] if d["key"] == "lora.rank")
    assert rank["marked"] and rank["values"] == {"bridge": "32", "rl": "8", "sft": "8"}
    groups = {g["group"]: g for g in document["groups"]}
    assert groups["bridge"]["config/lora.rank"] == "32" and groups["rl"]["facts/updates"] == "150"
    terminal = run_compare(str(tmp_path)).output  # the same in the terminal, one line per key when narrow
    assert "! lora.rank" in terminal and "What differs between the groups" in terminal


def test_a_run_without_learning_signal_is_marked(tmp_path):
    write_run(tmp_path, "rl-0", 0.1, recipe="rl", seed=0)
    dead = write_run(tmp_path, "rl-1", 0.1, recipe="rl", seed=1)
    summary = json.loads((dead / "summary.json").read_text())
    (dead / "summary.json").write_text(json.dumps({**summary, "rl_steps": 8, "no_signal_steps": 8}))
    row = compare.compare(compare.load_runs([str(tmp_path)]), ["recipe"], "eval/test/accuracy", None)[0]
    assert row.no_signal == ["rl-1"]
    output = run_compare(str(tmp_path), "--format", "markdown").output
    assert "| rl * (no signal: 1) | 2 |" in output and "rl-1 had every reward of a group equal" in output
    assert not compare.mostly_without_signal({"rl_steps": 8, "no_signal_steps": 4})  # half is not most
    assert compare.mostly_without_signal({"rl_steps": 8, "no_signal_steps": 5})


def test_every_stage_names_the_learning_rates_it_uses():
    """compare's `learning rates` fact reads StageInfo.learning_rates: each stage names at least one, each a key of
    the schema, and a stage's own section's learning rate is among them (a stage that gains one must say so)."""
    from bridgectl.config.schema import schema_types
    from bridgectl.stages import STAGES

    keys = schema_types()
    for kind, info in STAGES.items():
        assert info.learning_rates and all(key in keys for key in info.learning_rates), kind
        own = [key for key in keys if key.split(".")[0] == kind and key.split(".")[-1].endswith("lr")]
        assert set(own) <= set(info.learning_rates), (kind, own)
