"""`bridgectl compare` on hand-made run directories with known numbers."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from bridgectl.analysis import compare, tables
from bridgectl.analysis.audit import FACTS
from bridgectl.analysis.rows import Difference, GroupRow, Metric, MetricSummary
from bridgectl.cli.app import app


def make_run(
    root: Path,
    name: str,
    recipe: str,
    seed: int,
    test_acc: float,
    ood_acc: float = 0.5,
    status: str = "completed",
    task: str = "arith",
    lam: float = 0.5,
    curve=None,
    wall_s: float = 100.0,
    extra_lines: tuple[str, ...] = (),
) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(
        f"recipe:\n  name: {recipe}\nbridge:\n  lam: {lam}\ntask:\n  name: {task}\nseed: {seed}\n"
    )
    curve = curve or [(0.0, 0.1), (wall_s, test_acc)]
    rows = [{"step": i, "stage": "x", "wall_s": t, "eval/test/accuracy": a} for i, (t, a) in enumerate(curve)]
    (path / "metrics.jsonl").write_text("\n".join([json.dumps(r) for r in rows] + list(extra_lines)) + "\n")
    summary = {
        "status": status,
        "recipe": recipe,
        "seed": seed,
        "task": task,
        "model": "tiny",
        "wall_s": wall_s,
        "gen_tokens": 1000 * (seed + 1),
        "peak_mem_mb": 500.0,
        "eval": {"test": {"accuracy": test_acc, "n": 100}, "ood": {"accuracy": ood_acc, "n": 100}},
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def sweep(tmp_path):
    for seed, acc in enumerate([0.60, 0.70, 0.80]):
        make_run(tmp_path / "runs", f"rl-{seed}", "rl", seed, acc, curve=[(0, 0.2), (10, 0.6), (20, acc)])
    for seed, acc in enumerate([0.85, 0.90, 0.95]):
        make_run(
            tmp_path / "runs",
            f"bridge-{seed}",
            "bridge",
            seed,
            acc,
            lam=0.3,
            curve=[(0, 0.2), (10, 0.5), (20, 0.9), (30, acc)],
        )
    make_run(tmp_path / "runs", "sft-0", "sft", 0, 0.9)
    make_run(tmp_path / "runs", "rl-dead", "rl", 9, 0.0, status="failed")
    make_run(tmp_path / "runs", "rl-stopped", "rl", 8, 0.0, status="interrupted")
    return tmp_path / "runs"


def by_group(rows):
    return {r.group: r for r in rows}


def results_table(markdown: str) -> list[str]:
    """The lines of compare's results table(s) in its markdown output, without the differences table under them
    (test_readme_differences_are_what_compare_prints checks that one)."""
    return [line for line in markdown.split(tables.DIFFERENCES_TITLE)[0].splitlines() if line.startswith("|")]


def test_means_stds_n_and_student_t_intervals(sweep):
    loaded = compare.load_runs([str(sweep)])
    assert loaded.left_out == {"failed": 1, "interrupted": 1}
    rows = by_group(compare.compare(loaded, ["recipe"], "eval/test/accuracy", None))
    rl = rows["rl"]
    assert rl.n == 3 and rl.too_few_seeds and rows["sft"].too_few_seeds  # fewer than 5 seeds are marked
    accuracy = rl.metrics["eval/test/accuracy"]
    assert accuracy.mean == pytest.approx(0.70)
    assert accuracy.std == pytest.approx(np.std([0.6, 0.7, 0.8], ddof=1))
    low, high = stats.t.interval(0.95, df=2, loc=0.7, scale=stats.sem([0.6, 0.7, 0.8]))
    assert accuracy.ci_low == pytest.approx(low) and accuracy.ci_high == pytest.approx(high)
    # at n = 3 the interval reaches beyond the runs themselves (a bootstrap over seeds could not: [0.6, 0.8])
    assert accuracy.ci_low < 0.6 and accuracy.ci_high > 0.8
    assert rows["sft"].metrics["eval/test/accuracy"].ci_low is None  # one seed: no interval at all
    assert rl.gen_tokens == pytest.approx(2000) and rl.wall_s == pytest.approx(100)


def test_mean_interval_stays_within_0_and_1(tmp_path):
    """Accuracies near the ceiling: the t interval of [0.9, 1.0] reaches past 1, which no mean of shares can."""
    for seed, acc in enumerate([0.9, 1.0]):
        make_run(tmp_path, f"r{seed}", "rl", seed, acc)
    row = compare.compare(compare.load_runs([str(tmp_path)]), ["recipe"], "eval/test/accuracy", None)[0]
    assert stats.t.interval(0.95, df=1, loc=0.95, scale=stats.sem([0.9, 1.0]))[1] > 1
    accuracy = row.metrics["eval/test/accuracy"]
    assert accuracy.ci_high == 1.0 and 0 <= accuracy.ci_low < 0.9


def test_sampled_metrics_are_compared_and_plotted_as_pass_at_k_curves(tmp_path):
    """Runs evaluated with eval.k: compare carries every pass@j/maj@j/mean@n with its own t interval, the table shows
    pass@k at the largest k, and --report draws pass@k against k."""
    for seed, (p1, p2, p4) in enumerate([(0.5, 0.65, 0.8), (0.6, 0.7, 0.85)]):
        path = make_run(tmp_path / "runs", f"rl-{seed}", "rl", seed, p1)
        summary = json.loads((path / "summary.json").read_text())
        summary["eval"]["test"].update({"pass@1": p1, "pass@2": p2, "pass@4": p4, "maj@4": p1, "mean@4": p1})
        (path / "summary.json").write_text(json.dumps(summary))
    row = compare.compare(compare.load_runs([str(tmp_path / "runs")]), ["recipe"], "eval/test/accuracy", None)[0]
    assert row.metrics["eval/test/pass@4"].mean == pytest.approx(0.825)
    assert row.metrics["eval/test/pass@2"].mean == pytest.approx(0.675)
    low, high = stats.t.interval(0.95, df=1, loc=0.825, scale=stats.sem([0.8, 0.85]))
    assert row.metrics["eval/test/pass@4"].ci_low == pytest.approx(max(low, 0.0))
    assert row.metrics["eval/test/pass@4"].ci_high == pytest.approx(min(high, 1.0))
    result = CliRunner().invoke(
        app, ["compare", str(tmp_path / "runs"), "--format", "markdown", "--report", str(tmp_path / "report")]
    )
    assert result.exit_code == 0, result.output
    assert "test pass@4 %" in result.output and "test pass@2 %" not in result.output  # the largest k only
    assert (tmp_path / "report" / "pass_at_k.png").read_bytes()[:4] == b"\x89PNG"


def test_baseline_difference_is_welchs_and_time_to_target(sweep):
    rows = by_group(compare.compare(compare.load_runs([str(sweep)]), ["recipe"], "eval/test/accuracy", "rl"))
    bridge = rows["bridge"]
    welch = stats.ttest_ind([0.85, 0.90, 0.95], [0.6, 0.7, 0.8], equal_var=False)
    interval = welch.confidence_interval(0.95)
    difference = bridge.difference("eval/test/accuracy")
    assert difference.diff == pytest.approx(0.90 - 0.70)
    assert difference.ci_low == pytest.approx(interval.low)
    assert difference.ci_high == pytest.approx(interval.high)
    assert difference.p == pytest.approx(welch.pvalue)
    assert rows["rl"].is_baseline and rows["rl"].difference("eval/test/accuracy").diff == 0.0
    assert rows["sft"].difference("eval/test/accuracy").ci_low is None  # one seed: no Welch interval
    # target = rl's final mean 0.70; bridge curves cross it between (10, 0.5) and (20, 0.9): t = 10 + 10 * 0.2/0.4
    assert bridge.time_to_target.seconds == pytest.approx(15.0)
    # rl seed 0 ends at 0.60 and never reaches 0.70: the group gets "never" with 2 of 3 runs reaching it
    assert rows["rl"].time_to_target.seconds is None and rows["rl"].time_to_target.reached == 2
    assert rows["rl"].flat()["reached_target"] == "2/3"


def _with_mean_and_std(mean: float, std: float, n: int) -> np.ndarray:
    """n values with exactly this mean and sample standard deviation."""
    pattern = np.linspace(-1, 1, n)
    return mean + std * (pattern - pattern.mean()) / pattern.std(ddof=1)


@pytest.mark.parametrize("diff, std_a, std_b", [(0.02, 0.03, 0.05), (0.05, 0.04, 0.04), (0.01, 0.02, 0.01)])
def test_seeds_needed_is_where_welch_would_first_separate_the_difference(diff, std_a, std_b):
    a, b = _with_mean_and_std(0.5 + diff, std_a, 3), _with_mean_and_std(0.5, std_b, 3)
    needed = compare.stats.seeds_needed(list(a), list(b))
    assert needed is not None and needed > 2

    def p_at(n):  # scipy's Welch test on n seeds per group with the same means and spreads
        return stats.ttest_ind(
            _with_mean_and_std(0.5 + diff, std_a, n), _with_mean_and_std(0.5, std_b, n), equal_var=False
        ).pvalue

    assert p_at(needed) < 0.05 <= p_at(needed - 1)


def _paired_run(root: Path, name: str, recipe: str, seed: int, rewards: list[int], fingerprint: str = "abc") -> None:
    make_run(root, name, recipe, seed, sum(rewards) / len(rewards))
    summary = json.loads((root / name / "summary.json").read_text())
    summary["steps"] = 100
    (root / name / "summary.json").write_text(json.dumps(summary))
    lines = [
        {"step": 0, "split": "test", "problems": fingerprint, "rewards": [0] * len(rewards)},
        {"step": 100, "split": "test", "problems": fingerprint, "rewards": rewards},
    ]
    (root / name / "eval_problems.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_paired_comparison_finds_a_difference_confined_to_known_problems(tmp_path):
    """Two recipes identical but for 30 of 300 problems, which `better` always gets right and `base` never: the
    true difference is 0.10 in every seed. Seeds differ from each other on the other problems, as seeds do."""
    rng = np.random.default_rng(0)
    for seed in range(5):
        shared = (rng.random(300) < 0.5).astype(int)
        base, better = shared.copy(), shared.copy()
        base[:30], better[:30] = 0, 1
        _paired_run(tmp_path, f"base-{seed}", "base", seed, base.tolist())
        _paired_run(tmp_path, f"better-{seed}", "better", seed, better.tolist())
    rows = by_group(compare.compare(compare.load_runs([str(tmp_path)]), ["recipe"], "eval/test/accuracy", "base"))
    better = rows["better"]
    difference = better.difference("eval/test/accuracy")
    assert difference.diff == pytest.approx(0.10)
    low, high = difference.paired_ci_low, difference.paired_ci_high
    assert 0 < low < 0.10 < high < 0.2
    # the problem level: the 30 problems drawn again are Binomial(300, 0.1) / 300, sd 0.017; seeds add their own
    assert high - low > 2 * 1.96 * 0.017 * 0.8
    markdown = CliRunner().invoke(app, ["compare", str(tmp_path), "--baseline", "base", "--format", "markdown"]).output
    assert f"[{100 * low:+.1f}, {100 * high:+.1f}]" in markdown and "two-level bootstrap" in markdown


def test_identical_recipes_paired_interval_covers_zero(tmp_path):
    rng = np.random.default_rng(1)
    for seed in range(5):
        for recipe in ("a", "b"):
            _paired_run(tmp_path, f"{recipe}-{seed}", recipe, seed, (rng.random(200) < 0.6).astype(int).tolist())
    rows = by_group(compare.compare(compare.load_runs([str(tmp_path)]), ["recipe"], "eval/test/accuracy", "a"))
    difference = rows["b"].difference("eval/test/accuracy")
    assert difference.paired_ci_low < 0 < difference.paired_ci_high


def _run_from_base(root: Path, name: str, recipe: str, seed: int, initial: list[int], final: list[int]) -> None:
    """A run whose step-0 evaluation (the base model) got `initial` right and whose final evaluation `final`."""
    _paired_run(root, name, recipe, seed, final)
    summary = json.loads((root / name / "summary.json").read_text())
    summary["eval_initial"] = {"test": {"accuracy": sum(initial) / len(initial), "n": len(initial)}}
    (root / name / "summary.json").write_text(json.dumps(summary))
    lines = [
        {"step": 0, "split": "test", "problems": "abc", "rewards": initial},
        {"step": 100, "split": "test", "problems": "abc", "rewards": final},
    ]
    (root / name / "eval_problems.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_baseline_base_is_the_step0_model_once_per_seed(tmp_path):
    """Two recipes trained from one base model that solves the first 60 of 200 problems: `better` adds 40 more at
    every seed (+0.20), `same` keeps what the base solved and swaps nothing (+0.0 at every seed)."""
    initial = [1] * 60 + [0] * 140
    for seed in range(3):
        gained = [1] * (100 + seed) + [0] * (100 - seed)  # +0.20, +0.205, +0.21
        _run_from_base(tmp_path, f"better-{seed}", "better", seed, initial, gained)
        _run_from_base(tmp_path, f"same-{seed}", "same", seed, initial, initial)
    rows = by_group(compare.compare(compare.load_runs([str(tmp_path)]), ["recipe"], "eval/test/accuracy", "base"))
    base = rows["base"]
    assert base.is_baseline and base.n == 3  # one per seed, not one per run
    assert base.time_to_target is None  # it has no curve to reach a target on
    base_accuracy = base.metrics["eval/test/accuracy"]
    assert base_accuracy.mean == pytest.approx(0.30) and base_accuracy.std == 0.0
    better = rows["better"].difference("eval/test/accuracy")
    assert better.diff == pytest.approx(0.205)
    # the base is the same at every seed: Welch's interval is better's own t interval shifted by the base's mean
    t = stats.t.ppf(0.975, 2) * np.std([0.2, 0.205, 0.21], ddof=1) / np.sqrt(3)
    assert better.ci_low == pytest.approx(0.205 - t, abs=1e-6)
    # paired over the shared problems: the 40 gained problems are what the bootstrap resamples
    assert 0.1 < better.paired_ci_low < 0.205 < better.paired_ci_high
    assert rows["same"].difference("eval/test/accuracy").diff == 0.0
    output = CliRunner().invoke(app, ["compare", str(tmp_path), "--baseline", "base"]).output
    assert "the model the runs started from" in output


def test_baseline_base_needs_step0_evaluations(tmp_path):
    make_run(tmp_path, "rl-0", "rl", 0, 0.5)  # a run without eval_initial: there is no base to compare with
    result = CliRunner().invoke(app, ["compare", str(tmp_path), "--baseline", "base"])
    assert result.exit_code == 2 and "no group 'base'" in result.output


def test_runs_on_different_problems_are_not_paired(tmp_path):
    for seed in range(3):
        _paired_run(tmp_path, f"a-{seed}", "a", seed, [1, 0, 1, seed % 2], fingerprint="one")
        _paired_run(tmp_path, f"b-{seed}", "b", seed, [1, 1, 1, seed % 2], fingerprint="two")
    rows = by_group(compare.compare(compare.load_runs([str(tmp_path)]), ["recipe"], "eval/test/accuracy", "a"))
    assert rows["b"].difference("eval/test/accuracy").paired_ci_low is None
    flat = rows["b"].flat()  # the csv/json form: no paired columns at all, Welch's there
    assert "eval/test/accuracy/paired_ci_low" not in flat and "eval/test/accuracy/diff_ci_low" in flat


def test_time_to_target_interpolates_between_evals(tmp_path):
    run = compare.load_runs([str(make_run(tmp_path, "r", "rl", 0, 0.9, curve=[(0, 0.2), (10, 0.6), (30, 0.9)]))]).runs[
        0
    ]
    assert compare.time_to_target(run, "eval/test/accuracy", 0.75) == pytest.approx(20.0)
    assert compare.time_to_target(run, "eval/test/accuracy", 0.1) == pytest.approx(0.0)
    assert compare.time_to_target(run, "eval/test/accuracy", 0.95) is None


def test_group_by_nested_config_key(sweep):
    for seed in (0, 1):  # bridge-0 and bridge-1 and these two differ in bridge.lam alone
        make_run(sweep, f"bridge-lam7-{seed}", "bridge", seed + 5, 0.85 + 0.05 * seed, lam=0.7)
    (sweep / "bridge-2").rename(sweep.parent / "elsewhere")
    loaded = compare.load_runs([str(sweep / "bridge-*")])
    rows = by_group(compare.compare(loaded, ["bridge.lam"], "eval/test/accuracy", None))
    assert set(rows) == {"0.3", "0.7"}
    assert rows["0.3"].n == 2 and rows["0.3"].metrics["eval/test/accuracy"].mean == pytest.approx(0.875)
    two_keys = by_group(compare.compare(loaded, ["recipe", "bridge.lam"], "eval/test/accuracy", None))
    assert set(two_keys) == {"bridge, 0.3", "bridge, 0.7"}


def test_every_format_carries_the_same_numbers(sweep):
    args = ["compare", str(sweep), "--baseline", "rl"]
    as_json = json.loads(CliRunner().invoke(app, [*args, "--format", "json"]).output)
    as_csv = list(csv.DictReader(io.StringIO(CliRunner().invoke(app, [*args, "--format", "csv"]).output)))
    markdown = CliRunner().invoke(app, [*args, "--format", "markdown"]).output
    table = CliRunner(env={"COLUMNS": "400"}).invoke(app, args).output
    json_rows = {r["group"]: r for r in as_json["groups"]}
    assert set(json_rows) == {r["group"] for r in as_csv} == {"rl", "bridge", "sft"}
    for row in as_csv:
        for key in ("eval/test/accuracy/mean", "eval/test/accuracy/ci_low", "eval/ood/accuracy/diff", "wall_s"):
            expected = json_rows[row["group"]][key]  # None (sft's one seed has no interval) is an empty cell
            assert (row[key] == "") if expected is None else float(row[key]) == pytest.approx(expected)
    bridge = json_rows["bridge"]
    shown = (
        f"{100 * bridge['eval/test/accuracy/mean']:.1f} ± {100 * bridge['eval/test/accuracy/std']:.1f} "
        f"[{100 * bridge['eval/test/accuracy/ci_low']:.1f}, {100 * bridge['eval/test/accuracy/ci_high']:.1f}]"
    )
    assert shown in markdown and shown in table
    assert "Left out: 1 failed, 1 interrupted." in markdown and "Left out: 1 failed, 1 interrupted." in as_json["notes"]


def test_tasks_are_never_averaged_together(tmp_path):
    make_run(tmp_path, "a", "rl", 0, 0.6, task="arith")
    make_run(tmp_path, "b", "rl", 0, 0.2, task="gsm8k")
    rows = compare.compare(compare.load_runs([str(tmp_path)]), ["recipe"], "eval/test/accuracy", None)
    assert sorted((r.task, r.metrics["eval/test/accuracy"].mean) for r in rows) == [("arith", 0.6), ("gsm8k", 0.2)]
    output = CliRunner().invoke(app, ["compare", str(tmp_path), "--format", "markdown"]).output
    assert "**task arith, model tiny**" in output and "**task gsm8k, model tiny**" in output
    assert "never averaged together" in output


def test_malformed_metrics_lines_are_skipped_and_counted(tmp_path):
    make_run(tmp_path, "r", "rl", 0, 0.6, extra_lines=("{not json", "[1, 2]"))
    loaded = compare.load_runs([str(tmp_path)])
    assert loaded.malformed_lines == 2 and len(loaded.runs[0].metrics) == 2
    result = CliRunner().invoke(app, ["compare", str(tmp_path), "--format", "json"])
    assert result.exit_code == 0 and "skipped 2 malformed" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["compare", "{missing}"], "no run directories"),
        (["compare", "{only_failed}"], "no completed runs"),
        (["compare", "{only_failed}", "--format", "xml"], "unknown --format"),
        (["compare", "{good}", "--baseline", "nope"], "no group 'nope'"),
    ],
)
def test_bad_input_exits_2(tmp_path, args, message):
    make_run(tmp_path / "failed", "r", "rl", 0, 0.1, status="failed")
    make_run(tmp_path / "good", "r", "rl", 0, 0.1)
    paths = {"missing": str(tmp_path / "none"), "only_failed": str(tmp_path / "failed"), "good": str(tmp_path / "good")}
    result = CliRunner().invoke(app, [a.format(**paths) for a in args])
    assert result.exit_code == 2 and "Error:" in result.output and message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_readme_results_table_is_what_compare_prints_for_the_recorded_runs():
    root = Path(__file__).resolve().parent.parent
    output = CliRunner().invoke(app, ["compare", str(root / "baselines" / "builtin-seed0"), "--format", "markdown"])
    assert output.exit_code == 0
    table = results_table(output.output)
    assert len(table) == 8  # header, rule, six recipes
    page = (root / "docs" / "results" / "builtin-seed0.md").read_text()
    assert all(line in page for line in table)


def test_report_writes_markdown_csv_and_valid_pngs(sweep, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["compare", str(sweep), "--baseline", "rl", "--format", "csv", "--report", str(out)]
    )
    assert result.exit_code == 0
    assert (out / "comparison.csv").read_text() in result.output  # same numbers as the printed csv
    images = sorted(p.name for p in out.glob("*.png"))
    # the hand-made runs log only eval accuracy; with --baseline the differences get their forest plot
    assert images == ["accuracy_vs_step.png", "accuracy_vs_wall.png", "differences.png"]
    from matplotlib.image import imread

    for name in images:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = imread(out / name).shape
        assert height > 100 and width > 100
        assert f"![{name}]({name})" in (out / "report.md").read_text()


def test_against_recorded_runs_shows_a_regression(tmp_path):
    make_run(tmp_path / "reference", "rl", "rl", 0, 0.80, ood_acc=0.50)
    make_run(tmp_path / "current", "rl", "rl", 0, 0.70, ood_acc=0.55)
    args = ["compare", str(tmp_path / "current"), "--against", str(tmp_path / "reference")]
    as_json = json.loads(CliRunner().invoke(app, [*args, "--format", "json"]).output)
    assert as_json["against"][0]["eval/test/accuracy/delta"] == pytest.approx(-0.10)
    result = CliRunner().invoke(app, [*args, "--format", "markdown"])
    assert result.exit_code == 0
    row = next(line for line in result.output.splitlines() if line.startswith("| rl |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["rl", "1", "+0.050", "-0.100"]  # n_ref, ood delta, test delta


def test_against_published_table_compares_gains_over_rl(tmp_path):
    root = Path(__file__).resolve().parent.parent
    make_run(tmp_path, "rl", "rl", 0, 0.70)
    make_run(tmp_path, "bridge", "bridge", 0, 0.75)
    loaded = compare.load_runs([str(tmp_path)])
    rows = compare.compare(loaded, ["recipe"], "eval/test/accuracy", None)
    reference = compare.load_reference(
        str(root / "baselines" / "paper-bridge-2509.06948.yaml"), ["recipe"], "eval/test/accuracy"
    )
    entries = {e["group"]: e for e in compare.against_rows(rows, reference, "eval/test/accuracy")}
    assert entries["bridge"]["eval/test/accuracy/gain_over_rl"] == pytest.approx(0.05)
    assert entries["bridge"]["Qwen2.5-3B/avg_pass@1/gain_over_rl"] == pytest.approx(36.0 - 32.2)
    assert entries["bridge"]["Qwen3-8B-Base/avg_pass@1/gain_over_rl"] == pytest.approx(49.9 - 42.9)
    bad = tmp_path / "bad.yaml"
    bad.write_text("results: 1\n")
    result = CliRunner().invoke(app, ["compare", str(tmp_path), "--against", str(bad)])
    assert result.exit_code == 2 and "not a reference file" in result.output


def test_wandb_logs_table_and_plots_offline(sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["compare", str(sweep), "--wandb", "--format", "csv"])
    assert result.exit_code == 0, result.output
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1 and list(run_dirs[0].glob("*.wandb"))
    media = list(run_dirs[0].rglob("*.png")) + list(run_dirs[0].rglob("*table.json"))
    assert any(p.suffix == ".png" for p in media) and any(p.name.endswith("table.json") for p in media)
    # what differs between the groups goes to W&B too, as a table of its own (here the fairness facts alone)
    tables = {str(p.relative_to(run_dirs[0])): json.loads(p.read_text()) for p in run_dirs[0].rglob("*table.json")}
    differences = next(t for name, t in tables.items() if "differences" in name)
    assert differences["columns"] == ["key or fact", "bridge", "rl", "sft"]
    assert any(row[0] == "tokens generated" for row in differences["data"])


def test_equal_wall_clock_view(sweep):
    """--at-seconds S: each run's metric as last evaluated by S seconds (its final value when it ended earlier)."""
    loaded = compare.load_runs([str(sweep)])
    bridge_0 = next(r for r in loaded.runs if r.path.name == "bridge-0")  # evals (0, .2) (10, .5) (20, .9) (30, .85)
    assert [compare.value_at(bridge_0, "eval/test/accuracy", s) for s in (0, 9.9, 10, 25, 1000)] == [
        0.2,
        0.2,
        0.5,
        0.9,
        0.85,
    ]
    rows = by_group(compare.compare(loaded, ["recipe"], "eval/test/accuracy", "rl", at_seconds=15))
    assert rows["rl"].metrics["eval/test/accuracy@15s"].mean == pytest.approx(0.6)  # every rl run: 0.6 at 10 s
    assert rows["bridge"].metrics["eval/test/accuracy@15s"].mean == pytest.approx(0.5)
    assert rows["bridge"].difference("eval/test/accuracy@15s").diff == pytest.approx(-0.1)
    assert rows["bridge"].metrics["eval/test/accuracy"].mean == pytest.approx(0.9)  # the equal-steps view is unchanged
    result = CliRunner().invoke(app, ["compare", str(sweep), "--at-seconds", "15", "--format", "markdown"])
    assert result.exit_code == 0 and "test acc @15s %" in result.output
    bad = CliRunner().invoke(app, ["compare", str(sweep), "--at-seconds", "0"])
    assert bad.exit_code == 2 and "--at-seconds must be positive" in bad.output


