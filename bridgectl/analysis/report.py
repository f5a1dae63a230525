"""`bridgectl compare --report DIR`: report.md, comparison.csv and PNG plots, one line per group with a band
across seeds (mean ± std), from run directories only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bridgectl.analysis.compare import Loaded
from bridgectl.analysis.rows import GroupRow, flatten
from bridgectl.analysis.tables import differences_table, footnotes, sections_of, to_csv, to_markdown

# (file name, metric, x axis, title, smoothing window in logged steps)
PLOTS = [
    ("reward_vs_step.png", "train/reward_mean", "step", "training reward (sampled)", 10),
    ("reward_vs_wall.png", "train/reward_mean", "wall_s", "training reward (sampled)", 10),
    ("accuracy_vs_step.png", "{metric}", "step", "{metric} (greedy)", 1),
    ("accuracy_vs_wall.png", "{metric}", "wall_s", "{metric} (greedy)", 1),
    ("accuracy_vs_flops.png", "{metric}", "compute/cum_flops", "{metric} (greedy) at equal compute", 1),
    ("response_len_vs_step.png", "train/response_len", "step", "response length (tokens)", 10),
    ("coop_gain_vs_step.png", "bridge/coop_gain", "step", "BRIDGE cooperative gain L_rl(shadow) - L_rl", 10),
]


def _series(run, metric: str, x_key: str, window: int) -> tuple[np.ndarray, np.ndarray] | None:
    points = [
        (row[x_key], row[metric])
        for row in run.metrics
        if isinstance(row.get(metric), (int, float)) and isinstance(row.get(x_key), (int, float))
    ]
    if len(points) < 2:
        return None
    x, y = np.array(points, dtype=float).T
    if window > 1 and len(y) >= window:  # trailing moving average: rewards of single steps are noisy
        y = np.convolve(y, np.ones(window) / window, mode="valid")
        x = x[window - 1 :]
    return x, y


X_LABELS = {"step": "step", "wall_s": "wall-clock (s)", "compute/cum_flops": "FLOPs (sampling + training)"}
LINE_STYLES = ["-", "--", ":", "-."]
FAMILIES = [
    ("SFT, RL and their sequences", ("sft", "rl", "two_stage", "interleaved", "mix")),
    ("BRIDGE and its ablations", ("bridge", "bridge_no_meta", "bridge_no_upper")),
    ("single-stage SFT + RL methods", ("chord", "luffy", "relift", "hpt", "srft", "uft")),
]
"""Panels of the small multiples (a crowded plot is split by recipe family; rl is drawn in every panel)."""
CROWDED = 7
"""More groups than this in one plot: small multiples."""


def styles(labels: list[str]) -> dict[str, dict]:
    """A distinct (colour, line style) pair per group, fixed by its place in the sorted labels: tab10's ten
    colours with a solid line, then again dashed, dotted, dash-dotted, so no two of up to 40 groups look alike."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    return {
        label: {"color": colours[i % 10], "linestyle": LINE_STYLES[(i // 10) % len(LINE_STYLES)]}
        for i, label in enumerate(sorted(labels))
    }


def panels(labels: list[str]) -> list[tuple[str, list[str]]]:
    """(title, labels) per panel: one panel when uncrowded; else by recipe family (groups of other names, such as
    a sweep's parameter values, in chunks of CROWDED), with rl in every panel as the reference."""
    if len(labels) <= CROWDED:
        return [("", sorted(labels))]
    left = set(labels)
    out = []
    for title, members in FAMILIES:
        chosen = [label for label in sorted(labels) if label.split(",")[0] in members]
        if chosen:
            out.append((title, sorted(set(chosen) | ({"rl"} & set(labels)))))
            left -= set(chosen)
    rest = sorted(left)
    out += [("", sorted(set(rest[i : i + CROWDED]) | ({"rl"} & set(labels)))) for i in range(0, len(rest), CROWDED)]
    return out


def plot(groups: dict[str, list], metric: str, x_key: str, title: str, window: int, path: Path) -> bool:
    """One line per group (mean over its runs on a common x grid) with a ±std band; False when no run has it.
    Every group keeps one colour and line style (styles); the legend sits outside the axes; more than CROWDED
    groups are drawn as small multiples, one panel per recipe family (panels)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    curves = {}
    for label, runs in groups.items():
        series = [s for s in (_series(r, metric, x_key, window) for r in runs) if s is not None]
        if not series:
            continue
        grid = np.linspace(max(s[0][0] for s in series), min(s[0][-1] for s in series), 200)
        if grid[0] >= grid[-1]:
            continue
        values = np.stack([np.interp(grid, x, y) for x, y in series])
        curves[label] = (grid, values.mean(axis=0), values.std(axis=0), len(series))
    if not curves:
        return False
    look = styles(list(groups))
    layout = panels(list(curves))
    figure, grid_axes = plt.subplots(len(layout), 1, figsize=(8.5, 3.4 * len(layout) + 0.6), squeeze=False, sharex=True)
    for (panel_title, labels), axes in zip(layout, grid_axes[:, 0]):
        for label in labels:
            x, mean, std, n = curves[label]
            axes.plot(x, mean, label=f"{label} (n={n})", linewidth=1.6, **look[label])
            if n > 1:
                axes.fill_between(x, mean - std, mean + std, color=look[label]["color"], alpha=0.12)
        axes.set_ylabel(metric)
        axes.set_title(panel_title or title, fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    grid_axes[-1, 0].set_xlabel(X_LABELS.get(x_key, x_key))
    if len(layout) > 1:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return True


def plot_frontier(rows: list[GroupRow], metric: str, path: Path) -> bool:
    """Each group's final `metric` (mean with its 95% interval) against the mean total FLOPs of its runs: the
    compute frontier, where up and to the left is better; False when no group recorded its compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(row, row.metrics[metric]) for row in rows if row.flops is not None and metric in row.metrics]
    if not points:
        return False
    look = styles([row.group for row in rows])
    figure, axes = plt.subplots(figsize=(8.5, 4.6))
    for row, summary in points:
        low = summary.ci_low if summary.ci_low is not None else summary.mean
        high = summary.ci_high if summary.ci_high is not None else summary.mean
        marker = {"-": "o", "--": "s", ":": "^", "-.": "D"}[look[row.group]["linestyle"]]  # colours repeat past 10
        axes.errorbar(
            row.flops,
            summary.mean,
            yerr=[[summary.mean - low], [high - summary.mean]],
            fmt=marker,
            capsize=3,
            color=look[row.group]["color"],
            label=f"{row.group} (n={row.n})",
        )
    axes.set_xscale("log")
    axes.set_xlabel("FLOPs per run (sampling + training, mean over seeds)")
    axes.set_ylabel(f"{metric} (final, mean and 95% interval)")
    axes.set_title("accuracy against compute")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return True


def plot_differences(rows: list[GroupRow], path: Path) -> bool:
    """Forest plot: each group's difference from the baseline on every split's final accuracy, with its 95% Welch
    interval (and the paired bootstrap's, where runs share their problems), a line at zero; False without one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def tested(row: GroupRow, key: str) -> bool:  # a difference with a Welch interval (not the baseline's own)
        difference = row.difference(key)
        return difference is not None and difference.ci_low is not None

    # final greedy accuracy of each split; not its equal-cost (--at-*) views
    metrics = sorted(
        {
            s.metric
            for r in rows
            for s in r.metrics.values()
            if s.metric.name == "accuracy" and s.metric.at is None and tested(r, s.metric.key)
        },
        key=lambda m: m.key,
    )
    shown = [r for r in rows if not r.is_baseline and any(tested(r, m.key) for m in metrics)]
    if not metrics or not shown:
        return False
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 0.45 * len(shown) + 1.5), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for y, row in enumerate(shown):
            if not tested(row, metric.key):
                continue
            difference = row.difference(metric.key)
            low, high, diff = (100 * value for value in (difference.ci_low, difference.ci_high, difference.diff))
            color = "tab:gray" if low <= 0 <= high else ("tab:green" if diff > 0 else "tab:red")
            axis.errorbar(diff, y, xerr=[[diff - low], [high - diff]], fmt="o", color=color, capsize=3)
            if difference.paired_ci_low is not None:
                axis.plot(
                    [100 * difference.paired_ci_low, 100 * difference.paired_ci_high],
                    [y - 0.2] * 2,
                    color=color,
                    alpha=0.5,
                    linewidth=3,
                )
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_yticks(range(len(shown)), [r.group for r in shown])
        axis.set_ylim(len(shown) - 0.5, -0.6)  # first group on top; room for the paired bar under each row
        axis.set_xlabel(f"Δ {metric.split} accuracy (points)")
        axis.grid(axis="x", alpha=0.3)
    axes[0][0].set_title(
        "difference from the baseline, 95% Welch interval\n(gray: includes 0; thick: paired bootstrap)", fontsize=9
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_pass_at_k(rows: list[GroupRow], path: Path) -> bool:
    """pass@k against k (log scale) per group and split from final sampled evaluations (eval.k), with 95%
    t intervals over seeds; False when no run sampled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def final_pass_at_k(row: GroupRow, split: str) -> list:  # by k; the --at-seconds views are not final
        return sorted(
            (
                s
                for s in row.metrics.values()
                if s.metric.kind == "pass" and s.metric.split == split and s.metric.at is None
            ),
            key=lambda s: s.metric.k,
        )

    splits = sorted({s.metric.split for r in rows for s in r.metrics.values() if s.metric.kind == "pass"})
    if not splits:
        return False
    look = styles([row.group for row in rows])
    figure, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits) + 1.5, 4), squeeze=False)
    for axis, split in zip(axes[0], splits):
        for row in rows:
            summaries = final_pass_at_k(row, split)
            if not summaries:
                continue
            ks, means = [s.metric.k for s in summaries], [100 * s.mean for s in summaries]
            # one seed has no interval: the band shrinks to the mean
            lows = [100 * (s.ci_low if s.ci_low is not None else s.mean) for s in summaries]
            highs = [100 * (s.ci_high if s.ci_high is not None else s.mean) for s in summaries]
            axis.plot(ks, means, marker="o", label=f"{row.group} (n={row.n})", **look[row.group])
            axis.fill_between(ks, lows, highs, color=look[row.group]["color"], alpha=0.15)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("k")
        axis.set_ylabel(f"{split} pass@k (%)")
        axis.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return True


