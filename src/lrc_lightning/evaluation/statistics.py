"""Paired comparisons of benchmark arms with the seed as the unit of replication.

Runs are paired by (k, seed): the same labelled patients, the same initialisation seed and
the same test volumes. But the k runs of one seed are not independent draws: they share
the seed's pre-training, its fine-tuning seed and nested labelled patients (k=1 inside
k=2 inside k=4), and every run of every seed is scored on the same test patients. So:

* the unit is the seed: per seed, the mean over k of the paired difference ``a - b``;
* the interval is Student's t on the S seed means (S - 1 degrees of freedom). Its estimand
  is conditional on the test patients (and the pre-training pool): given them, the seed
  means are independent draws. It says nothing about other patients;
* the bootstrap, secondary and not for decisions, resamples whole seeds (all their k
  together) and the shared test patients once per replicate (the same patients for every
  seed of a replicate), so that it also carries the test patients' sampling. A percentile
  interval over few seeds cannot reach beyond the extreme seed means (too narrow), and
  resampling seeds and patients independently counts their interaction more than once
  (Owen 2007): it is only computed from 8 seeds on.

Only seeds that have every k of the comparison, with a finite Dice, count: a seed cut short
(an interrupted run) would average over other k than the rest. Left-out seeds are listed.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

__all__ = [
    "bootstrap_interval",
    "paired_differences",
    "paired_table",
    "seed_differences",
    "t_interval",
]

Runs = dict[tuple[int, int], dict[str, Any]]


def _runs(summary: dict[str, Any], arm: str) -> Runs:
    return {(v["k"], r["seed"]): r
            for v in summary.values() if v["arm"] == arm for r in v["runs"]}  # fmt: skip


#: Fewer seeds than this: no bootstrap interval (see the module docstring).
MIN_BOOTSTRAP_SEEDS = 8


def _finite(run: dict[str, Any], key: str = "mean_dice") -> bool:
    value = run.get(key)
    return value is not None and np.isfinite(value)


def _complete_seeds(
    runs_a: Runs, runs_b: Runs, ks: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """(ks, seeds): the k of the comparison (``ks``, else every k either arm has) and the
    seeds that have all of them, with a finite mean Dice, in both arms."""
    pairs = {p for p in set(runs_a) & set(runs_b) if _finite(runs_a[p]) and _finite(runs_b[p])}
    everything = set(runs_a) | set(runs_b)
    ks = sorted(ks) if ks else sorted({k for k, _ in everything})
    seeds = sorted(s for s in {s for _, s in everything} if all((k, s) in pairs for k in ks))
    return ks, seeds


def seed_differences(
    runs_a: Runs, runs_b: Runs, key: str = "mean_dice", ks: Sequence[int] | None = None
) -> dict[int, float]:
    """Seed -> mean over k of ``runs_a[k, seed][key] - runs_b[k, seed][key]``, for the
    seeds that have every k of the comparison in both arms.

    Example:
        >>> a = {(1, 0): {"mean_dice": 0.5}, (2, 0): {"mean_dice": 0.7}, (1, 1): {"mean_dice": 0.4}}
        >>> b = {(1, 0): {"mean_dice": 0.4}, (2, 0): {"mean_dice": 0.4}, (1, 1): {"mean_dice": 0.4}}
        >>> {s: round(d, 3) for s, d in seed_differences(a, b).items()}  # seed 1 lacks k=2
        {0: 0.2}
    """
    ks, seeds = _complete_seeds(runs_a, runs_b, ks)
    return {s: statistics.fmean(runs_a[(k, s)][key] - runs_b[(k, s)][key] for k in ks)
            for s in seeds}  # fmt: skip


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student's t interval of the mean of ``values`` (n - 1 degrees of freedom); None
    with fewer than 2 values.

    Example:
        >>> low, high = t_interval([0.1, 0.2, 0.3])
        >>> round(low, 4), round(high, 4)
        (-0.0484, 0.4484)
    """
    n = len(values)
    if n < 2:
        return None
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / n**0.5
    half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * se
    return mean - half, mean + half