@pytest.mark.slow
def test_readme_paper_comparison_is_what_compare_prints_for_the_recorded_sweep():
    """The "Results on the built-in task" table, in the README and in docs/results/five-seeds.md: the recorded
    sweeps/paper.yaml runs (fourteen recipes, five seeds each, with per-problem records), as compare prints them
    with the flags the pages give."""
    root = Path(__file__).resolve().parent.parent
    output = CliRunner().invoke(
        app,
        [
            "compare",
            str(root / "baselines" / "paper-5seeds"),
            "--baseline",
            "rl",
            "--metric",
            "eval/ood/accuracy",
            "--format",
            "markdown",
        ],
    )
    assert output.exit_code == 0, output.output
    table = results_table(output.output)
    assert len(table) == 16 and all(" | 5 | " in line for line in table[2:])  # fourteen recipes, five seeds each
    assert "paired" in table[0]  # every run recorded its problems: the paired comparison is there
    for page in (root / "README.md", root / "docs" / "results" / "five-seeds.md"):
        text = page.read_text()
        assert all(line in text for line in table), page.name


@pytest.mark.slow
def test_readme_equal_compute_table_is_what_compare_prints_for_the_recorded_study():
    """The equal-compute table (docs/results/equal-compute.md): the recorded sweeps/paper_compute*.yaml runs, every
    recipe stopped by one FLOP budget, as compare prints them with the flags the page gives; every run spent its
    budget to within one step (its largest), and at most 2% short where train.max_steps capped it (the page says
    which)."""
    root = Path(__file__).resolve().parent.parent
    study = root / "baselines" / "paper-compute-5seeds"
    output = CliRunner().invoke(
        app, ["compare", str(study), "--baseline", "rl", "--metric", "eval/ood/accuracy", "--format", "markdown"]
    )
    assert output.exit_code == 0, output.output
    table = results_table(output.output)
    page = (root / "docs" / "results" / "equal-compute.md").read_text()
    block = page.split("<!-- compute-table -->")[1].split("<!-- /compute-table -->")[0]
    assert [line for line in block.splitlines() if line.startswith("|")] == table
    for summary_path in study.glob("*/summary.json"):
        summary = json.loads(summary_path.read_text())
        steps = [json.loads(line) for line in (summary_path.parent / "metrics.jsonl").read_text().splitlines()]
        largest = max(row.get("compute/flops", 0) for row in steps)
        assert 0.98 * 4.5e12 <= summary["flops"] < 4.5e12 + largest, summary_path.parent.name


