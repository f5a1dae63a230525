"""Checkpoints carry a manifest (size and sha256 of each file, written last) checked before they load: a damaged
newest checkpoint is passed over for the previous one and the resumed run still ends as an uninterrupted one; with
none left the run fails naming the damage, and summary.json records it. Writes that fail on a full disk (a real
tmpfs, when the tests run as root) leave the previous state, no temporary file, and the failure recorded."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from processes import TINY, read_json
from safetensors.torch import load_file
from typer.testing import CliRunner

import bridgectl.training.runner as runner
from bridgectl.cli.app import app
from bridgectl.core.checkpoint import MANIFEST, CheckpointError, list_checkpoints, read_checkpoint, save_checkpoint
from bridgectl.rundir.writer import RunDir, _append, atomic_write_text

THREE = [*TINY, "train.max_steps=3", "train.checkpoint_every=1"]
"""Checkpoints after steps 1 and 2 (train.keep_checkpoints=2), and the last step's before the final evaluation."""


def rows(run: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "wall_s" and not k.startswith("perf/")}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "final" / "model.safetensors"))


def same_result(run: Path, reference: Path) -> None:
    assert read_json(run / "summary.json")["status"] == "completed"
    assert rows(run) == rows(reference)
    got, expected = weights(run), weights(reference)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def temporary_files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if ".tmp" in p.name)


def flip_bytes(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at : at + 4] = bytes(b ^ 0xFF for b in data[at : at + 4])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    result = CliRunner().invoke(app, ["run", *THREE, "--out", str(out), "--name", "r"])
    assert result.exit_code == 0, result.output
    return out / "r"


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """THREE, stopped by a real SIGINT as its final evaluation begins: checkpoints step 1, 2 and 3."""
    out = tmp_path_factory.mktemp("interrupted")
    real = runner.evaluate_all

    def evaluate_all(ctx, problems, step=0):
        if step == 3:
            signal.raise_signal(signal.SIGINT)
        return real(ctx, problems, step=step)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "evaluate_all", evaluate_all)
        result = CliRunner().invoke(app, ["run", *THREE, "--out", str(out), "--name", "r"])
    assert result.exit_code == 130, result.output
    run = out / "r"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000001", "step-000002", "step-000003"]
    return run


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(interrupted, straight, tmp_path):
    run = Path(shutil.copytree(interrupted, tmp_path / "r"))
    flip_bytes(run / "checkpoints" / "step-000003" / "weights.safetensors")
    result = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    damage = "step-000003: weights.safetensors does not match its sha256 in manifest.json (damaged)"
    assert f"Warning: checkpoint {damage}; trying the one before" in " ".join(result.output.split())
    summary = read_json(run / "summary.json")
    assert summary["resumed_from_step"] == 2 and summary["damaged_checkpoints"] == [damage]
    same_result(run, straight)  # step 3 trained again from step 2's checkpoint
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000001", "step-000002"]


