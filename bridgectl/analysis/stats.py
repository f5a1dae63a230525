"""The statistics behind `bridgectl compare`, chosen to hold at the handful of seeds a training comparison has.

- A group's mean: the Student-t interval, mean +- t(0.975, n-1) s / sqrt(n) (scipy.stats.ttest_1samp). A
  percentile bootstrap over seeds is not used: over n = 3 seeds it can only return values between the smallest
  and largest run, so it claims more certainty than three numbers give.
- The difference of two groups' means: Welch's t interval and two-sided p-value (scipy.stats.ttest_ind with
  equal_var=False), which does not assume equal spreads.
- How many seeds would separate a difference: the smallest n per group at which Welch's interval, with the observed
  difference and spreads unchanged, would exclude zero. A planning figure, not a promise: at that n the observed
  difference would be just significant, so about half of repeated studies of that size would show it.
- When runs were evaluated on the same problems (eval_problems.jsonl with equal fingerprints), a paired two-level
  bootstrap over seeds and problems: each resample draws seeds with replacement within each group and one set of
  problems with replacement shared by both groups, so the difference carries both sources of noise, seeds and the
  choice of problems, while problems common to both groups are compared with themselves. Its seed level has the
  bootstrap's small-n limit (at 5 seeds it understates seed noise), which is why Welch stays the headline interval.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

LEVEL = 0.95
FEW_SEEDS = 5
"""Groups with fewer seeds are marked: their intervals are wide and only large differences can be shown."""
PAIRED_RESAMPLES = 10_000
MAX_SEEDS_NEEDED = 1000


def mean_interval(values: list[float], level: float = LEVEL) -> tuple[float, float] | None:
    """Student-t interval of the mean; None below two values (no spread to estimate)."""
    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        return None
    if np.ptp(data) == 0:
        return float(data[0]), float(data[0])
    interval = stats.ttest_1samp(data, 0.0).confidence_interval(level)
    return float(interval.low), float(interval.high)


def welch(values: list[float], baseline: list[float], level: float = LEVEL) -> dict | None:
    """{diff, low, high, p}: Welch's interval and two-sided p-value of mean(values) - mean(baseline); None when a
    group has fewer than two values or neither has any spread."""
    a, b = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else None
    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return None
    # by hand rather than scipy's ttest_ind, which warns of precision loss on a group without spread (the base
    # model's step-0 accuracy, the same at every seed); the same Welch-Satterthwaite interval and p
    share_a, share_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(share_a + share_b)
    dof = (share_a + share_b) ** 2 / (share_a**2 / (len(a) - 1) + share_b**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
    p = float(2 * stats.t.sf(abs(diff) / se, dof))
    return {"diff": diff, "low": diff - half, "high": diff + half, "p": p}


def seeds_needed(values: list[float], baseline: list[float], level: float = LEVEL) -> int | None:
    """The smallest number of seeds per group at which Welch's interval would exclude zero if the observed
    difference and standard deviations stayed as they are; None when there is no difference or spread to go on,
    or it would take more than MAX_SEEDS_NEEDED."""
    a, b = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return None
    diff, var_a, var_b = abs(a.mean() - b.mean()), a.var(ddof=1), b.var(ddof=1)
    if diff == 0 or var_a + var_b == 0:
        return None
    for n in range(2, MAX_SEEDS_NEEDED + 1):
        se2 = (var_a + var_b) / n
        dof = se2**2 / ((var_a / n) ** 2 / (n - 1) + (var_b / n) ** 2 / (n - 1))  # Welch-Satterthwaite
        if stats.t.ppf(0.5 + level / 2, dof) * math.sqrt(se2) < diff:
            return n
    return None


def paired_bootstrap(
    per_problem: np.ndarray,
    per_problem_baseline: np.ndarray,
    level: float = LEVEL,
    resamples: int = PAIRED_RESAMPLES,
    seed: int = 0,
) -> dict:
    """{diff, low, high}: percentile interval of mean - baseline mean from a two-level bootstrap. Arguments are
    [seeds, problems] arrays of per-problem rewards over the same problems in the same order. Each resample draws
    seeds with replacement within each group and one multiset of problems shared by both; in weight form,
    diff* = (u_a A / n_a - u_b B / n_b) . w / P with u ~ Multinomial(n, 1/n) per group and w ~ Multinomial(P, 1/P)."""
    a, b = np.asarray(per_problem, dtype=float), np.asarray(per_problem_baseline, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"paired arrays must be [seeds, problems] over the same problems, got {a.shape}, {b.shape}")
    rng = np.random.default_rng(seed)
    n_a, n_b, problems = a.shape[0], b.shape[0], a.shape[1]
    u_a = rng.multinomial(n_a, np.full(n_a, 1 / n_a), size=resamples)
    u_b = rng.multinomial(n_b, np.full(n_b, 1 / n_b), size=resamples)
    w = rng.multinomial(problems, np.full(problems, 1 / problems), size=resamples)
    per_resample = (u_a @ a) / n_a - (u_b @ b) / n_b  # [resamples, problems]: resampled seed means per problem
    diffs = (per_resample * w).sum(axis=1) / problems
    tail = (1 - level) / 2 * 100
    return {
        "diff": float(a.mean() - b.mean()),
        "low": float(np.percentile(diffs, tail)),
        "high": float(np.percentile(diffs, 100 - tail)),
    }