@pytest.mark.slow
def test_readme_real_model_table_is_what_compare_prints_for_the_recorded_study():
    """The "A real model learns" table (docs/results/smollm2.md): the recorded sweeps/smollm2_wordmath.yaml runs
    against the base model (their step-0 evaluations), as compare prints them with the flags the page gives."""
    root = Path(__file__).resolve().parent.parent
    output = CliRunner().invoke(
        app, ["compare", str(root / "baselines" / "smollm2-wordmath"), "--baseline", "base", "--format", "markdown"]
    )
    assert output.exit_code == 0, output.output
    table = results_table(output.output)
    assert table[2].startswith("| base ") and "paired" in table[0]  # the base first; every run recorded its problems
    page = (root / "docs" / "results" / "smollm2.md").read_text()
    block = page.split("<!-- smollm2-table -->")[1].split("<!-- /smollm2-table -->")[0]
    assert [line for line in block.splitlines() if line.startswith("|")] == table


# ---- typed rows: what every output reads, and the flat csv/json form --------------------------------------------
TEST, OOD = Metric("test", "accuracy"), Metric("ood", "accuracy")
SUMMARY_KEYS = ["n", "mean", "std", "ci_low", "ci_high"]
WELCH_KEYS = ["diff", "diff_ci_low", "diff_ci_high", "diff_p", "seeds_needed"]


