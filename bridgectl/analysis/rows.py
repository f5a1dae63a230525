"""The rows of `bridgectl compare`, typed: one GroupRow per (task, model, group), holding a MetricSummary per eval
metric and, with --baseline, its Difference from the baseline group. The table, markdown, report and plots read
these fields by name; `GroupRow.flat()` is the one place the csv/json keys (`eval/test/accuracy/diff_ci_low`, ...)
are spelled, so a renamed field fails where it is read instead of silently emptying a plot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bridgectl.analysis import stats

AXES = {
    "seconds": ("wall_s", "s", "s"),
    "flops": ("compute/cum_flops", " FLOPs", "flops"),
    "tokens": ("compute/cum_tokens", " tok", "tokens"),
}
"""The views at equal cost: the metrics.jsonl field each reads (bridgectl/training/budget.py), its unit in headers and in
keys."""


@dataclass(frozen=True)
class Metric:
    """Which number a summary is of: one eval metric of one split, at the end of the runs or as of an equal cost:
    a wall-clock second (--at-seconds), a number of FLOPs (--at-flops) or of tokens (--at-tokens)."""

    split: str
    """The eval split, e.g. `test` or `ood`."""
    name: str
    """The metric as summary.json names it: `accuracy` (greedy), or with eval.k `pass@k`, `maj@k`, `mean@n`."""
    at: float | None = None
    """None: each run's final value; else its value as last evaluated when the run's cost reached this."""
    axis: str = "seconds"
    """The cost `at` is in: seconds (wall-clock), flops or tokens (AXES)."""

    @property
    def at_seconds(self) -> float | None:
        return self.at if self.axis == "seconds" else None

    @property
    def suffix(self) -> str:
        """`@15s`, `@2e+11 FLOPs`, `@5e+05 tok`; empty for the final value."""
        return "" if self.at is None else f"@{self.at:g}{AXES[self.axis][1]}"

    @property
    def logged(self) -> str:
        """Its key in summary.json's eval and in metrics.jsonl: `eval/<split>/<name>`."""
        return f"eval/{self.split}/{self.name}"

    @property
    def key(self) -> str:
        """Its name in the flat form and in GroupRow.metrics: `eval/test/accuracy`, `eval/test/accuracy@15s`,
        `eval/test/accuracy@2e+11flops`."""
        return self.logged if self.at is None else f"{self.logged}@{self.at:g}{AXES[self.axis][2]}"

    @property
    def kind(self) -> str:
        """`accuracy`, `pass`, `maj` or `mean`: the name without its k."""
        return self.name.split("@")[0]

    @property
    def k(self) -> int | None:
        """The k of pass@k and maj@k (the n of mean@n); None for greedy accuracy."""
        return int(self.name.split("@")[1]) if "@" in self.name else None

    @property
    def header(self) -> str:
        """Its column header, short enough for a terminal: `test acc`, `test acc @15s`, `test pass@4`."""
        at = self.suffix
        if self.name == "accuracy":
            return f"{self.split} acc" + (f" {at}" if at else "")
        return f"{self.split} {self.name}{at}" if self.kind == "pass" else self.key


@dataclass
class Difference:
    """A group's mean minus the baseline group's on one metric (--baseline), with Welch's test and, where the runs
    share their evaluation problems, the paired bootstrap's interval (bridgectl/analysis/stats.py)."""

    diff: float
    """Difference of the two groups' means (0.0 on the baseline's own row)."""
    of_baseline: bool = False
    """True on the baseline's own row: nothing is tested, and the flat form has only `diff`."""
    ci_low: float | None = None
    """Lower end of Welch's 95% interval of the difference; None under 2 seeds a side or with no spread."""
    ci_high: float | None = None
    """Upper end of Welch's 95% interval of the difference; None when ci_low is."""
    p: float | None = None
    """Welch's two-sided p-value; None when ci_low is."""
    seeds_needed: int | None = None
    """Seeds per group that would make Welch's interval exclude zero at the observed difference and spreads; None
    under 2 seeds a side, with no difference or spread, or above stats.MAX_SEEDS_NEEDED."""
    paired_ci_low: float | None = None
    """Lower end of the paired two-level bootstrap's 95% interval (final greedy accuracy only); None when the runs
    are not paired, and then it is not in the flat form."""
    paired_ci_high: float | None = None
    """Upper end of the paired bootstrap's 95% interval; None when paired_ci_low is."""

    def flat(self, prefix: str) -> dict:
        if self.of_baseline:
            return {f"{prefix}/diff": self.diff}
        out = {
            f"{prefix}/diff": self.diff,
            f"{prefix}/diff_ci_low": self.ci_low,
            f"{prefix}/diff_ci_high": self.ci_high,
            f"{prefix}/diff_p": self.p,
            f"{prefix}/seeds_needed": self.seeds_needed,
        }
        if self.paired_ci_low is not None:
            out[f"{prefix}/paired_ci_low"], out[f"{prefix}/paired_ci_high"] = self.paired_ci_low, self.paired_ci_high
        return out


@dataclass
class MetricSummary:
    """One metric of one group over its seeds (the runs that have it)."""

    metric: Metric
    """Which metric, split and view this is."""
    mean: float
    """Mean over seeds."""
    std: float | None
    """Sample standard deviation over seeds (n-1); None with one seed."""
    ci_low: float | None
    """Lower end of the 95% Student-t interval of the mean, cut at 0; None with one seed."""
    ci_high: float | None
    """Upper end of the 95% Student-t interval of the mean, cut at 1; None with one seed."""
    difference: Difference | None = None
    """Against the baseline group; None without --baseline or when the baseline has no value of this metric."""
    n: int | None = None
    """How many of the group's runs have this metric: the mean, spread and intervals are over these (None: not
    counted, for rows made by hand)."""

    def flat(self) -> dict:
        prefix = self.metric.key
        out = {
            f"{prefix}/n": self.n,
            f"{prefix}/mean": self.mean,
            f"{prefix}/std": self.std,
            f"{prefix}/ci_low": self.ci_low,
            f"{prefix}/ci_high": self.ci_high,
        }
        return out | (self.difference.flat(prefix) if self.difference is not None else {})