def write_report(loaded: Loaded, rows: list[GroupRow], by: list[str], metric: str, out_dir: Path) -> list[Path]:
    """report.md, comparison.csv and every plot some run has data for; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list] = {}
    for run in loaded.runs:
        label = ", ".join(str(run.value(k)) for k in by)
        groups.setdefault(label, []).append(run)
    written = []
    (out_dir / "comparison.csv").write_text(to_csv(rows))
    written.append(out_dir / "comparison.csv")
    images = []
    for name, plot_metric, x_key, title, window in PLOTS:
        plot_metric, title = plot_metric.format(metric=metric), title.format(metric=metric)
        if plot(groups, plot_metric, x_key, title, window, out_dir / name):
            images.append(name)
            written.append(out_dir / name)
    for name, draw in (
        ("differences.png", plot_differences),
        ("pass_at_k.png", plot_pass_at_k),
        ("frontier.png", lambda r, path: plot_frontier(r, metric, path)),
    ):
        if draw(rows, out_dir / name):
            images.append(name)
            written.append(out_dir / name)
    notes = footnotes(loaded, rows)
    report = [
        "# bridgectl comparison",
        "",
        f"Runs grouped by {', '.join(by)}; final greedy pass@1 (methods in the notes under the table).",
        "",
        to_markdown(rows, notes).strip(),
        "",
    ]
    report += [f"![{name}]({name})" for name in images]
    (out_dir / "report.md").write_text("\n".join(report) + "\n")
    written.append(out_dir / "report.md")
    return written


def log_to_wandb(rows: list[GroupRow], images: list[Path], by: list[str]) -> str:
    """Logs the comparison table and plots to a W&B run (job_type=compare): online with credentials, offline
    otherwise (WANDB_MODE wins). Returns the run's local directory."""
    import os

    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "bridgectl"), job_type="compare", mode=mode, config={"by": by}
    )
    flat = flatten(rows)  # the csv's columns
    columns = sorted({k for r in flat for k in r}, key=lambda k: (k not in ("task", "model", "group", "n"), k))
    table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in flat])
    # what differs between the groups and the fairness facts, one W&B table per task and model
    differences = {}
    for (task, model), section in sections_of(rows).items():
        header, lines = differences_table(section)
        if lines:
            differences[f"differences/{task}/{model}"] = wandb.Table(columns=["key or fact"] + header[1:], data=lines)
    run.log({"comparison": table, **differences, **{image.stem: wandb.Image(str(image)) for image in images}})
    directory = run.dir
    run.finish()
    return directory
