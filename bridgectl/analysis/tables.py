"""`bridgectl compare`'s output formats, read from its typed rows (analysis/rows.py): the terminal and markdown
table's columns and cells, the notes under them (the methods, and what the audit found), the table of what differs
between the groups, and the csv and json forms."""

from __future__ import annotations

import csv
import io
import json
import math

from bridgectl.analysis import stats
from bridgectl.analysis.compare import BASE_GROUP, NO_SIGNAL_SHARE, Loaded
from bridgectl.analysis.rows import GroupRow, Metric, flatten


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