def test_with_no_checkpoint_left_the_resume_fails_naming_the_damage(interrupted, tmp_path):
    run = Path(shutil.copytree(interrupted, tmp_path / "r"))
    for name in ("step-000001", "step-000002"):
        shutil.rmtree(run / "checkpoints" / name)
    trainer = run / "checkpoints" / "step-000003" / "trainer.pt"
    size = trainer.stat().st_size
    os.truncate(trainer, size // 2)
    damage = f"step-000003: trainer.pt has {size // 2} bytes, not the {size} written"
    result = CliRunner().invoke(app, ["run", "--resume", str(run)])
    assert result.exit_code == 1, result.output
    assert damage in " ".join(result.output.split())
    summary = read_json(run / "summary.json")
    assert summary["status"] == "failed"
    assert summary["error"] == f"CheckpointError: no checkpoint of {run} loads: {damage}"
    assert summary["damaged_checkpoints"] == [damage]
    refused = CliRunner().invoke(app, ["eval", str(run), "--checkpoint", "step-000003"])  # bad input: exit 2
    assert refused.exit_code == 2 and f"Error: checkpoint {damage}" in " ".join(refused.output.split())


def test_damaged_final_weights_are_refused_by_eval_and_export(straight, tmp_path):
    run = Path(shutil.copytree(straight, tmp_path / "r"))
    flip_bytes(run / "checkpoints" / "final" / "model.safetensors")
    damage = f"run {run}: checkpoints/final: model.safetensors does not match its sha256 in manifest.json (damaged)"
    for args in (["eval", str(run)], ["export", str(run), "--out", str(tmp_path / "exported")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "".join(f"Error: {damage}".split()) in "".join(result.output.split())  # wrapped anywhere
    assert not (tmp_path / "exported").exists()


class _Stage:
    def __init__(self, model) -> None:
        self.ctx = None
        self.optimizer = torch.optim.AdamW(model.parameters())
        self.updates = 3

    def step(self):
        raise NotImplementedError


@pytest.fixture
def small_checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    return save_checkpoint(tmp_path, 3, model, _Stage(model), torch.Generator(), {"stage_index": 0}, keep=2)


def test_the_manifest_names_each_file_and_any_damage(small_checkpoint):
    manifest = json.loads((small_checkpoint / MANIFEST).read_text())["files"]
    assert sorted(manifest) == ["meta.json", "trainer.pt", "weights.safetensors"]
    assert read_checkpoint(small_checkpoint)[0]["step"] == 3
    (small_checkpoint / "meta.json").rename(small_checkpoint / "meta.moved")
    with pytest.raises(CheckpointError, match="^step-000003: meta.json is missing$"):
        read_checkpoint(small_checkpoint)
    (small_checkpoint / "meta.moved").rename(small_checkpoint / "meta.json")
    (small_checkpoint / MANIFEST).unlink()  # its meta.json says there is one
    with pytest.raises(CheckpointError, match="^step-000003: manifest.json is missing$"):
        read_checkpoint(small_checkpoint)


def test_a_checkpoint_from_before_manifests_loads_unchecked_and_fails_only_when_it_does_not_load(small_checkpoint):
    (small_checkpoint / MANIFEST).unlink()
    meta = json.loads((small_checkpoint / "meta.json").read_text())
    del meta["format"]
    (small_checkpoint / "meta.json").write_text(json.dumps(meta))
    assert read_checkpoint(small_checkpoint)[0]["step"] == 3
    flip_bytes(small_checkpoint / "weights.safetensors", at=0)  # its header's length
    with pytest.raises(CheckpointError, match="^step-000003: weights.safetensors does not load"):
        read_checkpoint(small_checkpoint)


# ---- a full disk ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def small_disk(path: Path, megabytes: int):
    """A tmpfs of `megabytes` mounted at `path` for the block (root only; the test is skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs takes root")
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def resize(path: Path, megabytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={megabytes}m", str(path)], check=True)


def test_a_checkpoint_that_fills_the_disk_fails_the_run_and_leaves_the_previous_ones(tmp_path, straight):
    """32 MB hold two checkpoints of the tiny model (12.7 MB each), not the last step's third."""
    with small_disk(tmp_path / "disk", 32) as disk:
        result = CliRunner().invoke(app, ["run", *THREE, "--out", str(disk), "--name", "r"])
        assert result.exit_code == 1, result.output
        run = disk / "r"
        summary = read_json(run / "summary.json")
        assert summary["status"] == "failed" and summary["steps"] == 3, summary
        assert summary["error"] == (
            f"OSError: [Errno 28] No space left on device (writing {run / 'checkpoints' / 'step-000003'})"
        )
        unwrapped = "".join(result.output.split())  # the console wraps long paths anywhere
        assert "".join(f"Error: training failed: {summary['error']}".split()) in unwrapped
        assert temporary_files(run) == []  # the half-written checkpoint's files are gone, their space free
        assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000001", "step-000002"]
        assert read_checkpoint(run / "checkpoints" / "step-000002")[0]["step"] == 2  # whole, by its manifest
        assert [row["step"] for row in rows(run)] == [0, 1, 2, 3]  # every row whole

        resize(disk, 64)
        resumed = CliRunner().invoke(app, ["run", "--resume", str(run)])
        assert resumed.exit_code == 0, resumed.output
        assert read_json(run / "summary.json")["resumed_from_step"] == 2
        same_result(run, straight)


def test_a_write_that_fills_the_disk_leaves_the_file_as_it_was(tmp_path):
    with small_disk(tmp_path / "disk", 1) as disk:
        (disk / "summary.json").write_text('{"status": "running"}')
        log = disk / "metrics.jsonl"
        log.write_bytes(b'{"step": 1}\n')
        with pytest.raises(OSError) as raised:
            atomic_write_text(disk / "summary.json", "x" * 2_000_000)
        assert raised.value.errno == errno.ENOSPC
        assert (disk / "summary.json").read_text() == '{"status": "running"}'
        with open(log, "ab", buffering=0) as handle, pytest.raises(OSError) as raised:
            _append(handle, '{"step": 2, "text": "' + "y" * 2_000_000 + '"}\n')
        assert raised.value.errno == errno.ENOSPC and log.read_bytes() == b'{"step": 1}\n'
        assert sorted(p.name for p in disk.iterdir()) == ["metrics.jsonl", "summary.json"]


def test_when_the_summary_cannot_record_the_failure_stderr_says_so(tmp_path, monkeypatch):
    real = RunDir.write_summary

    def write_summary(self, summary):
        if summary["status"] != "running":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, summary)

    monkeypatch.setattr(RunDir, "write_summary", write_summary)
    result = CliRunner().invoke(app, ["run", *TINY, "--out", str(tmp_path), "--name", "r"])
    assert result.exit_code == 1, result.output
    assert (
        f"Error: {tmp_path / 'r' / 'summary.json'} could not record status failed (OSError: [Errno 28] No "
        "space left on device); the run ended with OSError: [Errno 28] No space left on device"
    ) in result.stderr
    assert read_json(tmp_path / "r" / "summary.json")["status"] == "running"  # what it said last
