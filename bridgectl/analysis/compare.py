"""`bridgectl compare`: side-by-side statistics of finished runs, read from run directories only (config.yaml,
metrics.jsonl, summary.json), never from a model.

Runs are grouped by config keys (`--by recipe` by default). For each group and each final eval metric: n seeds,
mean, std (n-1), and a 95% Student-t interval of the mean; with `--baseline VALUE` the difference of each group's
mean from that group's with Welch's 95% interval and p-value, the seeds per group that would separate it at the
observed spread, where runs share their evaluation problems a paired two-level bootstrap over seeds and problems
(bridgectl/analysis/stats.py has the methods and why), and the time-to-target (wall-clock at which a run first reaches
the baseline's final mean on `--metric`, linearly interpolated between logged evals). `--baseline base` compares
with the model the runs started from: a group `base` made of each run's step-0 evaluation (base_runs), so every
recipe is measured against the base model on the same problems. Runs of different tasks or models are never averaged
together; failed or interrupted runs are left out and counted.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bridgectl.analysis import audit as compare_audit
from bridgectl.analysis import stats
from bridgectl.analysis.rows import AXES, Difference, GroupRow, Metric, MetricSummary, TimeToTarget, flatten
from bridgectl.config.saved import read_config
from bridgectl.errors import UserError


@dataclass
class Run:
    path: Path
    config: dict
    summary: dict
    metrics: list[dict]
    problems: dict[str, dict] = field(default_factory=dict)  # split -> final eval_problems.jsonl row
    initial_problems: dict[str, dict] = field(default_factory=dict)  # split -> step-0 eval_problems.jsonl row

    def value(self, key: str):
        """A grouping key: `recipe` (the summary's), or any dotted config key such as `bridge.lam`."""
        if key in self.summary and not isinstance(self.summary[key], dict):
            return self.summary[key]
        node = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def final(self, metric: str) -> float | None:
        """Final value of `eval/<split>/<name>` (accuracy, or pass@k, maj@k, mean@n with eval.k) from summary.json."""
        parts = metric.split("/")
        if len(parts) == 3 and parts[0] == "eval":
            return self.summary.get("eval", {}).get(parts[1], {}).get(parts[2])
        return None


@dataclass
class Loaded:
    runs: list[Run] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)  # status -> count of runs not completed
    malformed_lines: int = 0
    unreadable: list[str] = field(default_factory=list)  # why each run counted "unreadable" was left out
    copies: list[str] = field(default_factory=list)  # run directories left out as copies of another run given


def run_dirs_under(directory: Path) -> list[Path]:
    """The directories under `directory` (itself included) that hold summary.json. os.walk skips a directory that
    vanishes while it walks, where Path.rglob raises FileNotFoundError: a live run beside the finished ones (a
    sweep's other trial) deletes its older checkpoints as it writes new ones."""
    return sorted(Path(root) for root, _, files in os.walk(directory) if "summary.json" in files)


def find_run_dirs(paths: list[str]) -> list[Path]:
    """Run directories under each PATH: a run directory itself, a directory of runs (searched recursively), or a
    glob pattern."""
    found: dict[Path, Path] = {}  # resolved -> as first reached: one run named twice (a relative and an absolute
    # path, a symlink in a glob) is one run
    for pattern in paths:
        matches = [Path(m) for m in sorted(glob.glob(pattern))] or [Path(pattern)]
        for path in matches:
            if (path / "summary.json").is_file():
                found.setdefault(path.resolve(), path)
            elif path.is_dir():
                for run in run_dirs_under(path):
                    found.setdefault(run.resolve(), run)
    return sorted(found.values())


