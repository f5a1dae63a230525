"""Where `run`, `eval` and `export` write is checked before any work (issue 25 item 9): a --out that is a file
or cannot be written, a --name that is not one plain directory name or is too long, an eval --output in a
directory that cannot be written: each exits 2 with Error: and Hint: and writes nothing."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from bridgectl.cli.app import app

TINY = ["recipe=sft", "train.threads=1", "train.max_steps=1", "sft.batch_size=4", "eval.n=4"]


def refused(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output and "Hint:" in result.output and "Traceback" not in result.output
    return " ".join(result.output.split())


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a file, not a directory" in refused(["run", *TINY, "--out", str(tmp_path / "file" / "runs")])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_out_that_cannot_be_written_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "is not writable" in refused(["run", *TINY, "--out", str(locked)])


def test_out_on_a_read_only_file_system_is_refused(tmp_path):
    """A real read-only mount (root only: a read-only bind mount of a directory of tmp_path)."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    if os.system(f"mount --bind {readonly} {readonly} 2>/dev/null && mount -o remount,bind,ro {readonly} 2>/dev/null"):
        os.system(f"umount {readonly} 2>/dev/null")
        pytest.skip("bind mounts are not allowed here")
    try:
        assert "is not writable" in refused(["run", *TINY, "--out", str(readonly)])
        assert not any(readonly.iterdir())
    finally:
        os.system(f"umount {readonly}")


@pytest.mark.parametrize("name", ["../escaped", "a/b", "..", ".", "/abs/path", ""])
def test_name_must_be_one_directory_name(tmp_path, name):
    assert "is not a plain directory name" in refused(["run", *TINY, "--out", str(tmp_path / "runs"), "--name", name])
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "runs").exists()


def test_a_very_long_name_is_refused(tmp_path):
    assert "bytes long" in refused(["run", *TINY, "--out", str(tmp_path), "--name", "x" * 300])


def test_eval_output_is_checked_before_evaluating(tmp_path):
    (tmp_path / "file").write_text("x")
    text = refused(["eval", "tiny", "model=tiny", "--output", str(tmp_path / "file" / "e.json")])
    assert "is a file, not a directory" in text
    assert "is a directory" in refused(["eval", "tiny", "model=tiny", "--output", str(tmp_path)])


def test_export_out_is_checked_before_merging(tmp_path):
    (tmp_path / "file").write_text("x")
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", *TINY, "--out", str(tmp_path), "--name", "run"])
    assert result.exit_code == 0, result.output
    assert "is a file, not a directory" in refused(["export", str(run), "--out", str(tmp_path / "file" / "m")])
