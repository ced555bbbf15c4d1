"""The declared decision rule and validity checks (lrc_lightning.evaluation.decision)."""

from __future__ import annotations

import statistics

import pytest

from lrc_lightning.evaluation.decision import decide
from lrc_lightning.evaluation.label_efficiency import markdown


def _primary(values: list[float]) -> dict:
    return {"per_seed": {str(s): v for s, v in enumerate(values)}}


def _spread(n: int, mean: float, se: float) -> list[float]:
    """n seed differences with the given mean and (sample) standard error."""
    base = [(-1) ** i for i in range(n)]
    centred = [b - statistics.fmean(base) for b in base]
    scale = se * n**0.5 / statistics.stdev(centred)
    return [mean + c * scale for c in centred]


def _summary(n_seeds: int = 8, random_k2: float = 0.7, random_k1: float = 0.6,
             low: float = 0.5) -> dict:  # fmt: skip
    organs = {"liver": 0.8, "spleen": low}
    return {
        "random|1": {"runs": [{"seed": s, "mean_dice": random_k1, "per_organ": organs}
                              for s in range(n_seeds)]},
        "random|2": {"runs": [{"seed": s, "mean_dice": random_k2, "per_organ": organs}
                              for s in range(n_seeds)]},
        "moco|1": {"runs": [{"seed": 0, "mean_dice": 0.6,
                             "per_organ": {"liver": 0.7, "spleen": float("nan")}}]},
    }  # fmt: skip


NOISE = {"mean": 0.004, "sd": 0.001, "n_seeds": 3}


def test_no_result_until_the_stopping_rule_is_met() -> None:
    interim = decide(_primary(_spread(5, 0.03, 0.01)), _summary(), NOISE)
    assert interim.verdict == "no result yet" and not interim.stopped
    assert "interim" in interim.text and "5 seeds" in interim.text
    # The s.e. at the target, but 7 seeds; 8 seeds with an s.e. just above: no result.
    assert not decide(_primary(_spread(7, 0.03, 0.015)), _summary(), NOISE).stopped
    assert not decide(_primary(_spread(8, 0.03, 0.0151)), _summary(), NOISE).stopped
    assert decide(_primary(_spread(8, 0.03, 0.0149)), _summary(), NOISE).stopped
    assert not decide(_primary(_spread(19, 0.01, 0.03)), _summary(), NOISE).stopped
    assert decide(_primary(_spread(20, 0.01, 0.03)), _summary(), NOISE).stopped
    assert decide(None, _summary(), NOISE).verdict == "no result yet"


def test_the_verdict_rests_on_the_first_stop_in_the_declared_order() -> None:
    values = [*_spread(8, 0.03, 0.012), -0.5, 0.9]  # two wild later seeds
    first = decide(_primary(values), _summary(10), NOISE)
    assert first.seeds == tuple(range(8)) and first.verdict == "helps"
    # A missing seed ends the prefix: later complete seeds do not stand in for it.
    gap = _primary(values)
    del gap["per_seed"]["3"]
    held = decide(gap, _summary(10), NOISE, seed_order=range(10))
    assert held.seeds == (0, 1, 2) and held.verdict == "no result yet"


def test_verdicts_at_the_stop_follow_the_interval() -> None:
    helps = decide(_primary(_spread(8, 0.03, 0.012)), _summary(), NOISE)
    assert helps.verdict == "helps" and helps.ci95[0] > 0
    hurts = decide(_primary(_spread(8, -0.03, 0.012)), _summary(), NOISE)
    assert hurts.verdict == "hurts"
    unresolved = decide(_primary(_spread(8, 0.005, 0.014)), _summary(), NOISE)
    low, high = unresolved.ci95
    assert unresolved.verdict == "not resolved" and low < 0 < high
    assert f"excludes a gain above {high:+.3f} and a loss beyond {low:+.3f}" in unresolved.text


def test_a_failed_check_makes_the_result_not_interpretable_at_once() -> None:
    interim = _primary(_spread(3, 0.03, 0.01))
    collapsed = decide(interim, _summary(low=0.019), NOISE)  # before any stop
    assert collapsed.verdict == "not interpretable"
    organ = collapsed.checks[2]
    assert organ.passed is False and organ.detail.startswith("16 of 17 runs: random k=1 seed 0")
    assert decide(interim, _summary(low=0.02), NOISE).checks[2].passed is True  # the floor
    stop = _primary(_spread(8, 0.03, 0.012))
    weak = decide(stop, _summary(random_k2=0.499), NOISE)
    assert weak.verdict == "not interpretable" and "random at k = 2 >= 0.5" in weak.text
    assert decide(stop, _summary(random_k2=0.5), NOISE).verdict == "helps"
    # k = 1 is reported beside k = 2, outside the verdict.
    k1 = decide(stop, _summary(random_k1=0.3), NOISE)
    assert k1.verdict == "helps" and k1.checks[1].passed is False and not k1.checks[1].declared
    # Noise-floor repeats count for the organ check.
    repeat = {"repeat|1": {"runs": [{"seed": 1, "mean_dice": 0.6,
                                     "per_organ": {"liver": 0.0, "spleen": 0.7}}]}}  # fmt: skip
    with_repeat = decide(stop, _summary(), NOISE, repeats=repeat)
    assert with_repeat.verdict == "not interpretable"
    assert "repeat k=1 seed 1: liver 0.000" in with_repeat.checks[2].detail


