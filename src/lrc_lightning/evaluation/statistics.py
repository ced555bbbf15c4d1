"""Paired comparisons of benchmark arms: mean difference, standard error, bootstrap interval.

Runs are paired by (k, seed): the same labelled patients, the same initialisation seed and
the same test volumes, so that the patient-to-patient spread cancels in the difference.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

__all__ = ["bootstrap_interval", "paired_differences", "paired_table"]


def _runs(summary: dict[str, Any], arm: str) -> dict[tuple[int, int], dict[str, Any]]:
    return {(v["k"], r["seed"]): r
            for v in summary.values() if v["arm"] == arm for r in v["runs"]}  # fmt: skip


def bootstrap_interval(
    runs_a: dict[tuple[int, int], dict[str, Any]],
    runs_b: dict[tuple[int, int], dict[str, Any]],
    replicates: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile interval of the mean per-volume difference ``a - b``, resampling seeds
    and, inside each drawn seed, test volumes (both with replacement; k is kept).

    Each run needs ``per_volume_mean``: test case id -> mean Dice over its organs.
    None when the runs carry no per-volume values.
    """
    pairs = sorted(set(runs_a) & set(runs_b))
    cells: dict[int, list[np.ndarray]] = {}
    for k, s in pairs:
        va, vb = runs_a[(k, s)].get("per_volume_mean"), runs_b[(k, s)].get("per_volume_mean")
        if not va or not vb:
            return None
        common = sorted(set(va) & set(vb))
        diffs = np.array([va[c] - vb[c] for c in common], dtype=float)
        cells.setdefault(k, []).append(diffs[~np.isnan(diffs)])
    if not cells:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(replicates)
    for i in range(replicates):
        drawn = []
        for seeds in cells.values():
            for j in rng.integers(0, len(seeds), len(seeds)):
                volumes = seeds[j]
                if len(volumes):
                    drawn.append(volumes[rng.integers(0, len(volumes), len(volumes))])
        means[i] = np.concatenate(drawn).mean() if drawn else np.nan
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_differences(
    summary_a: dict[str, Any], arm_a: str, summary_b: dict[str, Any], arm_b: str
) -> dict[str, Any] | None:
    """Mean Dice of ``arm_a`` minus ``arm_b`` over the (k, seed) pairs both have: mean, per
    k, pairs won, sd, standard error of the mean and a 95% bootstrap interval over seeds and
    test volumes (None without a common pair)."""
    a, b = _runs(summary_a, arm_a), _runs(summary_b, arm_b)
    pairs = sorted(set(a) & set(b))
    if not pairs:
        return None
    diffs = [a[p]["mean_dice"] - b[p]["mean_dice"] for p in pairs]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    ks = sorted({k for k, _ in pairs})
    return {
        "mean": statistics.fmean(diffs),
        "per_k": {k: statistics.fmean([a[p]["mean_dice"] - b[p]["mean_dice"]
                                       for p in pairs if p[0] == k]) for k in ks},
        "won": sum(d > 0 for d in diffs), "n": len(diffs), "sd": sd,
        "se": sd / len(diffs) ** 0.5,
        "ci95": bootstrap_interval(a, b),
    }  # fmt: skip


def paired_table(rows: list[tuple[str, dict[str, Any] | None]]) -> list[str]:
    """Markdown rows of :func:`paired_differences` results."""
    lines = ["| comparison | mean difference | per k | pairs won | sd | s.e. | 95% bootstrap CI |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, d in rows:
        if d:
            per_k = ", ".join(f"k={k}: {v:+.3f}" for k, v in d["per_k"].items())
            ci = d.get("ci95")
            interval = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "-"
            lines.append(f"| {label} | {d['mean']:+.3f} | {per_k} | {d['won']}/{d['n']} | "
                         f"{d['sd']:.3f} | {d['se']:.3f} | {interval} |")  # fmt: skip
    return lines