def bootstrap_interval(
    runs_a: Runs,
    runs_b: Runs,
    replicates: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    ks: Sequence[int] | None = None,
) -> tuple[float, float] | None:
    """Percentile interval of the seed-level mean difference ``a - b``: each replicate
    draws S seeds with replacement (each with all its k) and the test patients once with
    replacement (the same draw for every seed), and averages per seed over k and patients.

    Each run needs ``per_volume_mean``: test case id -> mean Dice over its organs. None when
    the runs carry no per-volume values or fewer than ``MIN_BOOTSTRAP_SEEDS`` seeds are
    complete.
    """
    ks, seeds = _complete_seeds(runs_a, runs_b, ks)
    if len(seeds) < MIN_BOOTSTRAP_SEEDS:
        return None
    volumes: list[str] | None = None
    cube = []  # (S, K, P) per-volume differences
    for s in seeds:
        rows = []
        for k in ks:
            va, vb = runs_a[(k, s)].get("per_volume_mean"), runs_b[(k, s)].get("per_volume_mean")
            if not va or not vb:
                return None
            volumes = volumes if volumes is not None else sorted(set(va) & set(vb))
            rows.append([va.get(c, np.nan) - vb.get(c, np.nan) for c in volumes])
        cube.append(rows)
    cube_array = np.array(cube, dtype=float)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a patient NaN at every k stays NaN
        diffs = np.nanmean(cube_array, axis=1)  # (S, P): per seed, mean over k
    n_seeds, n_patients = diffs.shape
    if n_patients == 0:
        return None
    rng = np.random.default_rng(seed)
    # A replicate's mean over its drawn (seed, patient) grid, from how often each seed and
    # each patient was drawn (multinomial counts); NaN volumes carry no weight.
    seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), replicates)
    patient_counts = rng.multinomial(n_patients, np.full(n_patients, 1 / n_patients), replicates)
    valid = ~np.isnan(diffs)
    totals = np.einsum("rs,sp,rp->r", seed_counts, np.where(valid, diffs, 0.0), patient_counts)
    weights = np.einsum("rs,sp,rp->r", seed_counts, valid.astype(float), patient_counts)
    means = np.where(weights > 0, totals / np.maximum(weights, 1), np.nan)
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_differences(
    summary_a: dict[str, Any],
    arm_a: str,
    summary_b: dict[str, Any],
    arm_b: str,
    ks: Sequence[int] | None = None,
) -> dict[str, Any] | None:
    """Mean Dice of ``arm_a`` minus ``arm_b`` with the seed as the unit; a seed counts
    when it has every k of ``ks`` (the protocol's; default: every k either arm has).

    Returns (None without a complete seed):
        ``mean`` (over seeds of the per-seed mean over k), ``n_seeds``, ``per_seed``,
        ``per_k`` (descriptive: mean over the same seeds at each k), ``won`` (seeds with a
        positive difference), ``sd`` and ``se`` over seeds, ``ci95`` (t interval on
        ``n_seeds - 1`` degrees of freedom, None for one seed) and ``bootstrap95`` (whole
        seeds and shared test patients resampled; from 8 seeds on), ``ks`` and
        ``dropped_seeds`` (seeds without every k or with a NaN Dice, left out).
    """
    a, b = _runs(summary_a, arm_a), _runs(summary_b, arm_b)
    per_seed = seed_differences(a, b, ks=ks)
    if not per_seed:
        return None
    ks, seeds = _complete_seeds(a, b, ks)
    dropped = sorted({s for _, s in set(a) | set(b)} - set(seeds))
    values = list(per_seed.values())
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return {
        "mean": statistics.fmean(values),
        "n_seeds": len(values),
        "per_seed": {str(s): d for s, d in per_seed.items()},
        "per_k": {k: statistics.fmean([a[(k, s)]["mean_dice"] - b[(k, s)]["mean_dice"]
                                       for s in seeds]) for k in ks},
        "won": sum(d > 0 for d in values), "sd": sd,
        "se": sd / len(values) ** 0.5,
        "ci95": t_interval(values),
        "bootstrap95": bootstrap_interval(a, b, ks=ks),
        "ks": ks, "dropped_seeds": dropped,
    }  # fmt: skip


def _interval(ci: Sequence[float] | None) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "-"


def _spread(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"  # NaN (one seed): no spread to show


def paired_table(rows: list[tuple[str, dict[str, Any] | None]]) -> list[str]:
    """Markdown rows of :func:`paired_differences` results, the number of seeds beside
    every interval."""
    lines = ["| comparison | seeds | mean difference | 95% t interval (seeds) | s.e. | sd | "
             "seeds won | per k | bootstrap (seeds, patients; >= 8 seeds, not for decisions) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, d in rows:
        if d:
            per_k = ", ".join(f"k={k}: {v:+.3f}" for k, v in d["per_k"].items())
            n = d["n_seeds"]
            if d.get("dropped_seeds"):
                label += f" (left out: seeds {d['dropped_seeds']})"
            lines.append(f"| {label} | {n} | {d['mean']:+.3f} | {_interval(d['ci95'])} (n={n}) | "
                         f"{_spread(d['se'])} | {_spread(d['sd'])} | {d['won']}/{n} | {per_k} | "
                         f"{_interval(d.get('bootstrap95'))} |")  # fmt: skip
    return lines
