"""The declared decision rule and validity checks of a label-efficiency protocol, in code.

A protocol declared before its runs (``benchmarks/results/README.md``, Evidence II) fixes
when to stop adding seeds, how to read the primary interval, and which checks make the
readout trustworthy. Writing the verdict by hand after the numbers are in invites reading
them generously; here it is computed from the results, with the declared thresholds as
defaults:

* **Stopping.** Seeds are added in a declared order until the primary comparison's
  seed-level s.e. is at most ``target_se`` with at least ``min_seeds`` seeds, or until
  ``max_seeds`` seeds; the verdict rests on the seeds up to that first stop. Before it the
  verdict is ``"no result yet"`` and the interval is interim.
* **Decision** (at the stop): ``"helps"`` if the 95% t interval lies above 0, ``"hurts"``
  if below, otherwise ``"not resolved"``, with the largest effect each way that the
  interval excludes.
* **Validity checks** (every one is reported; a declared one that fails makes the primary
  result "not interpretable" at once, since the readout must then be fixed before any
  further seed; at the stop, one that cannot be judged yet withholds the verdict): random
  init's mean Dice at ``floor_k`` at least ``random_floor`` (at k = 1 too, reported outside
  the verdict); no organ of any fine-tuned run, noise-floor repeats included, below
  ``organ_floor``; the noise floor (the same weights read out again with another readout
  seed) within ``noise_margin`` of 0, with its seed spread below the primary comparison's.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from lrc_lightning.evaluation.statistics import t_interval

__all__ = ["Decision", "ValidityCheck", "decide"]

Verdict = Literal["no result yet", "helps", "hurts", "not resolved", "not interpretable"]


@dataclass(frozen=True)
class ValidityCheck:
    """One check of the readout: ``passed`` is None while it cannot be judged yet (no run of
    that kind, too few seeds). ``declared`` False marks a check reported beside the
    declared ones that does not enter the verdict."""

    name: str
    passed: bool | None
    detail: str
    declared: bool = True


@dataclass(frozen=True)
class Decision:
    """The declared rule applied to the results so far.

    ``verdict`` is ``"no result yet"`` before the stopping rule is met (or while a declared
    check cannot be judged at the stop); then ``"helps"``, ``"hurts"`` or ``"not
    resolved"``; ``"not interpretable"`` as soon as a declared check fails. ``seeds`` are
    the seeds the verdict rests on (the declared order's first ``n_seeds``). ``text`` says it
    in one sentence, with the seeds and interval.
    """

    verdict: Verdict
    stopped: bool
    n_seeds: int
    seeds: tuple[int, ...]
    mean: float | None
    se: float | None
    ci95: tuple[float, float] | None
    checks: tuple[ValidityCheck, ...]
    text: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the results file)."""
        return asdict(self)


def _cell_runs(cells: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, float]]]:
    """(label, per-organ Dice) of every fine-tuned run of the summaries' cells. A cell that
    is the mean of several fine-tunings (its ``finetunings``) gives each of them: a mean can
    hide one that missed an organ."""
    found = []
    for summary in cells:
        for key, cell in sorted(summary.items()):
            for run in cell.get("runs", []):
                parts = run.get("finetunings") or [run]
                for part in parts:
                    which = f" ({part['run']})" if len(parts) > 1 else ""
                    label = f"{key.replace('|', ' k=')} seed {run['seed']}{which}"
                    found.append((label, part["per_organ"]))
    return found


def _low_organs(
    runs: Sequence[tuple[str, dict[str, float]]], organ_floor: float
) -> list[str]:
    """The runs with an organ below the floor, as "<label>: <organs>"."""
    low = []
    for label, per_organ in runs:
        organs = [f"{organ} {value:.3f}" for organ, value in per_organ.items()
                  if value == value and value < organ_floor]  # NaN: the organ is absent
        if organs:
            low.append(f"{label}: {', '.join(organs)}")
    return low