def load_runs(paths: list[str]) -> Loaded:
    """The completed runs under `paths`; every other run is left out and counted by its status, and a run whose
    summary.json or config.yaml cannot be read counts as "unreadable" (its reason in `unreadable`), so one damaged
    run never stops the comparison of the rest."""
    run_dirs = find_run_dirs(paths)
    if not run_dirs:
        raise UserError(
            f"no run directories under {', '.join(paths)}",
            "a run directory holds summary.json; train one with `bridgectl run`, or pass runs/",
        )
    loaded = Loaded()
    identities: dict[str, Path] = {}
    for path in run_dirs:
        try:
            summary = json.loads((path / "summary.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            summary = None
        if not isinstance(summary, dict):
            loaded.left_out["unreadable"] = loaded.left_out.get("unreadable", 0) + 1
            loaded.unreadable.append(f"{path / 'summary.json'} is not a JSON object")
            continue
        identity = compare_audit.run_identity(path)
        if identity in identities:  # a copy of a run directory: the same run, counted once
            loaded.copies.append(f"{path} is a copy of {identities[identity]}")
            continue
        identities[identity] = path
        status = summary.get("status", "unknown")
        if status != "completed":
            loaded.left_out[status] = loaded.left_out.get(status, 0) + 1
            continue
        try:
            config = read_config(path / "config.yaml") if (path / "config.yaml").exists() else {}
        except UserError as error:
            loaded.left_out["unreadable"] = loaded.left_out.get("unreadable", 0) + 1
            loaded.unreadable.append(error.message)
            continue
        metrics = []
        metrics_file = path / "metrics.jsonl"
        for line in metrics_file.read_text().splitlines() if metrics_file.exists() else []:
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError
                metrics.append(row)
            except ValueError:
                loaded.malformed_lines += 1
        loaded.runs.append(
            Run(
                path,
                config,
                summary,
                metrics,
                final_problem_records(path, summary.get("steps")),
                final_problem_records(path, 0),
            )
        )
    return loaded


def final_problem_records(path: Path, final_step: int | None) -> dict[str, dict]:
    """{split: row} of the run's evaluation at `final_step` in eval_problems.jsonl (None: the last logged; runs
    made before it existed: {})."""
    records: dict[str, dict] = {}
    source = path / "eval_problems.jsonl"
    for line in source.read_text().splitlines() if source.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "split" in row and (final_step is None or row.get("step") == final_step):
            records[row["split"]] = row
    return records


NO_SIGNAL_SHARE = 0.5
"""A run whose RL steps had no learning signal (every group's rewards equal, so every advantage 0: summary.json's
`no_signal_steps` of `rl_steps`) for more than this share of them is marked by `compare` and `bridgectl runs`."""


def mostly_without_signal(summary: dict) -> bool:
    """Whether a run's summary.json says most of its RL steps had no learning signal (NO_SIGNAL_SHARE); False for
    runs without RL steps and for runs made before the counts were recorded."""
    rl_steps, without = summary.get("rl_steps"), summary.get("no_signal_steps")
    if not isinstance(rl_steps, int) or not isinstance(without, int) or rl_steps <= 0:
        return False
    return without > NO_SIGNAL_SHARE * rl_steps


def signal_counts(run: Run) -> dict:
    """{rl_steps, no_signal_steps} of a run: as its summary.json records them, or for runs made before it did, read
    from its metrics.jsonl: a step without signal is one whose `train/zero_std_groups` is every group of the step
    (rl.prompts_per_step; the metric is summed over processes)."""
    if isinstance(run.summary.get("rl_steps"), int):
        return {key: run.summary.get(key) for key in ("rl_steps", "no_signal_steps")}
    groups = run.value("rl.prompts_per_step")
    counted = [row["train/zero_std_groups"] for row in run.metrics if row.get("train/zero_std_groups") is not None]
    return {"rl_steps": len(counted), "no_signal_steps": sum(count == groups for count in counted)}


BASE_GROUP = "base"
"""`--baseline base`: the group of the runs' starting model, read from their step-0 evaluations."""


def base_runs(runs: list[Run]) -> list[Run]:
    """The base model as a group: one pseudo-run per seed, whose final evaluation is a run's step-0 evaluation
    (summary.json's eval_initial, eval_problems.jsonl at step 0), so the base model counts once per seed however
    many recipes ran it. Its greedy accuracy is the same at every seed when the evaluation problems are; the paired
    bootstrap against it then resamples the problems, which is where the base's uncertainty lies."""
    by_seed: dict = {}
    for run in runs:
        initial = run.summary.get("eval_initial")
        if isinstance(initial, dict) and initial and run.value("seed") not in by_seed:
            by_seed[run.value("seed")] = Run(run.path, run.config, {"eval": initial}, [], run.initial_problems)
    return list(by_seed.values())


# ---- views of a run -------------------------------------------------------------------------------------------
def _timed_values(run: Run, metric: str, axis: str = "seconds") -> list[tuple[float, float]]:
    """(cost, value) of every logged row that has `metric`, in log order: the cost is the row's wall_s, or with
    `axis` flops or tokens the run's compute so far (compute/cum_flops, compute/cum_tokens; AXES)."""
    field = AXES[axis][0]
    return [
        (row[field], row[metric]) for row in run.metrics if row.get(metric) is not None and row.get(field) is not None
    ]


def time_to_target(run: Run, metric: str, target: float, axis: str = "seconds") -> float | None:
    """Wall-clock seconds (or with `axis`, FLOPs or tokens) at which `metric` first reaches `target`, interpolated
    linearly between logged evals."""
    points = _timed_values(run, metric, axis)
    for (t0, v0), (t1, v1) in zip([(None, None)] + points[:-1], points):
        if v1 >= target:
            if t0 is None or v1 == v0:
                return float(t1)
            return float(t0 + (t1 - t0) * (target - v0) / (v1 - v0))
    return None


def value_at(run: Run, metric: str, seconds: float, axis: str = "seconds") -> float | None:
    """The equal-cost view: `metric` as last evaluated at or before `seconds` of the run's wall-clock (or with
    `axis`, that many FLOPs or tokens of its compute): what stopping the run then would have given; the run's
    final value when it ended earlier."""
    points = _timed_values(run, metric, axis)
    if not points:
        return None
    before = [value for wall, value in points if wall <= seconds]
    return float(before[-1]) if before else float(points[0][1])


# ---- the comparison --------------------------------------------------------------------------------------------
def _label(values: tuple) -> str:
    return ", ".join(str(v) for v in values)


def _read(run: Run, metric: Metric) -> float | None:
    """A run's value of `metric`: its final one, or as of metric.at in its axis (value_at)."""
    if metric.at is None:
        return run.final(metric.logged)
    return value_at(run, metric.logged, metric.at, metric.axis)


def _summary(metric: Metric, runs: list[Run], baseline_runs: list[Run] | None) -> MetricSummary | None:
    """`metric` over a group's runs, against the baseline group's when there is one; None when no run has it."""
    values = [v for v in (_read(r, metric) for r in runs) if v is not None]
    if not values:
        return None
    interval = stats.mean_interval(values)
    # every eval metric is a share of problems: its mean lies in [0, 1], and so does its interval
    low, high = (max(interval[0], 0.0), min(interval[1], 1.0)) if interval else (None, None)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None  # one seed: neither a spread nor an interval
    summary = MetricSummary(metric, float(np.mean(values)), std, low, high, n=len(values))
    base_values = [v for v in (_read(r, metric) for r in baseline_runs or []) if v is not None]
    if baseline_runs is runs:
        summary.difference = Difference(0.0, of_baseline=True)
    elif base_values:
        test = stats.welch(values, base_values) or {}
        summary.difference = Difference(
            float(np.mean(values) - np.mean(base_values)),
            ci_low=test.get("low"),
            ci_high=test.get("high"),
            p=test.get("p"),
            seeds_needed=stats.seeds_needed(values, base_values),
        )
        if metric.name == "accuracy" and metric.at is None:  # final greedy accuracy: runs may be paired
            paired = paired_difference(runs, baseline_runs, metric.split)
            if paired is not None:
                summary.difference.paired_ci_low, summary.difference.paired_ci_high = paired["low"], paired["high"]
    return summary


def _mean_cost(runs: list[Run], cost: str) -> float | None:
    """Mean of a summary.json cost (wall_s, gen_tokens, peak_mem_mb, flops) over the runs that recorded it."""
    costs = [r.summary[cost] for r in runs if isinstance(r.summary.get(cost), (int, float))]
    return float(np.mean(costs)) if costs else None


def _data_seen(runs: list[Run]) -> dict:
    """Mean items used and distinct problems per data stream over the runs that recorded them (summary `data`)."""
    recorded = [r.summary["data"] for r in runs if isinstance(r.summary.get("data"), dict)]
    if not recorded:
        return {}
    return {
        stream: {key: float(np.mean([seen[stream][key] for seen in recorded])) for key in ("used", "distinct")}
        for stream in recorded[0]
        if all(stream in seen for seen in recorded)
    }


def compare(
    loaded: Loaded,
    by: list[str],
    metric: str,
    baseline: str | None,
    at_seconds: float | None = None,
    at_flops: float | None = None,
    at_tokens: float | None = None,
    pool: list[str] | None = (),
) -> list[GroupRow]:
    """One row per (task, model, group): the numbers every output format carries. `at_seconds` adds, for every
    eval metric, its value at that wall-clock time (value_at), keyed `<metric>@<S>s`; `at_flops` and `at_tokens`
    its value at that much compute (`<metric>@<X>flops`, `<metric>@<X>tokens`), and compute-to-target beside
    time-to-target. Runs of a group must share their config but for the seed (compare_audit.mixed_keys): a group
    that would pool runs of different configs raises UserError unless `pool` names the keys (None: pool whatever
    differs); what was pooled is on each row (GroupRow.mixed), as are the keys that differ between groups and
    the fairness facts (GroupRow.settings, facts)."""
    costs = [
        (axis, at)
        for axis, at in (("seconds", at_seconds), ("flops", at_flops), ("tokens", at_tokens))
        if at is not None
    ]
    sections: dict[tuple, dict[tuple, list[Run]]] = {}
    for run in loaded.runs:
        section = (run.summary.get("task", run.value("task.name")), run.summary.get("model", run.value("model.name")))
        sections.setdefault(section, {}).setdefault(tuple(run.value(k) for k in by), []).append(run)
    rows = []
    for (task, model), groups in sections.items():
        finals = sorted(
            {
                Metric(split, name)
                for runs in groups.values()
                for r in runs
                for split, values in r.summary.get("eval", {}).items()
                for name in values
                if name == "accuracy" or name.split("@")[0] in ("pass", "maj", "mean") and "@" in name
            },
            key=lambda m: m.logged,
        )
        # the runs' own groups are audited; the base model's pseudo-runs (one per seed, read from runs of any
        # group) trained nothing
        mixed = {key: compare_audit.mixed_keys(runs, by) for key, runs in groups.items()}
        if pool is not None:
            error = compare_audit.pooling_error(
                [(_label(key), runs, mixed[key]) for key, runs in groups.items()], list(pool)
            )
            if error is not None:
                raise error
        between = compare_audit.differences({_label(key): runs for key, runs in groups.items()}, by)
        if baseline == BASE_GROUP and not any(_label(key) == BASE_GROUP for key in groups):
            initial = base_runs([run for runs in groups.values() for run in runs])
            if initial:
                groups = {(BASE_GROUP,): initial, **groups}
        baseline_runs = next((runs for key, runs in groups.items() if _label(key) == baseline), None)
        if baseline is not None and baseline_runs is None:
            raise UserError(
                f"no group '{baseline}' to use as --baseline (task {task}, model {model})",
                f"groups by {', '.join(by)}: {', '.join(_label(k) for k in groups)}; "
                f"or --baseline {BASE_GROUP}: the base model, from the runs' step-0 evaluations",
            )
        # time-to-target: when a run first reaches the baseline's final mean; not for the base model, which every
        # run is at from its step-0 evaluation
        target = (
            np.mean([r.final(metric) for r in baseline_runs if r.final(metric) is not None])
            if baseline_runs and any(r.metrics for r in baseline_runs)
            else None
        )
        views = finals + [Metric(m.split, m.name, at, axis) for axis, at in costs for m in finals]
        for key, runs in groups.items():
            summaries = [(view, _summary(view, runs, baseline_runs)) for view in views]
            row = GroupRow(
                task,
                model,
                key,
                _label(key),
                len(runs),
                runs is baseline_runs,
                {view.key: summary for view, summary in summaries if summary is not None},
                _mean_cost(runs, "wall_s"),
                _mean_cost(runs, "gen_tokens"),
                _mean_cost(runs, "peak_mem_mb"),
                _mean_cost(runs, "flops"),
                _data_seen(runs),
            )
            row.missing = {
                view.key: [r.path.name for r in runs if _read(r, view) is None]
                for view, summary in summaries
                if summary is not None and summary.n < len(runs)
            }
            row.mixed = {k: [compare_audit.shown(v) for v in values] for k, values in mixed.get(key, {}).items()}
            row.no_signal = [r.path.name for r in runs if mostly_without_signal(signal_counts(r))]
            if key in mixed:  # the base model's pseudo-runs trained nothing
                row.facts = compare_audit.facts(runs)
                row.settings = {d.key: d.values[row.group] for d in between}
                row.marked = tuple(d.key for d in between if d.marked)
            if target is not None and any(r.metrics for r in runs):  # base's pseudo-runs log no curve
                reached = [t for t in (time_to_target(r, metric, target) for r in runs) if t is not None]
                in_flops = [f for f in (time_to_target(r, metric, target, "flops") for r in runs) if f is not None]
                row.time_to_target = TimeToTarget(
                    float(np.mean(reached)) if len(reached) == len(runs) else None,
                    len(reached),
                    len(runs),
                    float(np.mean(in_flops)) if len(in_flops) == len(runs) else None,
                )
            rows.append(row)
    return rows


def paired_difference(runs: list[Run], base_runs: list[Run], split: str) -> dict | None:
    """The paired two-level bootstrap (stats.paired_bootstrap) of a split's final accuracy against the baseline's,
    when every run of both groups recorded its per-problem rewards on the same problems; else None."""
    records = [r.problems.get(split) for r in runs + base_runs]
    if any(record is None for record in records) or len({record["problems"] for record in records}) != 1:
        return None
    rewards = [np.asarray(record["rewards"], dtype=float) for record in records]
    return stats.paired_bootstrap(np.stack(rewards[: len(runs)]), np.stack(rewards[len(runs) :]))


# ---- output formats --------------------------------------------------------------------------------------------
def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _points(value: float | None, signed: bool = False) -> str:
    return "-" if value is None else (f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}")


def _mean_cell(row: GroupRow, key: str) -> str:
    """mean ± std [95% t interval], in %; `(n=k)` when only k of the group's runs have the metric."""
    summary = row.metrics.get(key)
    if summary is None:
        return "-"
    fewer = f" (n={summary.n})" if summary.n is not None and summary.n < row.n else ""
    if summary.std is None:  # one seed: neither a spread nor an interval
        return _points(summary.mean) + fewer
    interval = "" if summary.ci_low is None else f" [{_points(summary.ci_low)}, {_points(summary.ci_high)}]"
    return f"{_points(summary.mean)} ± {_points(summary.std)}{interval}{fewer}"


def _group_cell(row: GroupRow) -> str:
    """The group's label, `*` under stats.FEW_SEEDS seeds, `!` when it pooled runs of different configs on
    purpose (--pool) and `(no signal: k)` when k of its runs trained on no learning signal most of the time."""
    marks = (" *" if row.too_few_seeds else "") + (" !" if row.mixed else "")
    return row.group + marks + (f" (no signal: {len(row.no_signal)})" if row.no_signal else "")


def _difference_cell(row: GroupRow, key: str) -> str:
    """Δ [Welch 95% interval] p, in points; where the interval includes zero, the seeds that would separate it."""
    difference = row.difference(key)
    if difference is None:
        return "-"
    if row.is_baseline:
        return "baseline"
    text = _points(difference.diff, signed=True)
    low, high = difference.ci_low, difference.ci_high
    if low is None:
        return text + " (no interval: under 2 seeds or no spread)"
    text += f" [{_points(low, True)}, {_points(high, True)}] p={difference.p:.2g}"
    if low <= 0 <= high:
        needed = difference.seeds_needed
        text += f", ~{needed} seeds" if needed else ", >1000 seeds" if difference.diff != 0 else ""
    return text


def _flops_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _paired_cell(row: GroupRow, key: str) -> str:
    difference = row.difference(key)
    if difference is None or difference.paired_ci_low is None:
        return "-"
    return f"[{_points(difference.paired_ci_low, True)}, {_points(difference.paired_ci_high, True)}]"


def _target_cell(row: GroupRow) -> str:
    """Seconds to the target ("never" unless every run reached it), with how many did when not all."""
    reach = row.time_to_target
    if reach is None:  # the base model: no curve
        return "-"
    return ("never" if reach.seconds is None else _cell(reach.seconds)) + (
        "" if reach.reached == row.n else f" ({reach.reached}/{reach.runs})"
    )


def _shown(metric: Metric, every_metric: set[Metric]) -> bool:
    """Columns of the table and markdown: greedy accuracy (and its --at-seconds view) and, with eval.k, pass@k at
    the largest k (of its split and view); every other sampled metric is in the csv and json outputs."""
    if metric.kind != "pass":
        return metric.name == "accuracy"
    return metric.k == max(
        m.k
        for m in every_metric
        if m.kind == "pass" and (m.split, m.at, m.axis) == (metric.split, metric.at, metric.axis)
    )


def display_columns(rows: list[GroupRow]) -> list[tuple[str, callable]]:
    """(header, row -> text) pairs shared by the table and markdown outputs."""
    every_metric = {s.metric for r in rows for s in r.metrics.values()}
    shown = sorted((m for m in every_metric if _shown(m, every_metric)), key=lambda m: m.key)
    columns = [("group", _group_cell), ("runs", lambda r: str(r.n))]
    for metric in shown:
        differences = [r.difference(metric.key) for r in rows if r.difference(metric.key) is not None]
        columns.append((f"{metric.header} %", lambda r, k=metric.key: _mean_cell(r, k)))
        if differences:
            columns.append((f"Δ {metric.header} pts", lambda r, k=metric.key: _difference_cell(r, k)))
        if any(d.paired_ci_low is not None for d in differences):
            columns.append((f"Δ {metric.header} paired", lambda r, k=metric.key: _paired_cell(r, k)))
    columns += [
        ("wall s", lambda r: _cell(r.wall_s)),
        ("gen tokens", lambda r: _cell(r.gen_tokens)),
        ("peak MB", lambda r: _cell(r.peak_mem_mb)),
    ]
    if any(r.flops is not None for r in rows):
        columns.append(("FLOPs", lambda r: _flops_cell(r.flops)))
    if any(r.time_to_target is not None for r in rows):
        columns.append(("to target s", _target_cell))
    if any(r.time_to_target is not None and r.time_to_target.flops is not None for r in rows):
        columns.append(
            (
                "to target FLOPs",
                lambda r: (
                    "-"
                    if r.time_to_target is None
                    else ("never" if r.time_to_target.flops is None else _flops_cell(r.time_to_target.flops))
                ),
            )
        )
    return columns


def footnotes(loaded: Loaded, rows: list[GroupRow]) -> list[str]:
    notes = ["Accuracy in %: mean ± std over seeds [95% Student-t interval of the mean, cut to [0, 100]]."]
    differences = [s.difference for r in rows for s in r.metrics.values() if s.difference is not None]
    if differences:
        notes.append(
            "Δ in points against the baseline: difference of means [95% Welch interval] and Welch's "
            "two-sided p; where the interval includes zero the difference is not shown, and ~N seeds is "
            "how many per group would make Welch's interval exclude zero if the observed difference and "
            "spreads held (about half of studies that size would show it)."
        )
    if any(d.paired_ci_low is not None for d in differences):
        notes.append(
            "Δ paired: 95% percentile interval of a two-level bootstrap over seeds (within each group) and "
            "evaluation problems (shared by both groups), 10,000 resamples, for runs evaluated on the same "
            "problems; at few seeds its seed level understates seed noise, so Welch's is the headline."
        )
    axes = {s.metric.axis for r in rows for s in r.metrics.values() if s.metric.at is not None}
    if axes:
        units = {
            "seconds": "s of wall-clock",
            "flops": " FLOPs of sampling and training (core/flops.py's estimate)",
            "tokens": " tokens generated and trained (once per pass)",
        }
        notes.append(
            "@X: each run's value as last evaluated when it had spent X"
            + " / X".join(units[axis] for axis in sorted(axes))
            + " (its final value if it ended before): the equal-cost view."
        )
    if any(r.time_to_target is not None and r.time_to_target.flops is not None for r in rows):
        notes.append(
            "to target: wall-clock seconds and FLOPs at which a group's runs first reached the baseline's "
            "final mean, interpolated between evaluations (never unless every run did)."
        )
    if any(r.group == BASE_GROUP and r.is_baseline for r in rows):
        notes.append(
            f"{BASE_GROUP}: the model the runs started from, as each run evaluated it before its first "
            "update (one value per seed)."
        )
    if any(r.too_few_seeds for r in rows):
        notes.append(
            f"* fewer than {stats.FEW_SEEDS} seeds: intervals are wide and only large differences can be shown."
        )
    for row in rows:
        for key, names in row.missing.items():
            notes.append(
                f"(n=k): group {row.group}: {len(names)} of {row.n} runs have no {key} "
                f"({', '.join(names)}); its mean and intervals are over the other {row.n - len(names)}."
            )
        if row.mixed:
            notes.append(
                f"! group {row.group} pools runs of different configs on purpose (--pool): "
                + "; ".join(f"{key} = {', '.join(values)}" for key, values in row.mixed.items())
                + "."
            )
        if row.no_signal:
            notes.append(
                f"no signal: group {row.group}: {', '.join(row.no_signal)} had every reward of a group equal "
                f"(no advantage, no gradient) in over {NO_SIGNAL_SHARE:.0%} of its RL steps: it barely "
                "trained, so its numbers say little about the recipe (bridgectl runs shows the counts)."
            )
    if loaded.copies:
        notes.append(
            f"Counted once: {len(loaded.copies)} run director(y/ies) copied from another run given ("
            + "; ".join(loaded.copies)
            + ")."
        )
    if len({(r.task, r.model) for r in rows}) > 1:
        notes.append("Runs of different tasks or models are compared in separate tables, never averaged together.")
    if loaded.left_out:
        notes.append("Left out: " + ", ".join(f"{n} {status}" for status, n in sorted(loaded.left_out.items())) + ".")
    if loaded.malformed_lines:
        notes.append(f"Skipped {loaded.malformed_lines} malformed metrics.jsonl line(s).")
    return notes


DIFFERENCES_TITLE = "What differs between the groups (! : not the compared thing itself), and the fairness facts"


def differences_table(section: list[GroupRow]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of what differs between one table's groups: each config key whose values differ (marked `!`
    where the difference is not the compared thing itself: GroupRow.marked), then every fairness fact
    (compare_audit.FACTS), one column per group; the base model's pseudo-group is left out (it trained nothing)."""
    groups = [row for row in section if row.facts]
    if not groups:
        return [], []
    keys = list(dict.fromkeys(key for row in groups for key in row.settings))
    lines = [
        [("! " if key in groups[0].marked else "") + key] + [row.settings.get(key, "-") for row in groups]
        for key in keys
    ]
    lines += [
        [name] + [row.facts.get(name, "-") for row in groups]
        for name in groups[0].facts
        if any(row.facts.get(name, "-") != "-" for row in groups)
    ]  # not recorded by any run: left out
    return [""] + [row.group for row in groups], lines


def differences_lines(header: list[str], lines: list[list[str]]) -> list[str]:
    """differences_table as one line per key or fact, groups of equal value together (`train.max_steps: 400
    (bridge, rl), 86 (chord)`): what a terminal too narrow for one column per group shows."""
    out = []
    for name, *values in lines:
        by_value: dict[str, list[str]] = {}
        for group, value in zip(header[1:], values):
            by_value.setdefault(value, []).append(group)
        out.append(
            f"{name}: "
            + "; ".join(
                value if len(by_value) == 1 else f"{value} ({', '.join(groups)})" for value, groups in by_value.items()
            )
        )
    return out


def sections_of(rows: list[GroupRow]) -> dict[tuple, list[GroupRow]]:
    sections: dict[tuple, list[GroupRow]] = {}
    for row in rows:
        sections.setdefault((row.task, row.model), []).append(row)
    return sections


def to_markdown(rows: list[GroupRow], notes: list[str]) -> str:
    out = []
    for (task, model), section in sections_of(rows).items():
        columns = display_columns(section)
        out += [
            f"**task {task}, model {model}**",
            "",
            "| " + " | ".join(h for h, _ in columns) + " |",
            "|" + "---|" * len(columns),
        ]
        out += ["| " + " | ".join(fn(r) for _, fn in columns) + " |" for r in section]
        out.append("")
        header, lines = differences_table(section)
        if lines:
            out += [f"{DIFFERENCES_TITLE}:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(cells) + " |" for cells in lines]
            out.append("")
    return "\n".join(out + notes) + "\n"


def to_csv(rows: list[GroupRow]) -> str:
    flat = flatten(rows)
    keys = sorted({k for r in flat for k in r}, key=lambda k: (k not in ("task", "model", "group", "n"), k))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()


def to_json(rows: list[GroupRow], notes: list[str], against: list[dict] | None = None) -> str:
    def clean(items):  # json has no NaN or infinity
        return [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in items]

    differences = [
        {
            "task": task,
            "model": model,
            "key": key,
            "marked": any(key in row.marked for row in section),
            "values": {row.group: row.settings[key] for row in section if key in row.settings},
        }
        for (task, model), section in sections_of(rows).items()
        for key in dict.fromkeys(k for row in section for k in row.settings)
    ]
    document = {"groups": clean(flatten(rows)), "differences": differences, "notes": notes}
    if against is not None:
        document["against"] = clean(against)
    return json.dumps(document, indent=2)


# ---- --against: deltas from recorded or published results ----------------------------------------------------
def load_reference(path: str, by: list[str], metric: str) -> dict:
    """A reference: run directories (recorded results, compared metric by metric) or a YAML file of published
    numbers (`models: {MODEL: {recipe: {metric: value}}}`, compared by each recipe's gain over `rl`)."""
    target = Path(path)
    if target.is_file() and target.suffix in (".yaml", ".yml"):
        try:
            content = read_config(target)
        except UserError as error:  # the run-config hint does not fit a reference file
            raise UserError(
                error.message,
                "it needs `models: {MODEL: {recipe: {metric: value}}}`, as in baselines/paper-bridge-2509.06948.yaml",
            ) from None
        if not isinstance(content.get("models"), dict):
            raise UserError(f"{path} is not a reference file", "it needs `models: {MODEL: {recipe: {metric: value}}}`")
        return {"kind": "published", "source": content.get("source", path), "models": content["models"]}
    loaded = load_runs([path])
    return {"kind": "runs", "source": path, "rows": compare(loaded, by, metric, None, pool=None)}


def against_rows(rows: list[GroupRow], reference: dict, metric: str) -> list[dict]:
    """Recorded runs: current minus reference mean for every final metric of matching (task, model, group).
    Published tables: the current gain of each group over `rl` beside the published gain over `rl` per model
    (different tasks and models, so only the ordering is comparable, not absolute numbers)."""
    out = []
    if reference["kind"] == "runs":
        by_key = {(r.task, r.model, r.group): r for r in reference["rows"]}
        for row in rows:
            ref = by_key.get((row.task, row.model, row.group))
            if ref is None:
                continue
            entry = {"task": row.task, "model": row.model, "group": row.group, "n": row.n, "n_ref": ref.n}
            for key, summary in row.metrics.items():
                if key in ref.metrics:
                    entry[f"{key}/delta"] = summary.mean - ref.metrics[key].mean
            out.append(entry)
        return out
    current = {r.group: r.metrics[metric].mean if metric in r.metrics else None for r in rows}
    for group, value in current.items():
        entry = {
            "group": group,
            f"{metric}/gain_over_rl": None if value is None or current.get("rl") is None else value - current["rl"],
        }
        for model, table in reference["models"].items():
            published = table.get(group, {})
            rl = table.get("rl", {})
            for name, number in published.items():
                if name in rl and isinstance(number, (int, float)):
                    entry[f"{model}/{name}/gain_over_rl"] = number - rl[name]
        out.append(entry)
    return out


def against_markdown(entries: list[dict], reference: dict) -> str:
    if not entries:
        return f"No group matches the reference {reference['source']}.\n"
    keys = [k for k in dict.fromkeys(k for e in entries for k in e) if k not in ("task", "model", "group", "n")]
    lines = [
        f"Against {reference['source']}:",
        "",
        "| group | " + " | ".join(keys) + " |",
        "|" + "---|" * (len(keys) + 1),
    ]
    for entry in entries:
        cells = [f"{entry[k]:+.3f}" if isinstance(entry.get(k), float) else str(entry.get(k, "-")) for k in keys]
        lines.append(f"| {entry['group']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