@dataclass
class TimeToTarget:
    """When a group's runs first reach the target: the baseline's final mean on --metric (compare.time_to_target)."""

    seconds: float | None
    """Mean wall-clock seconds to the target over the group's runs; None ("never") unless every run reached it."""
    reached: int
    """How many of the group's runs reached the target."""
    runs: int
    """How many runs the group has."""
    flops: float | None = None
    """Mean FLOPs to the target (compute/cum_flops, interpolated alike); None unless every run reached it and
    recorded its compute."""


@dataclass
class GroupRow:
    """One group of runs of one task and model: what every output format of `bridgectl compare` shows."""

    task: str | None
    """The runs' task (summary.json's, else config task.name)."""
    model: str | None
    """The runs' model (summary.json's, else config model.name)."""
    params: tuple
    """The group's values of the --by keys, in their order, e.g. ("bridge", 0.3); ("base",) for the base model."""
    group: str
    """The group's label: its params joined by ", " (`bridge, 0.3`)."""
    n: int
    """Runs (seeds) in the group."""
    is_baseline: bool
    """Whether this is the --baseline group."""
    metrics: dict[str, MetricSummary] = field(default_factory=dict)
    """Every eval metric some run of the group has, by Metric.key: final values in sorted order, then the
    --at-seconds, --at-flops and --at-tokens views in the same order."""
    wall_s: float | None = None
    """Mean wall-clock seconds of a run; None when no run recorded it."""
    gen_tokens: float | None = None
    """Mean tokens generated by a run; None when no run recorded it."""
    peak_mem_mb: float | None = None
    """Mean peak accelerator memory of a run in MB; None when no run recorded it."""
    flops: float | None = None
    """Mean FLOPs of a run's sampling and training (core/flops.py); None when no run recorded them."""
    data: dict = field(default_factory=dict)
    """What the runs saw: per stream (sft, rl) the mean items used and distinct problems among them (summary.json's
    `data`); empty for runs that did not record it."""
    time_to_target: TimeToTarget | None = None
    """None without a target (no baseline with logged curves) or for a group without curves (the base model)."""
    missing: dict[str, list[str]] = field(default_factory=dict)
    """Metric key -> the names of the group's runs that lack it (its MetricSummary.n counts the others)."""
    mixed: dict[str, list[str]] = field(default_factory=dict)
    """Config keys whose values differ within the group, with their values: runs pooled on purpose (--pool)."""
    no_signal: list[str] = field(default_factory=list)
    """Names of the group's runs that had no learning signal in most of their RL steps (compare.NO_SIGNAL_SHARE)."""
    settings: dict[str, str] = field(default_factory=dict)
    """The group's value of every config key that differs between the groups of its table (compare_audit)."""
    marked: tuple[str, ...] = ()
    """Those of `settings`' keys whose difference is not the compared thing itself (not --by, recipe.*, or a stage
    section only some groups run): the same for every row of a table."""
    facts: dict[str, str] = field(default_factory=dict)
    """Fairness facts of the group (compare_audit.FACTS): what trains, updates, compute, data, learning rates,
    length limits; empty for the base model."""

    def difference(self, key: str) -> Difference | None:
        """The difference from the baseline on the metric keyed `key` (Metric.key); None without one."""
        return self.metrics[key].difference if key in self.metrics else None

    @property
    def too_few_seeds(self) -> bool:
        """Fewer than stats.FEW_SEEDS seeds behind some metric: the table marks the group with `*`."""
        return min([self.n] + [s.n for s in self.metrics.values() if s.n is not None]) < stats.FEW_SEEDS

    def flat(self) -> dict:
        """The csv/json form, one key per number: `task`, `group`, `eval/test/accuracy/mean`, ..., in this order
        (json keeps it)."""
        out = {
            "task": self.task,
            "model": self.model,
            "group": self.group,
            "n": self.n,
            "too_few_seeds": self.too_few_seeds,
            "is_baseline": self.is_baseline,
        }
        for summary in self.metrics.values():
            out |= summary.flat()
        out |= {
            "wall_s": self.wall_s,
            "gen_tokens": self.gen_tokens,
            "peak_mem_mb": self.peak_mem_mb,
            "flops": self.flops,
        }
        for stream, seen in self.data.items():
            out |= {f"data/{stream}/used": seen["used"], f"data/{stream}/distinct": seen["distinct"]}
        if self.time_to_target is not None:
            out["time_to_target_s"] = self.time_to_target.seconds
            out["flops_to_target"] = self.time_to_target.flops
            out["reached_target"] = f"{self.time_to_target.reached}/{self.time_to_target.runs}"
        out["no_signal_runs"] = len(self.no_signal)
        out |= {f"pooled/{key}": ", ".join(values) for key, values in self.mixed.items()}
        out |= {f"config/{key}": value for key, value in self.settings.items()}
        out |= {f"facts/{name}": value for name, value in self.facts.items()}
        return out


def flatten(rows: list[GroupRow]) -> list[dict]:
    """The csv/json form of every row."""
    return [row.flat() for row in rows]
