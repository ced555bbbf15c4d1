"""The declared decision rule and validity checks of a label-efficiency protocol, in code.

A protocol declared before its runs (``benchmarks/results/README.md``, Evidence II) fixes
when to stop adding seeds, how to read the primary interval, and which checks make the
readout trustworthy. Writing the verdict by hand after the numbers are in invites reading
them generously; here it is computed from the results, with the declared thresholds as
defaults:

* **Stopping.** Seeds are added until the primary comparison's seed-level s.e. is at most
  ``target_se`` with at least ``min_seeds`` seeds, or until ``max_seeds`` seeds. Before that
  the verdict is ``"no result yet"`` and the interval is interim.
* **Decision** (at the stop): ``"helps"`` if the 95% t interval lies above 0, ``"hurts"``
  if below, otherwise ``"not resolved"``, with the largest effect each way that the
  interval excludes.
* **Validity checks** (every one is reported; a failed one makes the primary result "not
  interpretable"): random init's mean Dice at ``floor_k`` at least ``random_floor``; no organ
  of any fine-tuned run below ``organ_floor``; the noise floor (the same weights read out
  again with another readout seed) within ``noise_margin`` of 0, with its seed spread below
  the primary comparison's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["Decision", "ValidityCheck", "decide"]

Verdict = Literal["no result yet", "helps", "hurts", "not resolved", "not interpretable"]


@dataclass(frozen=True)
class ValidityCheck:
    """One declared check of the readout: ``passed`` is None while it cannot be judged yet
    (no run of that kind)."""

    name: str
    passed: bool | None
    detail: str


@dataclass(frozen=True)
class Decision:
    """The declared rule applied to the results so far.

    ``verdict`` is ``"no result yet"`` before the stopping rule is met; at the stop it is
    ``"helps"``, ``"hurts"`` or ``"not resolved"``, or ``"not interpretable"`` when a
    validity check failed. ``text`` says it in one sentence, with the seeds and interval.
    """

    verdict: Verdict
    stopped: bool
    n_seeds: int
    se: float | None
    ci95: tuple[float, float] | None
    checks: tuple[ValidityCheck, ...]
    text: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the results file)."""
        return asdict(self)


def _low_organs(summary: dict[str, Any], organ_floor: float) -> list[str]:
    """One entry per run with an organ below the floor: "<arm> k=<k> seed <s>: <organs>"."""
    low = []
    for key, cell in sorted(summary.items()):
        for run in cell.get("runs", []):
            organs = [f"{organ} {value:.3f}" for organ, value in run["per_organ"].items()
                      if value == value and value < organ_floor]  # NaN: the organ is absent
            if organs:
                low.append(f"{key.replace('|', ' k=')} seed {run['seed']}: {', '.join(organs)}")
    return low


