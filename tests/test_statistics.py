"""Paired statistics with the seed as the unit: known values, coverage, shared patients."""

from __future__ import annotations

import numpy as np
import pytest

from lrc_lightning.evaluation.statistics import (
    bootstrap_interval,
    paired_differences,
    paired_table,
    seed_differences,
    t_interval,
)


def _summary(arm: str, cube: np.ndarray, ks: tuple[int, ...] = (1, 2, 4)) -> dict:
    """A summary of ``arm`` from a (seeds, ks, patients) array of per-volume Dice."""
    out: dict = {}
    for j, k in enumerate(ks):
        runs = []
        for s in range(cube.shape[0]):
            volumes = {f"p{p}": float(cube[s, j, p]) for p in range(cube.shape[2])}
            runs.append({"seed": s, "mean_dice": float(np.mean(cube[s, j])),
                         "per_volume_mean": volumes})  # fmt: skip
        out[f"{arm}|{k}"] = {"arm": arm, "k": k, "runs": runs}
    return out


def test_seed_is_the_unit_known_values() -> None:
    # Seed s, k index j: difference 0.01 * (s + 1) + 0.001 * j on every patient.
    base = np.full((3, 3, 4), 0.5)
    diff = 0.01 * (np.arange(3)[:, None, None] + 1) + 0.001 * np.arange(3)[None, :, None]
    summary = {**_summary("lrc", base + diff), **_summary("moco", base)}
    d = paired_differences(summary, "lrc", summary, "moco")
    assert d is not None
    assert d["n_seeds"] == 3 and d["ks"] == [1, 2, 4]
    assert d["per_seed"] == pytest.approx({"0": 0.011, "1": 0.021, "2": 0.031})
    assert d["mean"] == pytest.approx(0.021)
    assert d["sd"] == pytest.approx(0.01) and d["se"] == pytest.approx(0.01 / 3**0.5)
    # t(0.975, 2) = 4.302653: the interval of 3 seeds, not of 9 cells.
    half = 4.302653 * 0.01 / 3**0.5
    assert d["ci95"] == pytest.approx((0.021 - half, 0.021 + half), abs=1e-6)
    assert d["won"] == 3
    assert d["per_k"] == pytest.approx({1: 0.02, 2: 0.021, 4: 0.022})
    table = "\n".join(paired_table([("lrc - moco", d)]))
    assert "(n=3)" in table and "| 3 |" in table


def test_incomplete_seeds_are_left_out() -> None:
    a = {(1, 0): {"mean_dice": 0.6}, (2, 0): {"mean_dice": 0.8}, (1, 1): {"mean_dice": 0.9}}
    b = {(1, 0): {"mean_dice": 0.5}, (2, 0): {"mean_dice": 0.5}, (1, 1): {"mean_dice": 0.1}}
    assert seed_differences(a, b) == pytest.approx({0: 0.2})
    assert t_interval([0.2]) is None


def _simulate(rng: np.random.Generator, seeds: int, truth: float) -> dict:
    """One benchmark: a seed-level random effect shared by the seed's k (its pre-training
    and labelled patients), a (seed, k) effect and per-volume noise on 6 shared patients."""
    patients = 6
    seed_effect = rng.normal(0, 0.04, (seeds, 1, 1))
    cell = rng.normal(0, 0.01, (seeds, 3, 1))
    volume = rng.normal(0, 0.01, (seeds, 3, patients))
    base = 0.6 + rng.normal(0, 0.05, (1, 1, patients)) + rng.normal(0, 0.03, (seeds, 3, 1))
    return {**_summary("lrc", base + truth + seed_effect + cell + volume),
            **_summary("moco", base)}


def test_interval_covers_the_truth_with_a_seed_level_random_effect() -> None:
    """400 simulated experiments of 8 seeds: the 95% interval covers the true difference in
    93-98% of them, with the width of a t interval on 7 degrees of freedom; an interval
    that counts the 24 (k, seed) cells as independent draws covers far less."""
    rng = np.random.default_rng(1234)
    truth, repetitions = 0.02, 400
    hits = cell_hits = 0
    widths = []
    for _ in range(repetitions):
        summary = _simulate(rng, seeds=8, truth=truth)
        d = paired_differences(summary, "lrc", summary, "moco")
        assert d is not None and d["n_seeds"] == 8
        low, high = d["ci95"]
        hits += low <= truth <= high
        widths.append(high - low)
        cells = [r["mean_dice"] - m["mean_dice"]
                 for k in (1, 2, 4) for r, m in zip(summary[f"lrc|{k}"]["runs"],
                                                    summary[f"moco|{k}"]["runs"], strict=True)]
        cell_low, cell_high = t_interval(cells)  # type: ignore[misc]
        cell_hits += cell_low <= truth <= cell_high
    assert 0.93 <= hits / repetitions <= 0.98, f"coverage {hits / repetitions:.3f}"
    assert cell_hits / repetitions < 0.85  # the negative control: cells are not the unit
    # Seed-mean sd: seed effect 0.04, cell 0.01 / sqrt(3), volumes 0.01 / sqrt(18).
    sd = (0.04**2 + 0.01**2 / 3 + 0.01**2 / 18) ** 0.5
    expected = 2 * 2.364624 * sd / 8**0.5 * 0.9693  # E[s] = c4(8) * sd
    assert float(np.mean(widths)) == pytest.approx(expected, rel=0.08)


