"""`bridgectl sweep` around where it runs and what it stores in: under torchrun (each rank would be an Optuna
worker of its own), an RDB URL whose database driver is not installed and SQLite with several workers exit 2 with
Error: and Hint: before anything is written; a postgresql:// URL opens with psycopg 3."""

from __future__ import annotations

import importlib.util

from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.sweep import study as sweep

SPEC = (
    "name: s\nbase: [recipe=rl, train.max_steps=1]\nsampler: grid\nparams:\n  rl.lr: {type: float, values: [1.0e-4]}\n"
)


def sweep_cli(tmp_path, *args, env=None):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    return CliRunner().invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "out"), *args], env=env)


def test_a_sweep_under_torchrun_exits_2_saying_why(tmp_path):
    result = sweep_cli(tmp_path, env={"LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    assert result.exit_code == 2 and "running under torchrun" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_sqlite_with_several_workers_is_refused_and_with_one_it_is_used_as_given(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = sweep_cli(tmp_path, "--storage", url, "--workers", "2")
    assert result.exit_code == 2 and "SQLite's file locks" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists() and not (tmp_path / "study.db").exists()
    assert sweep.storage_url(url, workers=1) == url


def test_a_postgresql_url_is_opened_with_psycopg_3_and_a_missing_driver_is_named(tmp_path):
    """SQLAlchemy 2 reads postgresql:// as psycopg2; with only psycopg 3 installed (the dev and slurm extras
    install it) the URL names psycopg 3. A URL whose driver is missing exits 2 naming the package."""
    if importlib.util.find_spec("psycopg2") is None:
        assert sweep.storage_url("postgresql://user@localhost:5432/study", workers=2) == (
            "postgresql+psycopg://user@localhost:5432/study"
        )
    assert sweep.storage_url("postgresql+psycopg://u@h/db", workers=2) == "postgresql+psycopg://u@h/db"
    missing = "mysql+pymysql" if importlib.util.find_spec("pymysql") is None else None
    if missing is not None:
        result = sweep_cli(tmp_path, "--storage", f"{missing}://user@localhost/study")
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and "needs the pymysql package" in said and not (tmp_path / "out").exists()


def test_a_database_that_is_not_there_exits_2_naming_it_without_the_password(tmp_path):
    from postgres import free_port

    url = f"postgresql://bridgectl:secret@127.0.0.1:{free_port()}/study"  # nothing listens there
    result = sweep_cli(tmp_path, "--storage", url)
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "Error: cannot open the study storage" in said and "Hint:" in said
    assert "bridgectl@127.0.0.1" in said and "secret" not in said and "Traceback" not in said
    assert not (tmp_path / "out").exists()
