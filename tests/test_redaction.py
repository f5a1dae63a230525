"""Secret redaction never changes what a run's files parse to (rundir/redaction.py), and every reader of run
directories survives one whose config.yaml does not parse: `compare` and `runs` leave it out and say why,
`eval`, `export` and `run --resume` refuse it with Error:/Hint: (exit 2) naming the file.

The reproduction: `MY_API_KEY=abc123 bridgectl run ... tracker.wandb.entity=abc123` used to write `entity: ***`
(redaction replaced text inside the YAML), which YAML reads as an alias, so every later reader of the run failed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.rundir.redaction import MIN_SECRET_LENGTH, is_secret_name, redact, secret_values

BUDGET = [
    "train.threads=1",
    "train.max_steps=2",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "sft.batch_size=4",
    "eval.n=8",
    "train.eval_every=0",
]
LONG_SECRET = "hf_Repro0123456789abcdefXYZ"  # an HF-token-like value: long enough to be redacted
CORRUPT_YAML = "tracker:\n  wandb:\n    entity: ***\n  bad: [\n"  # what the old text redaction could leave


def plain(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines (and paths) at the console width


def check_user_error(output: str, *messages: str) -> None:
    """Error: and Hint: lines, no traceback, each of `messages` in the Error part."""
    lines = output.splitlines()
    assert any(line.startswith("Error:") for line in lines), output
    assert any(line.startswith("Hint:") for line in lines), output
    assert "Traceback" not in output
    error_part = plain(output).partition("Hint:")[0].replace(" ", "")
    for message in messages:
        assert message.replace(" ", "") in error_part, output  # spaces dropped: a wrap may split a path anywhere


@pytest.fixture(scope="module")
def repro_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """The issue's reproduction through the real CLI, plus a secret long enough to be redacted as a whole value:
    MY_API_KEY=abc123 with tracker.wandb.entity=abc123, and HF_TOKEN=LONG_SECRET with tracker.wandb.project set
    to it. Returns the run directory and the run's overrides."""
    root = tmp_path_factory.mktemp("repro")
    overrides = ["recipe=rl", *BUDGET, "tracker.wandb.entity=abc123", f"tracker.wandb.project={LONG_SECRET}"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MY_API_KEY", "abc123")
        env.setenv("HF_TOKEN", LONG_SECRET)
        result = CliRunner().invoke(app, ["run", *overrides, "--out", str(root), "--name", "repro"])
    assert result.exit_code == 0, result.output
    return root / "repro", overrides


def test_the_reproductions_config_parses_and_round_trips(repro_run):
    """abc123 (6 characters) is below MIN_SECRET_LENGTH, so the entity is kept; the long secret becomes a quoted
    '***'. Everything else reads back exactly as the config the run was composed from."""
    from bridgectl.config.compose import compose

    run, overrides = repro_run
    text = (run / "config.yaml").read_text()
    parsed = yaml.safe_load(text)
    assert len("abc123") < MIN_SECRET_LENGTH and parsed["tracker"]["wandb"]["entity"] == "abc123"
    assert parsed["tracker"]["wandb"]["project"] == "***" and "project: '***'" in text
    assert LONG_SECRET not in text
    expected = OmegaConf.to_container(compose(overrides), resolve=True)
    expected["tracker"]["wandb"]["project"] = "***"
    assert OmegaConf.to_container(OmegaConf.load(run / "config.yaml")) == expected


def test_the_reproduction_is_compared_and_its_config_loads_for_eval(repro_run):
    from bridgectl.training.eval_run import config_for

    run, _ = repro_run
    result = CliRunner().invoke(app, ["compare", str(run), "--format", "json"])
    assert result.exit_code == 0, result.output
    groups = json.loads(result.stdout)["groups"]
    assert [(g["group"], g["n"]) for g in groups] == [("rl", 1)]
    cfg, checkpoint = config_for(str(run), ["eval.n=4"])
    assert cfg.tracker.wandb.entity == "abc123" and cfg.tracker.wandb.project == "***" and cfg.eval.n == 4
    assert checkpoint == run / "checkpoints" / "final"


@pytest.mark.parametrize(
    "name",
    [
        "MY_API_KEY",
        "HF_TOKEN",
        "WANDB_API_KEY",
        "DB_PASSWORD",
        "CLIENT_SECRET",
        "authToken",
        "OPENAI_APIKEY",
        "HOME_ASSISTANT_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
    ],
)
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "TOKENIZER_PATH",
        "TOKENIZERS_PARALLELISM",
        "HF_TOKEN_PATH",
        "SSL_KEY_FILE",
        "KEY_DIR",
        "SECRETS_HOME",
        "API_KEY_FILENAME",
        "MONKEY",
        "PWD",
        "PATH",
    ],
)
def test_names_that_are_not_secrets(name):
    assert not is_secret_name(name)


