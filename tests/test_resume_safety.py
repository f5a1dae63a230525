"""What `--resume` (and eval and export) refuse rather than guess: a config.yaml cut short or missing keys (the run
would go on with defaults in their place), told from one an older bridgectl wrote without keys added since; and a
run that is still running in another process (two processes would write one run directory)."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from processes import TINY, finish, read_json, start_run, wait_for
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.config.compose import compose
from bridgectl.config.saved import CONFIG_END, config_text, load_saved
from bridgectl.errors import UserError


def plain(output: str) -> str:
    return " ".join(output.split())


def squashed(text: str) -> str:
    """`text` without whitespace: the console wraps a path longer than a line anywhere, even inside it."""
    return "".join(text.split())


def error_and_hint(output: str) -> tuple[str, str]:
    """The Error: and Hint: texts of a refused command, squashed."""
    text = squashed(output)
    assert "Error:" in text and "Hint:" in text, output
    return text.split("Error:", 1)[1].split("Hint:")[0], text.split("Hint:", 1)[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A completed TINY run."""
    out = tmp_path_factory.mktemp("trained")
    result = CliRunner().invoke(app, ["run", *TINY, "--out", str(out), "--name", "r"])
    assert result.exit_code == 0, result.output
    return out / "r"


def stopped_copy(trained: Path, where: Path) -> Path:
    """A copy of the completed run whose summary says interrupted, so --resume accepts it."""
    run = Path(shutil.copytree(trained, where))
    summary = read_json(run / "summary.json")
    (run / "summary.json").write_text(json.dumps(dict(summary, status="interrupted")))
    return run


def cut_after(text: str, line: str) -> str:
    """`text` up to and including its first line equal to `line`."""
    index = text.index(f"\n{line}\n")
    return text[: index + len(line) + 2]


def without_line(text: str, line: str) -> str:
    return text.replace(f"\n{line}\n", "\n", 1)


@pytest.mark.parametrize(
    "damage, missing",
    [
        (lambda text: cut_after(text, "train:"), "train.max_steps"),  # the reproduction
        (lambda text: cut_after(text, "tracker:"), "tracker.wandb.mode, tracker.wandb.project"),
        (lambda text: text[: -len(CONFIG_END) - 1], None),  # only the end line gone: no key missing, still cut short
        (lambda text: without_line(text, "  max_steps: 2"), "train.max_steps"),  # one key deleted from the middle
    ],
    ids=["after-train-line", "before-tracker", "end-line", "one-key"],
)
def test_a_config_cut_short_or_missing_keys_is_refused_not_filled_with_defaults(trained, tmp_path, damage, missing):
    run = stopped_copy(trained, tmp_path / "r")
    config = damage((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(config)
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "summary.json", "metrics.jsonl")}
    for args in (
        ["run", "--resume", str(run)],
        ["eval", str(run)],
        ["export", str(run), "--out", str(tmp_path / "exported")],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        error, hint = error_and_hint(result.output)
        assert error.startswith(squashed(f"{run / 'config.yaml'} is cut short or has lost keys")), error
        if missing is None:
            assert squashed(f"its last line is not '{CONFIG_END}'") in error and "missing" not in error
        else:
            assert squashed(f"missing: {missing}") in error
        assert squashed("never fills a run's missing keys with defaults") in hint
    assert {name: (run / name).read_bytes() for name in before} == before  # nothing rewritten, nothing trained
    assert not (tmp_path / "exported").exists()


def test_a_config_of_an_older_bridgectl_loads_with_defaults_for_the_keys_added_since(tmp_path):
    """An older writer did not know tracker.tensorboard: its file records and holds one key fewer, and is whole.
    A file from before key counts were recorded is whole when it ends with `seed`; cut short, it does not."""
    data = OmegaConf.to_container(compose(["recipe=sft", "train.max_steps=7"]), resolve=True)
    del data["tracker"]["tensorboard"]
    path = tmp_path / "config.yaml"
    path.write_text(config_text(data))  # what an older bridgectl wrote: its own count
    loaded = load_saved(path)
    assert loaded.train.max_steps == 7 and loaded.tracker.tensorboard is False  # the default of the added key

    legacy = OmegaConf.to_yaml(OmegaConf.create(data))  # no first line, no end line: before counts existed
    path.write_text(legacy)
    assert load_saved(path).train.max_steps == 7
    for cut, why in ((cut_after(legacy, "train:"), "it does not end with `seed`"), ("", "it holds no keys")):
        path.write_text(cut)
        with pytest.raises(UserError, match=why):
            load_saved(path)


def test_an_older_run_without_a_key_count_still_resumes(trained, tmp_path):
    """A run directory written before config.yaml recorded its key count: --resume accepts it (the plan shows)."""
    run = stopped_copy(trained, tmp_path / "r")
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.split("\n", 1)[1].removesuffix(f"{CONFIG_END}\n"))
    result = CliRunner().invoke(app, ["run", "--resume", str(run), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "plan: recipe sft: sft x 2 steps" in plain(result.output)


@pytest.mark.slow
def test_resuming_a_run_that_is_still_running_is_refused(tmp_path):
    run = tmp_path / "live"
    process = start_run(
        [*TINY, "train.max_steps=100000", "train.checkpoint_every=0", "--out", str(tmp_path), "--name", "live"]
    )
    try:
        wait_for(
            lambda: (
                (read_json(run / "heartbeat.json") or {}).get("phase") == "training"
                and (run / "metrics.jsonl").stat().st_size > 0
            ),
            process,
            "training",
        )
        summary = read_json(run / "summary.json")
        refused = CliRunner().invoke(app, ["run", "--resume", str(run)])
        assert refused.exit_code == 2, refused.output
        error, hint = error_and_hint(refused.output)
        assert error.startswith(squashed(f"run {run} is still running (pid {process.pid} on ")), error
        assert "training;heartbeat" in error and "stopitfirst" in hint
        # the runner refuses too (a sweep's retry calls it directly), before writing anything
        from bridgectl.training.runner import run as run_training

        with pytest.raises(UserError, match="is still running"):
            run_training(load_saved(run / "config.yaml"), run, show_progress=False, resume=True)
        assert read_json(run / "summary.json") == summary and read_json(run / "heartbeat.json")["pid"] == process.pid
        process.send_signal(signal.SIGINT)
        output = finish(process)
        assert process.returncode == 130, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert read_json(run / "summary.json")["status"] == "interrupted"
    accepted = CliRunner().invoke(app, ["run", "--resume", str(run), "--dry-run"])  # its process has ended
    assert accepted.exit_code == 0, accepted.output