def test_flat_form_has_the_csv_and_json_keys_in_their_order(sweep):
    """GroupRow.flat() is the only writer of the csv/json keys: these names and this order (json keeps it) are what
    scripts reading `--format json` depend on, so they are spelled out here rather than derived."""
    rows = by_group(
        compare.compare(compare.load_runs([str(sweep)]), ["recipe"], "eval/test/accuracy", "rl", at_seconds=15)
    )
    # the runs log no ood curve: no ood@15s view to summarize
    views = ["eval/ood/accuracy", "eval/test/accuracy", "eval/test/accuracy@15s"]
    head = ["task", "model", "group", "n", "too_few_seeds", "is_baseline"]
    tail = [
        "wall_s",
        "gen_tokens",
        "peak_mem_mb",
        "flops",
        "time_to_target_s",
        "flops_to_target",
        "reached_target",
        "no_signal_runs",
    ] + [f"facts/{name}" for name, _ in FACTS]
    assert list(rows["bridge"].flat()) == head + [f"{v}/{k}" for v in views for k in SUMMARY_KEYS + WELCH_KEYS] + tail
    assert list(rows["rl"].flat()) == head + [f"{v}/{k}" for v in views for k in SUMMARY_KEYS + ["diff"]] + tail
    flat, typed = rows["bridge"].flat(), rows["bridge"].metrics["eval/test/accuracy"]
    assert [flat[f"eval/test/accuracy/{k}"] for k in SUMMARY_KEYS + WELCH_KEYS] == [
        3,
        typed.mean,
        typed.std,
        typed.ci_low,
        typed.ci_high,
        typed.difference.diff,
        typed.difference.ci_low,
        typed.difference.ci_high,
        typed.difference.p,
        typed.difference.seeds_needed,
    ]
    assert flat["reached_target"] == "3/3" and flat["time_to_target_s"] == rows["bridge"].time_to_target.seconds
    assert [rows["sft"].flat()[f"eval/test/accuracy/{k}"] for k in WELCH_KEYS[1:4]] == [None] * 3  # one seed
    document = json.loads(tables.to_json(list(rows.values()), []))
    assert document["groups"] == [row.flat() for row in rows.values()]
    # the paired interval's keys follow Welch's, and only where the runs were paired
    paired = MetricSummary(
        TEST,
        0.5,
        0.1,
        0.4,
        0.6,
        Difference(0.1, ci_low=0.0, ci_high=0.2, p=0.05, seeds_needed=4, paired_ci_low=0.05, paired_ci_high=0.15),
    )
    assert paired.flat() == {
        "eval/test/accuracy/n": None,
        "eval/test/accuracy/mean": 0.5,
        "eval/test/accuracy/std": 0.1,
        "eval/test/accuracy/ci_low": 0.4,
        "eval/test/accuracy/ci_high": 0.6,
        "eval/test/accuracy/diff": 0.1,
        "eval/test/accuracy/diff_ci_low": 0.0,
        "eval/test/accuracy/diff_ci_high": 0.2,
        "eval/test/accuracy/diff_p": 0.05,
        "eval/test/accuracy/seeds_needed": 4,
        "eval/test/accuracy/paired_ci_low": 0.05,
        "eval/test/accuracy/paired_ci_high": 0.15,
    }


