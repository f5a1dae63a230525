"""Bad input of every kind (configs, overrides, data files, run directories, sweep specs, command options) exits 2
with an `Error:` line and no traceback, and changes no file: every file in the workspace is byte-identical
afterwards and none is added."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.config.compose import compose


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("ws")
    (ws / "broken.yaml").write_text("recipe: [unclosed\n")
    (ws / "bad.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": \n')
    (ws / "fields.jsonl").write_text('{"prompt": "1+1?", "solution": "2"}\n')
    (ws / "empty.jsonl").write_text("")
    (ws / "notarun").mkdir()
    (ws / "empty").mkdir()
    runs = ws / "runs"
    for name, status in (("completed", "completed"), ("interrupted", "interrupted"), ("existing", "running")):
        (runs / name).mkdir(parents=True)
        (runs / name / "config.yaml").write_text(OmegaConf.to_yaml(compose(["recipe=rl"])))
        (runs / name / "summary.json").write_text(json.dumps({"status": status, "recipe": "rl"}))
    (ws / "sampler.yaml").write_text("sampler: annealing\nparams: {bridge.lam: {type: float, low: 0.1, high: 0.9}}\n")
    (ws / "inverted.yaml").write_text("params: {bridge.lam: {type: float, low: 0.9, high: 0.1}}\n")
    (ws / "grid.yaml").write_text("sampler: grid\nparams: {bridge.lam: {type: float, values: [0.5]}}\n")
    return ws


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def jsonl_task(name: str) -> list[str]:
    return [
        "run",
        "task=jsonl",
        f"task.path={{ws}}/{name}",
        f"task.eval_sets={{{{test:{{ws}}/{name}}}}}",
        "--out",
        "{ws}/runs",
    ]


CASES = [
    # configs and overrides
    ("unknown key", ["run", "trian.max_steps=5", "--out", "{ws}/runs"], "unknown key"),
    ("wrong type", ["run", "train.max_steps=abc", "--out", "{ws}/runs"], "train.max_steps"),
    ("value out of range", ["run", "bridge.lam=1.5", "--out", "{ws}/runs"], "bridge.lam must be in [0, 1]"),
    ("unknown recipe", ["run", "recipe=nope", "--out", "{ws}/runs"], "unknown recipe 'nope'"),
    (
        "sharding with the look-ahead shadow",
        ["run", "train.fsdp=true", "bridge.shadow=lookahead", "--nproc", "2", "--out", "{ws}/runs"],
        "train.fsdp runs the bridge stage as the first",
    ),
    (
        "unknown rollout backend",
        ["run", "rollout.backend=sglang", "--out", "{ws}/runs"],
        "unknown rollout.backend 'sglang'",
    ),
    *(
        [
            (
                "vllm not installed",
                ["run", "rollout.backend=vllm", "train.device=cpu", "--out", "{ws}/runs"],
                "rollout.backend=vllm needs the vllm package",
            )
        ]
        if importlib.util.find_spec("vllm") is None
        else []
    ),
    (
        "vllm with sharding",
        ["run", "rollout.backend=vllm", "train.fsdp=true", "--nproc", "2", "--out", "{ws}/runs"],
        "rollout.backend=vllm does not run with train.fsdp",
    ),
    (
        "vllm memory share",
        ["run", "rollout.backend=vllm", "rollout.gpu_memory_utilization=1.5", "--out", "{ws}/runs"],
        "rollout.gpu_memory_utilization must be in (0, 1)",
    ),
    ("broken recipe file", ["run", "recipe={ws}/broken.yaml", "--out", "{ws}/runs"], "not valid YAML"),
    ("unknown task", ["run", "task=nope", "--out", "{ws}/runs"], "unknown task 'nope'"),
    ("hf model without a path", ["run", "model=hf", "--out", "{ws}/runs"], "needs model.name_or_path"),
    (
        "missing model directory",
        ["run", "model=hf", "model.name_or_path={ws}/nomodel", "--out", "{ws}/runs"],
        "does not exist",
    ),
    ("existing run directory", ["run", "--out", "{ws}/runs", "--name", "existing"], "already exists"),
    ("unknown W&B mode", ["run", "tracker.wandb.mode=cloud", "--out", "{ws}/runs"], "tracker.wandb.mode"),
    # data files
    ("malformed jsonl line", jsonl_task("bad.jsonl"), "bad.jsonl, line 2: not valid JSON"),
    ("dataset without the fields", jsonl_task("fields.jsonl"), "has no field(s) question"),
    ("empty dataset", jsonl_task("empty.jsonl"), "is empty"),
    ("missing dataset file", jsonl_task("missing.jsonl"), "does not exist"),
    # run directories
    ("resume a directory that is no run", ["run", "--resume", "{ws}/notarun"], "not a run directory"),
    ("resume a completed run", ["run", "--resume", "{ws}/runs/completed"], "already completed"),
    ("resume with a changed config", ["run", "--resume", "{ws}/runs/interrupted", "rl.lr=0.1"], "--allow-change rl.lr"),
    (
        "resume with another recipe",
        ["run", "--resume", "{ws}/runs/interrupted", "recipe=sft"],
        "does not match the saved config",
    ),
    ("allow-change without resume", ["run", "--allow-change", "rl.lr", "--out", "{ws}/runs"], "--resume only"),
    ("eval of a run without weights", ["eval", "{ws}/runs/interrupted"], "has no checkpoints/final"),
    ("eval of a plain directory", ["eval", "{ws}/notarun"], "neither a run directory"),
    ("compare with no runs", ["compare", "{ws}/empty"], "no run directories"),
    ("compare in an unknown format", ["compare", "{ws}/runs", "--format", "xml"], "unknown --format"),
    # sweep specs and options
    ("sweep with an unknown sampler", ["sweep", "{ws}/sampler.yaml", "--out", "{ws}/sweeps"], "unknown sampler"),
    ("sweep with an inverted range", ["sweep", "{ws}/inverted.yaml", "--out", "{ws}/sweeps"], "is not below high"),
    ("missing sweep spec", ["sweep", "{ws}/missing.yaml", "--out", "{ws}/sweeps"], "does not exist"),
    (
        "sweep on an unknown launcher",
        ["sweep", "{ws}/grid.yaml", "--launcher", "pbs", "--out", "{ws}/sweeps"],
        "unknown launcher",
    ),
    (
        "sweep with no workers",
        ["sweep", "{ws}/grid.yaml", "--workers", "0", "--out", "{ws}/sweeps"],
        "--workers must be at least 1",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_a_message_and_changes_no_file(workspace, name, args, message):
    before = snapshot(workspace)
    result = CliRunner().invoke(app, [a.format(ws=workspace) for a in args])
    said = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert said.startswith("Error:") or "\nError:" in result.output, result.output
    assert message in said, said
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert snapshot(workspace) == before  # nothing changed, nothing added
    assert not (workspace / "sweeps").exists()


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20