def decide(
    primary: dict[str, Any] | None,
    summary: dict[str, Any],
    noise: dict[str, Any] | None = None,
    *,
    random_arm: str = "random",
    floor_k: int = 2,
    random_floor: float = 0.5,
    organ_floor: float = 0.02,
    noise_margin: float = 0.03,
    target_se: float = 0.015,
    min_seeds: int = 8,
    max_seeds: int = 20,
) -> Decision:
    """The declared verdict on ``primary`` and the validity checks of the readout.

    Args:
        primary: :func:`~lrc_lightning.evaluation.statistics.paired_differences` of the
            primary comparison (e.g. MoCo+LRC - MoCo, fine-tuned), or None (no complete
            seed yet).
        summary: the fine-tuned readout's summary (``"<arm>|<k>"`` cells with their
            ``runs``, each with ``seed`` and ``per_organ``).
        noise: paired differences of the noise floor (repeat - original, fine-tuned), or
            None when the protocol has none (its check is then not judged).
        random_arm, floor_k, random_floor: random init's mean Dice at ``floor_k`` must be
            at least ``random_floor``.
        organ_floor: no organ of any fine-tuned run below it.
        noise_margin: the noise floor's mean within +- this of 0.
        target_se, min_seeds, max_seeds: the stopping rule.

    Raises:
        ValueError: ``min_seeds`` above ``max_seeds``, or a threshold that is not positive.

    Example:
        >>> primary = {"mean": 0.01, "n_seeds": 3, "se": 0.02, "sd": 0.035,
        ...            "ci95": (-0.076, 0.096)}
        >>> decide(primary, {}).verdict
        'no result yet'
    """
    if min_seeds > max_seeds:
        raise ValueError(f"min_seeds ({min_seeds}) must not exceed max_seeds ({max_seeds})")
    if min(target_se, organ_floor, noise_margin, random_floor) <= 0:
        raise ValueError("target_se, organ_floor, noise_margin and random_floor must be > 0")
    checks = []
    floor = summary.get(f"{random_arm}|{floor_k}")
    checks.append(ValidityCheck(
        f"{random_arm} at k = {floor_k} >= {random_floor}",
        None if floor is None else floor["mean"] >= random_floor,
        "no run yet" if floor is None else f"{floor['mean']:.3f} over {floor['n_seeds']} seeds",
    ))  # fmt: skip
    low = _low_organs(summary, organ_floor)
    runs = sum(len(cell.get("runs", [])) for cell in summary.values())
    checks.append(ValidityCheck(
        f"no organ of any fine-tuned run below {organ_floor}",
        None if runs == 0 else not low,
        f"{len(low)} of {runs} runs: " + "; ".join(low) if low
        else f"{runs} runs, none below",
    ))  # fmt: skip
    if noise is None:
        checks.append(ValidityCheck(f"noise floor within +-{noise_margin} of 0", None,
                                    "no noise-floor repeat yet"))  # fmt: skip
    else:
        mean_ok = abs(noise["mean"]) <= noise_margin
        primary_sd = primary.get("sd", float("nan")) if primary else float("nan")
        # The spread part needs the primary's seed sd (two complete seeds at least).
        spread_ok = None if primary_sd != primary_sd else noise["sd"] < primary_sd
        checks.append(ValidityCheck(
            f"noise floor within +-{noise_margin} of 0, its sd below the primary's",
            False if not mean_ok or spread_ok is False else spread_ok,
            f"mean {noise['mean']:+.3f}, sd {noise['sd']:.3f} over {noise['n_seeds']} seeds"
            + (f" (primary sd {primary_sd:.3f})" if primary_sd == primary_sd else ""),
        ))  # fmt: skip
    if primary is None:
        return Decision("no result yet", False, 0, None, None, tuple(checks),
                        "No seed has every k of both arms yet: no result.")  # fmt: skip
    n, se = int(primary["n_seeds"]), primary["se"]
    bounds = primary.get("ci95")
    ci = (float(bounds[0]), float(bounds[1])) if bounds else None
    stopped = (n >= min_seeds and se == se and se <= target_se) or n >= max_seeds
    interval = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "-"
    said = f"{primary['mean']:+.3f}, s.e. {se:.3f}, 95% t interval {interval}, {n} seeds"
    if not stopped:
        return Decision("no result yet", False, n, se, ci, tuple(checks),
                        f"No result yet ({said}; interim): the rule stops at s.e. <= "
                        f"{target_se} with >= {min_seeds} seeds, or at {max_seeds} seeds.")
    failed = [c.name for c in checks if c.passed is False]
    if failed:
        return Decision("not interpretable", True, n, se, ci, tuple(checks),
                        f"Not interpretable ({said}): failed check(s): {'; '.join(failed)}.")
    if ci is None:
        return Decision("not resolved", True, n, se, ci, tuple(checks),
                        f"Not resolved ({said}): no interval.")  # fmt: skip
    if ci[0] > 0:
        verdict: Verdict = "helps"
        text = f"Helps ({said}): the interval lies above 0."
    elif ci[1] < 0:
        verdict, text = "hurts", f"Hurts ({said}): the interval lies below 0."
    else:
        verdict = "not resolved"
        text = (f"Not resolved ({said}): the interval excludes a gain above {ci[1]:+.3f} "
                f"and a loss beyond {ci[0]:+.3f} Dice.")  # fmt: skip
    return Decision(verdict, True, n, se, ci, tuple(checks), text)