def _hand_row(group: str, summaries: list[MetricSummary], is_baseline: bool = False, n: int = 3) -> GroupRow:
    return GroupRow("arith", "tiny", (group,), group, n, is_baseline, {s.metric.key: s for s in summaries})


def _with_difference(
    metric: Metric, diff: float, low: float | None, high: float | None, paired: tuple[float, float] | None = None
) -> MetricSummary:
    difference = Difference(
        diff,
        ci_low=low,
        ci_high=high,
        p=None if low is None else 0.01,
        paired_ci_low=paired and paired[0],
        paired_ci_high=paired and paired[1],
    )
    return MetricSummary(metric, 0.5 + diff, 0.05, 0.4, 0.6, difference)


def _captured_figure(monkeypatch, draw, rows, path):
    """Draws with report's function and returns the figure it would have closed."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert draw(rows, path) and path.read_bytes()[:4] == b"\x89PNG"
    return figures[0]


def test_difference_plot_draws_each_groups_typed_difference(tmp_path, monkeypatch):
    """The forest plot from hand-made rows: one point and Welch bar per tested group and split (in points, gray
    where it includes zero), the paired bootstrap's bar under it, nothing for the baseline, a group without an
    interval, or an --at-seconds view."""
    from bridgectl.analysis.report import plot_differences

    rows = [
        _hand_row("rl", [MetricSummary(TEST, 0.5, 0.05, 0.4, 0.6, Difference(0.0, of_baseline=True))], True),
        _hand_row(
            "up",
            [
                _with_difference(TEST, 0.10, 0.05, 0.15, paired=(0.06, 0.14)),
                _with_difference(Metric("test", "accuracy", 15.0), 0.3, 0.2, 0.4),
            ],
        ),
        _hand_row("flat", [_with_difference(TEST, 0.01, -0.02, 0.04)]),
        _hand_row("one seed", [_with_difference(TEST, 0.2, None, None)], n=1),
        _hand_row("down", [_with_difference(TEST, -0.08, -0.12, -0.04), _with_difference(OOD, 0.05, 0.01, 0.09)]),
    ]
    figure = _captured_figure(monkeypatch, plot_differences, rows, tmp_path / "differences.png")
    ood_axis, test_axis = figure.axes  # one panel per split, in key order; none for the @15s view
    assert [t.get_text() for t in test_axis.get_yticklabels()] == ["up", "flat", "down"]
    assert test_axis.get_xlabel() == "Δ test accuracy (points)" and ood_axis.get_xlabel() == "Δ ood accuracy (points)"

    def bars(axis):  # y -> (point, low, high, color) of each Welch bar
        found = {}
        for container in axis.containers:
            point, _, (bar,) = container.lines
            (low, y), (high, _) = bar.get_segments()[0]
            found[int(point.get_ydata()[0])] = (float(point.get_xdata()[0]), low, high, point.get_color())
        return found

    assert bars(test_axis) == {
        0: (pytest.approx(10.0), pytest.approx(5.0), pytest.approx(15.0), "tab:green"),
        1: (pytest.approx(1.0), pytest.approx(-2.0), pytest.approx(4.0), "tab:gray"),
        2: (pytest.approx(-8.0), pytest.approx(-12.0), pytest.approx(-4.0), "tab:red"),
    }
    assert bars(ood_axis) == {2: (pytest.approx(5.0), pytest.approx(1.0), pytest.approx(9.0), "tab:green")}
    (paired,) = [line for line in test_axis.lines if line.get_linewidth() == 3]
    assert list(paired.get_xdata()) == pytest.approx([6.0, 14.0]) and list(paired.get_ydata()) == [-0.2, -0.2]
    assert not plot_differences(rows[:1] + rows[3:4], tmp_path / "none.png")  # no interval to draw


def test_pass_at_k_plot_and_columns_read_the_typed_fields(tmp_path, monkeypatch):
    """pass@k against k per group from the final pass@k summaries (not their --at-seconds views); the table shows
    pass@k at the largest k of each split and view."""
    from bridgectl.analysis.report import plot_pass_at_k

    def summary(name, mean, at=None, interval=(None, None)):
        return MetricSummary(Metric("test", name, at), mean, None if interval[0] is None else 0.05, *interval)

    rows = [
        _hand_row(
            "rl",
            [
                summary("accuracy", 0.4),
                summary("pass@1", 0.4, interval=(0.3, 0.5)),
                summary("pass@2", 0.55, interval=(0.45, 0.65)),
                summary("pass@4", 0.7, interval=(0.6, 0.8)),
                summary("pass@4", 0.6, at=15.0),
                summary("maj@4", 0.45),
            ],
        ),
        _hand_row("sft", [summary("pass@1", 0.3), summary("pass@4", 0.5)], n=1),
    ]
    figure = _captured_figure(monkeypatch, plot_pass_at_k, rows, tmp_path / "pass_at_k.png")
    lines = {line.get_label(): line for line in figure.axes[0].lines}
    assert set(lines) == {"rl (n=3)", "sft (n=1)"}
    assert list(lines["rl (n=3)"].get_xdata()) == [1, 2, 4]
    assert list(lines["rl (n=3)"].get_ydata()) == pytest.approx([40.0, 55.0, 70.0])
    assert list(lines["sft (n=1)"].get_xdata()) == [1, 4]
    headers = [header for header, _ in tables.display_columns(rows)]
    assert headers == [
        "group",
        "runs",
        "test acc %",
        "test pass@4 %",
        "test pass@4@15s %",
        "wall s",
        "gen tokens",
        "peak MB",
    ]


def test_against_recorded_runs_names_each_delta_after_its_metric():
    """A delta's key is its metric's (`mean@4` stays `mean@4`, which cutting `/mean` out of a flat key did not)."""

    def row(test_mean: float) -> GroupRow:
        return _hand_row(
            "rl",
            [
                MetricSummary(TEST, test_mean, None, None, None),
                MetricSummary(Metric("test", "mean@4"), 0.5, None, None, None),
            ],
            n=1,
        )

    (entry,) = compare.against_rows([row(0.7)], {"kind": "runs", "rows": [row(0.8)]}, "eval/test/accuracy")
    assert entry == {
        "task": "arith",
        "model": "tiny",
        "group": "rl",
        "n": 1,
        "n_ref": 1,
        "eval/test/accuracy/delta": pytest.approx(-0.1),
        "eval/test/mean@4/delta": 0.0,
    }


def test_run_directories_are_found_while_a_live_run_deletes_its_checkpoints(tmp_path, monkeypatch):
    """A sweep compares its finished trials while another trial still runs and deletes its older checkpoints: a
    directory that vanishes during the search is skipped (Path.rglob raised FileNotFoundError there, failing one of
    two racing sweeps with exit 1 in CI)."""
    import os
    import shutil

    from bridgectl.analysis.compare import find_run_dirs

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text("{}")
    doomed = tmp_path / "live" / "checkpoints" / "step-000002"
    doomed.mkdir(parents=True)
    real_scandir = os.scandir

    def scandir(path="."):  # the live run removes the checkpoint between the listing of its parent and its own
        if isinstance(path, (str, os.PathLike)) and Path(path) == doomed and doomed.exists():  # (rmtree: fds)
            shutil.rmtree(doomed)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(FileNotFoundError):
        list(tmp_path.rglob("summary.json"))
    doomed.mkdir()
    assert find_run_dirs([str(tmp_path)]) == [tmp_path / "a", tmp_path / "b"]


VARIANTS_BY = [
    "--by",
    "recipe",
    "--by",
    "rl.loss_type",
    "--by",
    "rl.importance_sampling_level",
    "--by",
    "rl.filter_groups",
]


def test_readme_grpo_variants_table_is_what_compare_prints_for_the_recorded_runs():
    """The one-seed table of the GRPO variants on the built-in task (baselines/grpo-variants-seed0,
    docs/results/grpo-variants.md), as compare prints it with the flags the page gives."""
    root = Path(__file__).resolve().parent.parent
    output = CliRunner().invoke(
        app, ["compare", str(root / "baselines" / "grpo-variants-seed0"), *VARIANTS_BY, "--format", "markdown"]
    )
    assert output.exit_code == 0, output.output
    table = results_table(output.output)
    assert len(table) == 2 + 6 and all(" | 1 | " in line for line in table[2:])  # six runs, one seed each
    page = (root / "docs" / "results" / "grpo-variants.md").read_text()
    block = page.split("<!-- variants-table -->")[1].split("<!-- /variants-table -->")[0]
    assert [line for line in block.splitlines() if line.startswith("|")] == table


@pytest.mark.slow
def test_readme_differences_are_what_compare_prints():
    """Under each recorded study's table the docs (docs/results/, and the README if it holds one) show what differs
    between its groups and the fairness facts, generated by benchmarks/readme_tables.py from the runs in baselines/:
    each block is what compare prints now (the audit of the recorded studies: BRIDGE at rank 32 beside rank-8
    recipes in the SmolLM2 study, the step caps of the equal-compute study, the GRPO variants' other settings)."""
    root = Path(__file__).resolve().parent.parent
    readme_tables = _load_readme_tables(root)
    found = [(args, body) for _, args, body in readme_tables.all_blocks()]
    assert len(found) == 5
    for args, body in found:
        assert body == readme_tables.differences_part(readme_tables.compare_markdown(args)), args
    smollm2 = next(body for args, body in found if "baselines/smollm2-wordmath" in args)
    assert "| ! lora.rank | 32 | 8 | 8 | 8 |" in smollm2


def _load_readme_tables(root: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_tables", root / "benchmarks" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
