"""W&B tracking of a run (offline here: a local W&B run directory inside the run directory) and secret redaction:
values of environment variables that hold keys or tokens reach neither config.yaml, the logs nor W&B."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.rundir.wandb_sink import redact

SMALL = [
    "recipe=rl",
    "train.threads=1",
    "train.max_steps=3",
    "train.eval_every=0",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "eval.n=10",
    "train.log_completions_every=1",
]


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run log (`run-*.wandb`): a LevelDB-style log of 32 KiB blocks, each record a
    7-byte header (checksum, length, type: 1 full, 2 first, 3 middle, 4 last) and data, after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data, position, block, pending, records = path.read_bytes(), 7, 32768, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def items(update) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update}


def test_an_offline_wandb_run_holds_config_metrics_completions_and_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("MY_SERVICE_API_KEY", secret)
    # a secret pasted into a value the config keeps: it must be redacted everywhere
    result = CliRunner().invoke(
        app,
        [
            "run",
            *SMALL,
            "tracker.wandb.mode=offline",
            "tracker.wandb.project=bt",
            f"recipe.description=uses {secret}",
            "--out",
            str(tmp_path),
            "--name",
            "w",
        ],
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "w"
    summary = json.loads((run / "summary.json").read_text())
    local_rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    records = wandb_records(next(offline[0].glob("run-*.wandb")))

    header = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert header.display_name == "w" and header.run_group == "rl"
    assert sorted(header.tags) == ["model:tiny", "recipe:rl", "task:arith"]
    config = items(header.config.update)
    assert config["recipe"]["name"] == "rl" and config["rl"]["num_generations"] == 2 and config["seed"] == 0

    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    assert [row["_step"] for row in history] == [0, 1, 2, 3]  # the final eval shares the last step
    by_step = {row["step"]: row for row in local_rows if row["stage"] in ("rl", "init")}
    for row in history[1:]:  # every training metric, as metrics.jsonl has it
        assert row["train/rl_loss"] == pytest.approx(by_step[row["_step"]]["train/rl_loss"])
        assert row["train/reward_mean"] == pytest.approx(by_step[row["_step"]]["train/reward_mean"])
    assert history[0]["eval/test/accuracy"] == pytest.approx(summary["eval_initial"]["test"]["accuracy"])
    assert history[-1]["eval/test/accuracy"] == pytest.approx(summary["eval"]["test"]["accuracy"])

    final = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            final.update(items(record.summary.update))
    assert final["status"] == "completed" and final["eval"] == summary["eval"]
    assert list((offline[0] / "files").rglob("completions*.table.json"))
    everything = [p for p in run.rglob("*") if p.is_file()]
    assert not [p for p in everything if secret.encode() in p.read_bytes()]
    assert "uses ***" in (run / "config.yaml").read_text() and config["recipe"]["description"] == "uses ***"


def test_redact_replaces_secret_values_only(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijk")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789")
    monkeypatch.setenv("SHORT_TOKEN", "1")  # too short to redact: it would mangle ordinary text
    monkeypatch.setenv("HOME_DIR", "hf_abcdefghijk_not_secret_name")
    value = {"a": "token hf_abcdefghijk here", "b": ["0123456789", 1, None], "c": "1 + 1"}
    assert redact(value) == {"a": "token *** here", "b": ["***", 1, None], "c": "1 + 1"}


def test_unknown_wandb_mode_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["run", "tracker.wandb.mode=cloud", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown tracker.wandb.mode 'cloud'" in result.output