def test_path_like_variables_are_never_redacted(tmp_path, monkeypatch):
    """A variable named like a location keeps a config value equal to it, whether or not the path exists; a
    secret-named variable holding an existing path (where a key lies) is no secret either."""
    key_file = tmp_path / "id_ed25519"
    key_file.write_text("not read")
    monkeypatch.setenv("TOKENIZER_PATH", "/models/tokenizer-0123456789")  # does not exist: the name decides
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path))
    monkeypatch.setenv("SSH_KEY", str(key_file))
    secrets = secret_values()
    assert not {"/models/tokenizer-0123456789", str(tmp_path), str(key_file)} & set(secrets)
    value = {"tokenizer": "/models/tokenizer-0123456789", "dir": str(tmp_path), "key": str(key_file)}
    assert redact(value) == value


def test_short_and_common_values_are_not_secrets(monkeypatch):
    monkeypatch.setenv("MY_API_KEY", "abc123")
    monkeypatch.setenv("SECRET_BACKEND", "localhost")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert secret_values({"MY_API_KEY": "abc123", "SECRET_BACKEND": "localhost"}) == []
    assert redact({"entity": "abc123", "host": "localhost", "k": "0123456789abcdef"}) == {
        "entity": "abc123",
        "host": "localhost",
        "k": "***",
    }


def test_a_whole_value_secret_is_redacted_and_the_file_keeps_its_structure(tmp_path, monkeypatch):
    """Every secret-bearing value becomes the string '***'; keys, numbers, booleans and every other value read back
    as they were, whatever YAML would make of `***` or of a secret that looks like a number or a mapping."""
    from bridgectl.config.compose import compose
    from bridgectl.rundir.writer import RunDir

    monkeypatch.setenv("WANDB_API_KEY", "&anchor: {not: yaml}")  # redacted text would change the file's meaning
    monkeypatch.setenv("DB_PASSWORD", "12345678")
    cfg = compose(
        [
            "recipe=rl",
            "tracker.wandb.entity='&anchor: {not: yaml}'",
            "tracker.wandb.project='12345678'",
            "recipe.description=plain words",
        ]
    )
    run = RunDir(tmp_path / "r")
    run.write_config(cfg)
    run.close()
    parsed = OmegaConf.to_container(OmegaConf.load(tmp_path / "r" / "config.yaml"))
    expected = OmegaConf.to_container(cfg, resolve=True)
    assert expected["tracker"]["wandb"]["entity"] == "&anchor: {not: yaml}"
    expected["tracker"]["wandb"].update(entity="***", project="***")
    assert parsed == expected
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text()) == expected


def test_a_secret_inside_free_text_is_redacted_in_every_log(tmp_path, monkeypatch):
    """Completion text, a summary's error line, a metrics row and a per-problem row: the secret inside the text is
    replaced, the rest of the text kept, and each file still parses as JSON."""
    from bridgectl.rundir.writer import RunDir

    monkeypatch.setenv("CLIENT_SECRET", LONG_SECRET)
    run = RunDir(tmp_path / "r")
    run.log_completions(1, [{"prompt": "2+2=", "completion": f'4 "quoted" {LONG_SECRET}\n', "reward": 1.0}])
    run.log_metrics(1, f"rl-{LONG_SECRET}", {"train/loss": 0.5})
    run.log_problems(1, [{"split": "test", "answers": [f"x{LONG_SECRET}"]}])
    run.write_summary({"status": "failed", "error": f"ValueError: token {LONG_SECRET} refused", "steps": 1})
    run.close()
    directory = tmp_path / "r"
    completion = json.loads((directory / "completions.jsonl").read_text())
    assert completion == {"step": 1, "prompt": "2+2=", "completion": '4 "quoted" ***\n', "reward": 1.0}
    metrics = json.loads((directory / "metrics.jsonl").read_text())
    assert metrics["stage"] == "rl-***" and metrics["train/loss"] == 0.5
    assert json.loads((directory / "eval_problems.jsonl").read_text())["answers"] == ["x***"]
    summary = json.loads((directory / "summary.json").read_text())
    assert summary == {"status": "failed", "error": "ValueError: token *** refused", "steps": 1}
    assert not [p for p in directory.rglob("*") if p.is_file() and LONG_SECRET.encode() in p.read_bytes()]