def _random_check(
    summary: dict[str, Any], arm: str, k: int, floor: float, seeds: set[int] | None,
    declared: bool,
) -> ValidityCheck:
    cell = summary.get(f"{arm}|{k}")
    runs = [r for r in (cell or {}).get("runs", []) if seeds is None or r["seed"] in seeds]
    values = [r["mean_dice"] for r in runs if r["mean_dice"] == r["mean_dice"]]
    name = f"{arm} at k = {k} >= {floor} mean test Dice"
    if not values:
        return ValidityCheck(name, None, "no run yet", declared)
    mean = statistics.fmean(values)
    return ValidityCheck(name, mean >= floor, f"{mean:.3f} over {len(values)} seeds", declared)


def _first_stop(
    per_seed: dict[int, float], order: Sequence[int], target_se: float, min_seeds: int,
    max_seeds: int,
) -> tuple[list[int], bool]:
    """The seeds the rule looks at (the declared order's complete prefix) and, if it has
    stopped, the first prefix at which it did."""
    prefix: list[int] = []
    for seed in order:
        if seed not in per_seed:
            break  # seeds are added in order: a later seed cannot stand in for a missing one
        prefix.append(seed)
        n = len(prefix)
        if n >= 2:
            se = statistics.stdev(per_seed[s] for s in prefix) / n**0.5
            if (n >= min_seeds and se <= target_se) or n >= max_seeds:
                return prefix, True
    return prefix, False


