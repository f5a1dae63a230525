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

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bridgectl.analysis import audit as compare_audit
from bridgectl.analysis import stats
from bridgectl.analysis.rows import AXES, Difference, GroupRow, Metric, MetricSummary, TimeToTarget
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
            summary_text = (path / "summary.json").read_text()
            summary = json.loads(summary_text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            summary = None
        if not isinstance(summary, dict):
            loaded.left_out["unreadable"] = loaded.left_out.get("unreadable", 0) + 1
            loaded.unreadable.append(f"{path / 'summary.json'} is not a JSON object")
            continue
        metrics_file = path / "metrics.jsonl"  # read once: for the run's identity, and parsed if it completed
        metrics_bytes = metrics_file.read_bytes() if metrics_file.exists() else b""
        identity = compare_audit.run_identity(summary_text, metrics_bytes)
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
        for line in metrics_bytes.decode().splitlines():
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
