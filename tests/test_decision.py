"""The declared decision rule and validity checks (lrc_lightning.evaluation.decision)."""

from __future__ import annotations

import pytest

from lrc_lightning.evaluation.decision import decide
from lrc_lightning.evaluation.label_efficiency import markdown


def _primary(n: int, mean: float, se: float, ci: tuple[float, float]) -> dict:
    return {"mean": mean, "n_seeds": n, "se": se, "sd": se * n**0.5, "ci95": ci}


def _summary(random_k2: float = 0.7, low: float = 0.5) -> dict:
    organs = {"liver": 0.8, "spleen": low}
    return {
        "random|2": {"mean": random_k2, "n_seeds": 3, "runs": [
            {"seed": s, "per_organ": organs} for s in range(3)]},
        "moco|1": {"mean": 0.6, "n_seeds": 1, "runs": [
            {"seed": 0, "per_organ": {"liver": 0.7, "spleen": float("nan")}}]},
    }  # fmt: skip


NOISE = {"mean": 0.004, "sd": 0.01, "n_seeds": 3}


def test_no_result_until_the_stopping_rule_is_met() -> None:
    interim = decide(_primary(5, 0.03, 0.01, (0.002, 0.058)), _summary(), NOISE)
    assert interim.verdict == "no result yet" and not interim.stopped
    assert "interim" in interim.text and "5 seeds" in interim.text
    # s.e. small enough but fewer than 8 seeds; 8 seeds but s.e. too large: still no result.
    assert decide(_primary(7, 0.03, 0.01, (0.006, 0.054)), _summary(), NOISE).verdict == (
        "no result yet")  # fmt: skip
    assert decide(_primary(8, 0.03, 0.02, (-0.017, 0.077)), _summary(), NOISE).verdict == (
        "no result yet")  # fmt: skip
    assert decide(None, _summary(), NOISE).verdict == "no result yet"


def test_verdicts_at_the_stop_follow_the_interval() -> None:
    helps = decide(_primary(8, 0.03, 0.012, (0.002, 0.058)), _summary(), NOISE)
    assert helps.stopped and helps.verdict == "helps"
    hurts = decide(_primary(9, -0.03, 0.012, (-0.058, -0.002)), _summary(), NOISE)
    assert hurts.verdict == "hurts"
    unresolved = decide(_primary(8, 0.005, 0.014, (-0.028, 0.038)), _summary(), NOISE)
    assert unresolved.verdict == "not resolved"
    assert "excludes a gain above +0.038 and a loss beyond -0.028" in unresolved.text
    # 20 seeds stop the protocol whatever the s.e.
    assert decide(_primary(20, 0.01, 0.03, (-0.053, 0.073)), _summary(), NOISE).stopped


def test_a_failed_check_makes_the_result_not_interpretable() -> None:
    stop = _primary(8, 0.03, 0.012, (0.002, 0.058))
    weak_random = decide(stop, _summary(random_k2=0.45), NOISE)
    assert weak_random.verdict == "not interpretable"
    assert "random at k = 2 >= 0.5" in weak_random.text
    low_organ = decide(stop, _summary(low=0.01), NOISE)
    assert low_organ.verdict == "not interpretable"
    check = low_organ.checks[1]
    assert check.passed is False and "random k=2 seed 0: spleen 0.010" in check.detail
    assert check.detail.startswith("3 of 4 runs: random k=2 seed 0: spleen 0.010;")
    # A NaN organ (absent from the volumes) is not a collapsed organ.
    assert decide(stop, _summary(), NOISE).checks[1].passed is True
    off_centre = decide(stop, _summary(), {"mean": 0.05, "sd": 0.01, "n_seeds": 3})
    assert off_centre.verdict == "not interpretable"
    noisy = decide(stop, _summary(), {"mean": 0.0, "sd": 0.5, "n_seeds": 3})
    assert noisy.checks[2].passed is False  # its spread above the primary's seed sd
    unjudged = decide(stop, _summary(), None)
    assert unjudged.checks[2].passed is None and unjudged.verdict == "helps"


def test_bad_thresholds_are_refused_and_the_table_shows_the_decision() -> None:
    with pytest.raises(ValueError, match="min_seeds"):
        decide(None, {}, min_seeds=30)
    with pytest.raises(ValueError, match="must be > 0"):
        decide(None, {}, organ_floor=0)
    decision = decide(_primary(8, 0.005, 0.014, (-0.028, 0.038)), _summary(), NOISE)
    head = {"command": "bench", "versions": {}, "hardware": "cpu"}
    text = markdown({"finetune": {}}, head, "T", ["moco", "moco_lrc"], ["liver"],
                    decision=decision)  # fmt: skip
    assert "## Declared decision (moco_lrc - moco, fine-tuned)" in text
    assert "**Not resolved (+0.005, s.e. 0.014" in text
    assert "- random at k = 2 >= 0.5: passes (0.700 over 3 seeds)" in text
    assert decision.as_dict()["checks"][0]["passed"] is True