# ---- readers of a run directory with one damaged config.yaml --------------------------------------------------
def make_run(
    root: Path, name: str, seed: int, accuracy: float, config: str | None = None, status: str = "completed"
) -> Path:
    """A hand-made run directory: config.yaml (`config`, else a small valid one), summary.json, metrics.jsonl and
    an empty checkpoints/final (eval and export look for it before they read the config)."""
    path = root / name
    (path / "checkpoints" / "final").mkdir(parents=True)
    (path / "config.yaml").write_text(
        config if config is not None else f"recipe:\n  name: rl\ntask:\n  name: arith\nseed: {seed}\n"
    )
    (path / "metrics.jsonl").write_text(
        json.dumps({"step": 2, "stage": "rl", "wall_s": 10.0, "eval/test/accuracy": accuracy}) + "\n"
    )
    summary = {
        "status": status,
        "recipe": "rl",
        "seed": seed,
        "task": "arith",
        "model": "tiny",
        "wall_s": 10.0,
        "steps": 2,
        "stages": [{"kind": "rl", "steps": 2}],
        "eval": {"test": {"accuracy": accuracy, "n": 8}},
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def runs_with_a_corrupt_one(tmp_path) -> Path:
    make_run(tmp_path / "runs", "good-0", 0, 0.5)
    make_run(tmp_path / "runs", "good-1", 1, 0.75)
    make_run(tmp_path / "runs", "corrupt", 2, 0.9, config=CORRUPT_YAML)
    return tmp_path / "runs"


def test_compare_leaves_out_a_run_whose_config_does_not_parse(runs_with_a_corrupt_one):
    from bridgectl.analysis import compare

    loaded = compare.load_runs([str(runs_with_a_corrupt_one)])
    assert sorted(run.path.name for run in loaded.runs) == ["good-0", "good-1"]
    assert loaded.left_out == {"unreadable": 1}
    assert loaded.unreadable == [
        f"{runs_with_a_corrupt_one / 'corrupt' / 'config.yaml'} does not parse as YAML "
        "(line 3, column 14: expected alphabetic or numeric character, but found '*')"
    ]
    result = CliRunner().invoke(app, ["compare", str(runs_with_a_corrupt_one), "--format", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    (group,) = document["groups"]
    assert group["group"] == "rl" and group["n"] == 2
    assert group["eval/test/accuracy/mean"] == pytest.approx(0.625)  # the corrupt run's 0.9 is not in it
    assert "Left out: 1 unreadable." in document["notes"]
    assert "Warning: left out an unreadable run:" in result.stderr and "corrupt/config.yaml" in result.stderr


def test_compare_of_only_a_corrupt_run_says_why(tmp_path):
    make_run(tmp_path, "corrupt", 0, 0.5, config=CORRUPT_YAML)
    result = CliRunner().invoke(app, ["compare", str(tmp_path)])
    assert result.exit_code == 2
    check_user_error(result.output, "no completed runs to compare")
    assert "does not parse as YAML" in plain(result.output)


def test_runs_reports_the_corrupt_run_and_lists_the_rest(runs_with_a_corrupt_one):
    from bridgectl.analysis import runs

    result = CliRunner().invoke(app, ["runs", str(runs_with_a_corrupt_one), "--format", "json"])
    assert result.exit_code == 0, result.output
    found = {run["name"]: run for run in json.loads(result.stdout)}
    assert [found[name]["status"] for name in ("corrupt", "good-0", "good-1")] == [
        "unreadable",
        "completed",
        "completed",
    ]
    assert found["corrupt"]["error"] == (
        "config.yaml does not parse as YAML (line 3, column 14: expected alphabetic "
        "or numeric character, but found '*')"
    )
    assert found["corrupt"]["seed"] == 2 and found["corrupt"]["eval"] == {"test": 0.9}  # the summary still reads
    assert found["good-1"]["error"] is None and found["good-1"]["eval"] == {"test": 0.75}
    table = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["runs", str(runs_with_a_corrupt_one)])
    assert table.exit_code == 0, table.output
    shown = {
        cells[0]: cells[3]
        for cells in ([c.strip() for c in line.split("│")[1:-1]] for line in table.output.splitlines())
        if cells
    }
    assert shown == {"corrupt": runs.status_cell(found["corrupt"]), "good-0": "completed", "good-1": "completed"}
    assert shown["corrupt"].startswith("unreadable: config.yaml does not parse as YAML (line 3")


@pytest.mark.parametrize("command", ["eval", "export", "resume"])
def test_a_run_whose_config_does_not_parse_is_refused_with_error_and_hint(tmp_path, command):
    run = make_run(
        tmp_path, "corrupt", 0, 0.5, config=CORRUPT_YAML, status="interrupted" if command == "resume" else "completed"
    )
    args = {
        "eval": ["eval", str(run)],
        "export": ["export", str(run), "--out", str(tmp_path / "out")],
        "resume": ["run", "--resume", str(run)],
    }[command]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    check_user_error(result.output, f"{run / 'config.yaml'} does not parse as YAML", "line 3, column 14")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content,what",
    [
        ("- a\n- b\n", "does not hold a mapping of config keys"),
        ("a: 1\na: 2\n", "does not parse as YAML (line 2, column 1: found duplicate key a)"),
    ],
)
def test_other_unreadable_configs_are_reported_the_same_way(tmp_path, content, what):
    from bridgectl.analysis import compare
    from bridgectl.config.saved import config_problem

    make_run(tmp_path, "good", 0, 0.5)
    bad = make_run(tmp_path, "bad", 1, 0.5, config=content)
    loaded = compare.load_runs([str(tmp_path)])
    assert [run.path.name for run in loaded.runs] == ["good"] and loaded.left_out == {"unreadable": 1}
    assert what in config_problem(bad) and config_problem(tmp_path / "good") is None