def decide(
    primary: dict[str, Any] | None,
    summary: dict[str, Any],
    noise: dict[str, Any] | None = None,
    *,
    repeats: dict[str, Any] | None = None,
    organ_runs: Sequence[tuple[str, dict[str, float]]] | None = None,
    seed_order: Sequence[int] | None = None,
    complete_seeds: Collection[int] | None = None,
    random_arm: str = "random",
    floor_k: int = 2,
    random_floor: float = 0.5,
    organ_floor: float = 0.02,
    noise_margin: float = 0.03,
    noise_seeds: int = 3,
    target_se: float = 0.015,
    min_seeds: int = 8,
    max_seeds: int = 20,
) -> Decision:
    """The declared verdict on ``primary`` and the validity checks of the readout.

    Args:
        primary: :func:`~lrc_lightning.evaluation.statistics.paired_differences` of the
            primary comparison (e.g. MoCo+LRC - MoCo, fine-tuned; its ``per_seed``
            differences are used), or None (no complete seed yet).
        summary: the fine-tuned readout's summary (``"<arm>|<k>"`` cells with their
            ``runs``, each with ``seed``, ``mean_dice`` and ``per_organ``).
        noise: paired differences of the noise floor (repeat - original, fine-tuned), or
            None (its check is then not judged).
        repeats: the summary of the noise-floor repeat runs: their organs count too.
        organ_runs: (label, per-organ Dice) of every finished fine-tuned run, cells not yet
            complete included; when given, the organ check judges these instead of the
            cells of ``summary`` and ``repeats`` (a failure then counts at once).
        seed_order: the declared order in which seeds are added (default: ascending). The
            rule reads the longest complete prefix of it and stops at the first prefix that
            meets it; later seeds do not enter the verdict.
        complete_seeds: the seeds whose every planned cell is finished (other arms, the
            noise floor and every fine-tuning of a repeated cell included), or None (every
            seed of ``primary``). A seed outside it ends the prefix, even when its primary
            arms are done: its unfinished runs could still fail a check.
        random_arm, floor_k, random_floor: random init's mean test Dice at ``floor_k``, on
            the verdict's seeds, must be at least ``random_floor`` (at k = 1 it is reported
            too, outside the verdict).
        organ_floor: no organ of any fine-tuned run (noise-floor repeats included, and each
            fine-tuning of a cell that averages several) below it.
        noise_margin, noise_seeds: the noise floor's mean within +- ``noise_margin`` of 0
            and its seed sd below the primary's, judged from ``noise_seeds`` seeds on.
        target_se, min_seeds, max_seeds: the stopping rule.

    Raises:
        ValueError: ``min_seeds`` above ``max_seeds``, or a threshold that is not positive.

    Example:
        >>> primary = {"per_seed": {"0": 0.02, "1": -0.01, "2": 0.05}}
        >>> decide(primary, {}).verdict
        'no result yet'
    """
    if min_seeds > max_seeds:
        raise ValueError(f"min_seeds ({min_seeds}) must not exceed max_seeds ({max_seeds})")
    if min(target_se, organ_floor, noise_margin, random_floor) <= 0:
        raise ValueError("target_se, organ_floor, noise_margin and random_floor must be > 0")
    per_seed = {int(s): float(d) for s, d in (primary or {}).get("per_seed", {}).items()
                if complete_seeds is None or int(s) in complete_seeds}  # fmt: skip
    order = list(seed_order) if seed_order is not None else sorted(per_seed)
    seeds, stopped = _first_stop(per_seed, order, target_se, min_seeds, max_seeds)
    values = [per_seed[s] for s in seeds]
    n = len(values)
    sd = statistics.stdev(values) if n > 1 else float("nan")
    used = set(seeds) if stopped else None

    checks = [_random_check(summary, random_arm, floor_k, random_floor, used, True)]
    if floor_k != 1:
        checks.append(_random_check(summary, random_arm, 1, random_floor, used, False))
    judged = list(organ_runs) if organ_runs is not None else _cell_runs([summary, repeats or {}])
    low, runs = _low_organs(judged, organ_floor), len(judged)
    checks.append(ValidityCheck(
        f"no organ of any fine-tuned run below {organ_floor}", None if runs == 0 else not low,
        f"{len(low)} of {runs} runs: " + "; ".join(low) if low else f"{runs} runs, none below",
    ))  # fmt: skip
    name = f"noise floor within +-{noise_margin} of 0, its sd below the primary's"
    if noise is None or noise.get("n_seeds", 0) < noise_seeds:
        have = 0 if noise is None else noise.get("n_seeds", 0)
        checks.append(ValidityCheck(name, None, f"{have} of {noise_seeds} seeds"))
    else:
        mean_ok = abs(noise["mean"]) <= noise_margin
        spread_ok = None if sd != sd else noise["sd"] < sd  # needs the primary's seed sd
        checks.append(ValidityCheck(
            name, False if not mean_ok or spread_ok is False else spread_ok,
            f"mean {noise['mean']:+.3f}, sd {noise['sd']:.3f} over {noise['n_seeds']} "
            "seeds" + (f" (primary sd {sd:.3f})" if sd == sd else ""),
        ))  # fmt: skip

    ci = t_interval(values)
    mean = statistics.fmean(values) if values else None
    se = sd / n**0.5 if n > 1 else None
    done = (mean, se, ci, tuple(checks))
    failed = [c.name for c in checks if c.declared and c.passed is False]
    if n == 0 and not failed:
        return Decision("no result yet", False, 0, (), *done,
                        "No seed has every k of both arms yet: no result.")  # fmt: skip
    interval = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "-"
    said = (f"{mean:+.3f}, s.e. {se:.3f}, 95% t interval {interval}, {n} seeds"
            if mean is not None and se is not None else f"{n} seeds")  # fmt: skip
    if failed:  # declared: the readout is fixed before any further seed
        return Decision("not interpretable", stopped, n, tuple(seeds), *done,
                        f"Not interpretable ({said}): failed check(s): {'; '.join(failed)}.")
    if not stopped:
        return Decision("no result yet", False, n, tuple(seeds), *done,
                        f"No result yet ({said}; interim): the rule stops at s.e. <= "
                        f"{target_se} with >= {min_seeds} seeds, or at {max_seeds} seeds.")
    unjudged = [c.name for c in checks if c.declared and c.passed is None]
    if unjudged or ci is None:
        return Decision("no result yet", True, n, tuple(seeds), *done,
                        f"No result yet ({said}; the rule has stopped): check(s) not judged: "
                        f"{'; '.join(unjudged) or 'no interval'}.")  # fmt: skip
    if ci[0] > 0:
        verdict: Verdict = "helps"
        text = f"Helps ({said}): the interval lies above 0."
    elif ci[1] < 0:
        verdict, text = "hurts", f"Hurts ({said}): the interval lies below 0."
    else:
        verdict = "not resolved"
        text = (f"Not resolved ({said}): the interval excludes a gain above {ci[1]:+.3f} "
                f"and a loss beyond {ci[0]:+.3f} Dice.")  # fmt: skip
    return Decision(verdict, True, n, tuple(seeds), *done, text)