def test_the_noise_floor_is_judged_from_three_seeds_on() -> None:
    stop = _primary(_spread(8, 0.03, 0.012))
    assert decide(stop, _summary(), {"mean": 0.03, "sd": 0.001, "n_seeds": 3}).verdict == "helps"
    off = decide(stop, _summary(), {"mean": 0.031, "sd": 0.001, "n_seeds": 3})
    assert off.verdict == "not interpretable"
    noisy = decide(stop, _summary(), {"mean": 0.0, "sd": 0.5, "n_seeds": 3})
    assert noisy.checks[3].passed is False  # its spread above the primary's seed sd
    one_seed = decide(stop, _summary(), {"mean": 0.1, "sd": float("nan"), "n_seeds": 1})
    assert one_seed.checks[3].passed is None  # not judged yet: no verdict either
    assert one_seed.verdict == "no result yet" and "not judged" in one_seed.text
    assert decide(stop, {}, None).verdict == "no result yet"  # nothing judged at the stop


def test_bad_thresholds_are_refused_and_the_table_shows_the_decision() -> None:
    with pytest.raises(ValueError, match="min_seeds"):
        decide(None, {}, min_seeds=30)
    with pytest.raises(ValueError, match="must be > 0"):
        decide(None, {}, organ_floor=0)
    decision = decide(_primary(_spread(8, 0.005, 0.014)), _summary(), NOISE)
    head = {"command": "bench", "versions": {}, "hardware": "cpu"}
    text = markdown({"finetune": {}}, head, "T", ["moco", "moco_lrc"], ["liver"],
                    decision=decision)  # fmt: skip
    assert "## Declared decision (moco_lrc - moco, fine-tuned)" in text
    assert "**Not resolved (+0.005, s.e. 0.014" in text
    assert "- random at k = 2 >= 0.5 mean test Dice: passes (0.700 over 8 seeds)" in text
    assert "reported, outside the verdict" in text
    assert decision.as_dict()["checks"][0]["passed"] is True


def test_the_benchmark_report_opens_with_the_decision_from_its_run_files(tmp_path) -> None:
    """--report-only over finished run files (written here with the benchmark's own names):
    the JSON and the table carry the declared decision, noise-floor repeats included."""
    import json

    from lrc_lightning.evaluation.label_efficiency import (
        NOISE_SEED_OFFSET,
        Benchmark,
        Variant,
        _readout_record,
        build_parser,
        main,
    )
    from lrc_lightning.objective.term import LRCConfig
    from tests.conftest import DEMO_MR

    argv = ["--data", str(DEMO_MR), "--out", str(tmp_path), "--work-dir", str(tmp_path / "w"),
            "--cache-dir", str(tmp_path / "c"), "--test-cases", "1", "--val-cases", "1",
            "--ks", "1", "--seeds", "0", "1", "2", "--arms", "random", "moco", "moco_lrc",
            "--noise-floor", "--pretrain-steps", "10"]  # fmt: skip
    bench = Benchmark(build_parser().parse_args(argv))
    base = LRCConfig(weight=0.3, schedule="linear", warmup_steps=2)  # main's recipe
    runs = bench.runs
    runs.mkdir(parents=True)
    organs = bench.organs

    def write(arm: str, seed: int, dice: float, offset: int = 0, low: float = 0.5) -> None:
        variant = Variant(arm, base)
        record = _readout_record({"case": [dice, low, dice, dice]}, organs)
        repeat = f"_r{offset}" if offset else ""
        name = f"test_{variant.label}_k1_s{seed}{repeat}"
        (runs / f"{name}-{bench.key}{variant.key}.json").write_text(json.dumps({
            "run": name, "arm": variant.label, "k": 1, "seed": seed, "stage": "test",
            "readout_offset": offset, "labelled": ["x"], "classes": organs, **record,
            "probe": record, "probe_levels": {"-1": record}}))  # fmt: skip

    for seed in range(3):
        for arm, dice in (("random", 0.7), ("moco", 0.70), ("moco_lrc", 0.71 + seed / 100)):
            write(arm, seed, dice)
        write("moco", seed, 0.70, NOISE_SEED_OFFSET, low=0.01 if seed == 2 else 0.5)
    # A table of other runs (another key) lies there: its command must not be carried over.
    (tmp_path / "label_efficiency.json").write_text(json.dumps({"command": "OLD", "key": "x"}))
    assert main([*argv, "--report-only"]) == 0
    table = json.loads((tmp_path / "label_efficiency.json").read_text())
    assert table["command"] != "OLD" and table["key"] == bench.key
    decision = table["decision"]
    assert decision["verdict"] == "not interpretable" and decision["seeds"] == [0, 1, 2]
    organ_check = decision["checks"][2]
    assert organ_check["passed"] is False and "seed 2: right_kidney 0.010" in organ_check["detail"]
    text = (tmp_path / "label_efficiency.md").read_text()
    assert text.index("## Declared decision") < text.index("## Readout: finetune")
    # Beside every paired table, not only at the top: without a verdict no row is evidence.
    caution = "**Not interpretable** (3 seed(s) so far): no paired row below is evidence"
    assert text.count(caution) == text.count("Paired differences of mean Dice") >= 2
    # A seed enters the rule only when every cell planned for it is finished: without seed
    # 2's noise-floor repeat, its primary arms alone do not make it count.
    next(runs.glob(f"test_moco_k1_s2_r{NOISE_SEED_OFFSET}-*.json")).unlink()
    assert main([*argv, "--report-only"]) == 0
    decision = json.loads((tmp_path / "label_efficiency.json").read_text())["decision"]
    assert decision["seeds"] == [0, 1] and decision["verdict"] == "no result yet"
    assert decision["checks"][2]["passed"] is True  # the low organ was in the missing run