def _seed_runs(summary: dict, arm: str) -> dict:
    return {(v["k"], r["seed"]): r for v in summary.values() if v["arm"] == arm
            for r in v["runs"]}  # fmt: skip


def test_bootstrap_resamples_the_shared_patients_once_per_replicate() -> None:
    # No seed-to-seed variation at all, but the 6 test patients disagree: the seed-level
    # t interval has no width, the bootstrap carries the patients' spread.
    patients = np.array([-0.04, 0.0, 0.02, 0.04, 0.06, 0.04])
    base = np.full((8, 3, 6), 0.5)
    summary = {**_summary("lrc", base + patients), **_summary("moco", base)}
    d = paired_differences(summary, "lrc", summary, "moco")
    assert d is not None and d["ci95"] == pytest.approx((0.02, 0.02))
    low, high = bootstrap_interval(_seed_runs(summary, "lrc"), _seed_runs(summary, "moco"),
                                   replicates=4000)  # type: ignore[misc]
    # Patients drawn once per replicate: the spread of a mean of 6 patients (sd/sqrt(6)).
    assert low < 0.02 < high
    assert (high - low) / 2 == pytest.approx(1.96 * patients.std() / 6**0.5, rel=0.25)


def test_bootstrap_resamples_whole_seeds_not_cells() -> None:
    # Seeds differ, every k of a seed alike, patients alike: resampling whole seeds gives
    # the spread of a mean of 8 seed means; drawing (k, seed) cells independently would
    # give one of 24 cells, sqrt(3) narrower.
    seed_effects = np.array([-0.05, -0.03, 0.0, 0.01, 0.02, 0.04, 0.05, 0.08])
    base = np.full((8, 3, 6), 0.5)
    summary = {**_summary("lrc", base + seed_effects[:, None, None]),
               **_summary("moco", base)}  # fmt: skip
    low, high = bootstrap_interval(_seed_runs(summary, "lrc"), _seed_runs(summary, "moco"),
                                   replicates=4000)  # type: ignore[misc]
    whole_seed = 1.96 * seed_effects.std() / 8**0.5
    assert (high - low) / 2 == pytest.approx(whole_seed, rel=0.2)
    assert (high - low) / 2 > 1.4 * whole_seed / 3**0.5


def test_bootstrap_needs_eight_seeds_and_nan_seeds_are_left_out() -> None:
    base = np.full((4, 3, 6), 0.5)
    summary = {**_summary("lrc", base + 0.01), **_summary("moco", base)}
    summary["lrc|2"]["runs"][1]["mean_dice"] = float("nan")
    d = paired_differences(summary, "lrc", summary, "moco")
    assert d is not None and d["bootstrap95"] is None
    assert d["n_seeds"] == 3 and d["dropped_seeds"] == [1]
    assert d["mean"] == pytest.approx(0.01)
    assert "(left out: seeds [1])" in "\n".join(paired_table([("lrc - moco", d)]))


def test_a_seed_counts_only_with_every_k_of_the_protocol() -> None:
    # Both arms have only k=1 of seed 0 so far (the run was stopped): with the protocol's
    # ks (1, 2, 4) no seed is complete, so there is no primary value yet.
    base = np.full((1, 1, 6), 0.5)
    summary = {**_summary("lrc", base + 0.05, ks=(1,)), **_summary("moco", base, ks=(1,))}
    assert paired_differences(summary, "lrc", summary, "moco", ks=[1, 2, 4]) is None
    d = paired_differences(summary, "lrc", summary, "moco")
    assert d is not None and d["ks"] == [1] and d["mean"] == pytest.approx(0.05)


def test_declared_descriptive_row_leaves_out_the_smallest_k() -> None:
    from lrc_lightning.evaluation.label_efficiency import paired_rows

    # MoCo+LRC - MoCo: +0.10 at k = 1 (one atypical patient), +0.01 at k = 2 and 4.
    base = np.full((3, 3, 4), 0.5)
    lift = np.array([0.10, 0.01, 0.01])[None, :, None] + 0.001 * np.arange(3)[:, None, None]
    summary = {**_summary("moco_lrc", base + lift), **_summary("moco", base),
               **_summary("random", base - 0.1)}  # fmt: skip
    rows = dict(paired_rows(summary, ["random", "moco", "moco_lrc"], primary=True, ks=[1, 2, 4]))
    primary = rows["moco_lrc - moco **(primary)**"]
    descriptive = rows["moco_lrc - moco, k = 2, 4 only (descriptive)"]
    assert primary is not None and descriptive is not None
    assert primary["mean"] == pytest.approx(0.04 + 0.001)  # (0.10 + 0.01 + 0.01) / 3 + seeds
    assert descriptive["mean"] == pytest.approx(0.01 + 0.001) and descriptive["ks"] == [2, 4]
    # One k, or without the primary arms: no descriptive row.
    assert not any("descriptive" in name for name, _ in paired_rows(summary, ["random", "moco"],
                                                                    ks=[1, 2, 4]))
    assert not any("descriptive" in name for name, _ in paired_rows(summary, ["moco", "moco_lrc"],
                                                                    ks=[1]))


def test_a_negative_lrc_weight_is_refused() -> None:
    from lrc_lightning import LRCConfig

    with pytest.raises(ValueError, match=r"LRC weight \(lambda\) must be >= 0, got -1"):
        LRCConfig(weight=-1.0)
    assert LRCConfig(weight=0.0).weight_at(10) == 0.0
