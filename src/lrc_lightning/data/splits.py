"""Patient-level splits: a case's slices never fall on two sides."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lrc_lightning.data.cases import Case, DataError

__all__ = ["Split", "check_evaluation_labels", "split_cases"]


@dataclass(frozen=True)
class Split:
    pool: list[Case]  # pre-training pool (every non-test, non-validation case)
    labelled: list[Case]  # labelled fine-tuning subset of the pool
    val: list[Case]
    test: list[Case]


def _pick(cases: list[Case], spec: int | Sequence[str], what: str) -> list[Case]:
    if isinstance(spec, int):
        if spec < 0 or spec > len(cases):
            raise ValueError(f"{what}: asked for {spec} cases, {len(cases)} available")
        return cases[:spec]
    by_id = {c.case_id: c for c in cases}
    unknown = [s for s in spec if s not in by_id]
    if unknown:
        raise ValueError(f"{what}: unknown case ids {unknown}; known: {sorted(by_id)}")
    return [by_id[s] for s in spec]


def split_cases(
    cases: Sequence[Case],
    test_cases: int | Sequence[str] = 0,
    val_cases: int | Sequence[str] = 0,
    labelled_cases: int | float | Sequence[str] | None = None,
    seed: int = 0,
) -> Split:
    """Split by case (patient). Counts draw from a seeded permutation of the sorted ids;
    lists name ids. Labelled subsets are nested: the first k of the pool's permutation, so
    k=1 is inside k=2 is inside k=4. ``labelled_cases`` is a count, a fraction in (0, 1],
    a list of ids from the pool, or ``None`` (all of the pool)."""
    ordered = sorted(cases, key=lambda c: c.case_id)
    perm = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    test = _pick(perm, test_cases, "test_cases")
    rest = [c for c in perm if c not in test]
    val = _pick(rest, val_cases, "val_cases")
    pool = [c for c in rest if c not in val]
    if labelled_cases is None:
        labelled = list(pool)
    elif isinstance(labelled_cases, (list, tuple)):
        labelled = _pick(pool, labelled_cases, "labelled_cases (must be pool cases)")
    elif isinstance(labelled_cases, float) and 0 < labelled_cases <= 1:
        labelled = pool[: max(1, round(labelled_cases * len(pool)))]
    elif isinstance(labelled_cases, int) and 0 <= labelled_cases <= len(pool):
        labelled = pool[:labelled_cases]
    else:
        raise ValueError(
            f"labelled_cases must be a count in 0..{len(pool)} or a fraction in (0, 1], "
            f"got {labelled_cases!r}"
        )
    return Split(pool=pool, labelled=labelled, val=val, test=test)


def check_evaluation_labels(cases: Sequence[Case], what: str) -> None:
    """Validation and test Dice are computed on labelled cases only: say so, naming them.

    Some of ``cases`` without a label file is a :class:`DataError` (the Dice would pass
    for one over all of them while it covers a part, e.g. a case whose label went missing
    from a CSV); none labelled (self-supervised data) is a warning: no Dice at all.

    Args:
        cases: the validation or test cases of a split.
        what: the option that chose them (``"val_cases"``, ``"test_cases"``).

    Raises:
        DataError: some but not all of ``cases`` have a label.
    """
    missing = [c.case_id for c in cases if c.label is None]
    if not missing:
        return
    if len(missing) < len(cases):
        raise DataError(
            f"{what}: case(s) {missing} have no label file, so their Dice would be left "
            f"out silently ({len(cases) - len(missing)} of {len(cases)} cases scored); "
            f"give them labels, or name labelled cases in {what}=[...]"
        )
    warnings.warn(
        f"{what}: none of the cases {missing} has a label file: no Dice is computed on them",
        stacklevel=3,
    )
