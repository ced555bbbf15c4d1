"""`--finetune-repeats`: a cell that is the mean of several fine-tunings of the same weights
(Evidence II, amendment 6), its organ check, and the pilot's group means."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lrc_lightning.evaluation.decision import decide
from lrc_lightning.evaluation.label_efficiency import (
    FINETUNE_REPEAT_STRIDE,
    NOISE_SEED_OFFSET,
    _readout_record,
    build_parser,
    cell_offsets,
    combine_finetunings,
    is_noise_floor,
    lowest_organ,
    pilot_markdown,
    summarise,
)
from lrc_lightning.tools.cli import main as cli
from tests.test_evaluation import tiny, two_organ_dataset

NAN = float("nan")
ORGANS = ["liver", "spleen"]


def _run(offset: int, per_volume: dict[str, list[float]], probe: dict[str, list[float]],
         seed: int = 0, best: float = 0.5) -> dict:
    return {"run": f"test_moco_k1_s{seed}_r{offset}", "arm": "moco", "k": 1, "seed": seed,
            "stage": "test", "readout_offset": offset, "labelled": ["p1"],
            **_readout_record(per_volume, ORGANS),
            "probe_levels": {"-1": _readout_record(probe, ORGANS)},
            "finetune_validation": {"best_val_dice": best}, "seconds": 10.0}  # fmt: skip


def test_a_cell_is_the_mean_of_its_finetunings_scores() -> None:
    # Volume "a" has no spleen: the first fine-tuning predicts none (NaN), the second a false
    # positive (0). Each run's own score counts once: the 0 is not given both runs' weight.
    first = _run(0, {"a": [0.2, NAN], "b": [0.4, 0.6]}, {"a": [0.1, NAN], "b": [0.1, 0.1]},
                 best=0.45)  # liver 0.3, spleen 0.6, mean 0.45  # fmt: skip
    second = _run(FINETUNE_REPEAT_STRIDE, {"a": [0.4, 0.0], "b": [0.0, 0.8]},
                  {"a": [0.3, NAN], "b": [0.3, 0.3]}, best=0.55)  # 0.2, 0.4, mean 0.3  # fmt: skip
    cell = combine_finetunings([first, second], ORGANS)
    assert cell["per_organ"] == pytest.approx({"liver": 0.25, "spleen": 0.5})
    assert cell["mean_dice"] == pytest.approx(0.375)  # per-volume averaging would give 0.3
    assert cell["per_volume_mean"] == pytest.approx({"a": 0.2, "b": 0.45})
    assert cell["probe"]["mean_dice"] == pytest.approx(0.2)  # the probe's own runs, averaged
    assert cell["probe_levels"]["-1"]["per_organ"] == pytest.approx({"liver": 0.2, "spleen": 0.2})
    assert (cell["seed"], cell["readout_offset"], cell["seconds"]) == (0, 0, 20.0)
    assert [f["run"] for f in cell["finetunings"]] == [first["run"], second["run"]]
    assert [f["best_val_dice"] for f in cell["finetunings"]] == [0.45, 0.55]
    assert "finetune_validation" not in cell  # one checkpoint per fine-tuning, not per cell
    # The cell's lowest organ is that of its worst fine-tuning (0.2), not of the mean (0.25).
    assert summarise([cell], ORGANS)["moco|1"]["lowest_organ"] == pytest.approx(0.2)
    assert summarise([cell], ORGANS, "probe")["moco|1"]["lowest_organ"] == pytest.approx(0.2)
    assert combine_finetunings([first], ORGANS) is first
    other_seed = _run(0, {"a": [0.2, NAN], "b": [0.4, 0.6]}, {"a": [0.1, NAN], "b": [0.1, 0.1]},
                      seed=1)  # fmt: skip
    with pytest.raises(ValueError, match="are not one cell"):
        combine_finetunings([first, other_seed], ORGANS)
    other_volumes = _run(1, {"a": [0.2, NAN], "c": [0.4, 0.6]}, {"a": [0.1, NAN], "c": [0.1, 0.1]})
    with pytest.raises(ValueError, match="scored different volumes"):
        combine_finetunings([first, other_volumes], ORGANS)
    with pytest.raises(ValueError, match="without 'probe_levels'"):
        combine_finetunings([first, {**second, "probe_levels": {}}], ORGANS)


def test_cell_offsets_keep_the_noise_floor_apart() -> None:
    args = build_parser().parse_args(["--data", "x", "--finetune-repeats", "3",
                                      "--finetune-repeat-ks", "1"])  # fmt: skip
    assert cell_offsets(args, 1) == [0, 10000, 20000]
    assert cell_offsets(args, 1, NOISE_SEED_OFFSET) == [1000, 11000, 21000]
    assert cell_offsets(args, 2) == [0] and cell_offsets(args, 4, NOISE_SEED_OFFSET) == [1000]
    assert [is_noise_floor(o) for o in (0, 1000, 10000, 11000, 21000)] == [
        False, True, False, True, True]  # fmt: skip
    every_k = build_parser().parse_args(["--data", "x", "--finetune-repeats", "2"])
    assert cell_offsets(every_k, 4) == [0, 10000]


def test_the_organ_check_judges_each_finetuning_of_a_cell() -> None:
    """A mean can hide a fine-tuning that missed an organ: the check sees each."""
    hidden = {"liver": 0.6, "spleen": 0.3}  # the cell's mean: above the floor
    finetunings = [{"run": "test_moco_k1_s0", "per_organ": {"liver": 0.6, "spleen": 0.59}},
                   {"run": "test_moco_k1_s0_r10000", "per_organ": {"liver": 0.6, "spleen": 0.01}}]
    summary = {"moco|1": {"runs": [{"seed": 0, "mean_dice": 0.45, "per_organ": hidden,
                                    "finetunings": finetunings}]}}  # fmt: skip
    check = decide(None, summary).checks[2]
    assert check.passed is False
    assert check.detail == "1 of 2 runs: moco k=1 seed 0 (test_moco_k1_s0_r10000): spleen 0.010"
    finetunings[1]["per_organ"]["spleen"] = 0.02
    assert decide(None, summary).checks[2].passed is True
    # A fine-tuning whose cell is not complete (so not in the summary) counts at once.
    waiting = [("moco k=1 seed 1 (test_moco_k1_s1_r10000)", {"liver": 0.6, "spleen": 0.0})]
    early = decide(None, summary, organ_runs=waiting).checks[2]
    assert early.passed is False and early.detail.startswith("1 of 1 runs: moco k=1 seed 1 (")


def test_lowest_organ_skips_organs_never_scored_in_any_order() -> None:
    nan = float("nan")
    # Python's min over these gives nan for the first order: the 0.01 would be hidden.
    assert lowest_organ({"liver": nan, "spleen": 0.01, "kidney": 0.5}) == 0.01
    assert lowest_organ({"spleen": 0.5, "liver": nan, "kidney": 0.01}) == 0.01
    assert lowest_organ([nan, nan]) != lowest_organ([nan, nan])  # none scored: NaN
    runs = [{"arm": "moco", "k": 1, "seed": s, "labelled": ["p"], "mean_dice": v,
             "per_organ": {"liver": nan, "spleen": v}} for s, v in ((0, 0.5), (1, 0.01))]
    assert summarise(runs, ["liver", "spleen"], "finetune")["moco|1"]["lowest_organ"] == 0.01


def test_pilot_table_groups_finetunings_in_the_order_given() -> None:
    values = {0: 0.50, 1000: 0.40, 2000: 0.60, 3000: 0.45, 4000: 0.55, 5000: 0.50,
              6000: 0.30, 7000: 0.30}  # 8000 is not finished  # fmt: skip
    runs = [{"run": f"r{o}", "arm": "moco", "k": 1, "seed": 1, "readout_offset": o,
             "labelled": ["p"], "per_organ": {"liver": v}, "mean_dice": v,
             "finetune_validation": {"best_val_dice": v}} for o, v in values.items()]  # fmt: skip
    groups = [[0, 1000, 2000], [3000, 4000, 5000], [6000, 7000, 8000]]
    text = pilot_markdown(runs, {"command": "c"}, ["liver"], groups=groups)
    assert "| offsets 0 1000 2000 | offsets 3000 4000 5000 | offsets 6000 7000 8000 |" in text
    # Means 0.500 and 0.500; the third group waits for its last run.
    assert "| moco | 1 | 1 | 0.500 | 0.500 | - | 2 of 3 | 0.500 | 0.000 |" in text
    runs.append({**runs[-1], "run": "r8000", "readout_offset": 8000,
                 "finetune_validation": {"best_val_dice": 0.33}})
    text = pilot_markdown(runs, {"command": "c"}, ["liver"], groups=groups)
    assert "| moco | 1 | 1 | 0.500 | 0.500 | 0.310 | 3 of 3 | 0.437 | 0.190 |" in text
    assert "Means of" not in pilot_markdown(runs, {"command": "c"}, ["liver"])


def test_benchmark_averages_the_repeated_cells_and_resumes_them(tmp_path: Path, capsys) -> None:
    data = two_organ_dataset(tmp_path / "Task_two")
    out = tmp_path / "out"
    argv = tiny(data, out, "--ks", "1", "2", "--test-cases", "2", "--finetune-repeats", "2",
                "--finetune-repeat-ks", "1", "--noise-floor", "--noise-arm", "moco_lrc",
                "--patience", "0", "--checkpoint-min-organ", "0.02", "--probe-levels", "-1")
    assert cli(argv) == 0
    runs = out / "label_efficiency_runs"
    names = sorted(p.name.split("-")[0] for p in runs.glob("test_*.json"))
    assert names == sorted([
        "test_random_k1_s0", "test_random_k1_s0_r10000", "test_random_k2_s0",
        "test_moco_lrc_k1_s0", "test_moco_lrc_k1_s0_r10000", "test_moco_lrc_k2_s0",
        "test_moco_lrc_k1_s0_r1000", "test_moco_lrc_k1_s0_r11000", "test_moco_lrc_k2_s0_r1000",
    ])  # fmt: skip
    result = json.loads((out / "label_efficiency.json").read_text())
    files = {p.name.split("-")[0]: json.loads(p.read_text()) for p in runs.glob("test_*.json")}
    cell = result["summary"]["random|1"]["runs"][0]
    expected = combine_finetunings([files["test_random_k1_s0"],
                                    files["test_random_k1_s0_r10000"]], ["hepar", "ren"])
    assert cell["mean_dice"] == pytest.approx(expected["mean_dice"])
    assert [f["run"] for f in cell["finetunings"]] == ["test_random_k1_s0",
                                                       "test_random_k1_s0_r10000"]
    assert "finetunings" not in result["summary"]["random|2"]["runs"][0]  # k = 2: one run
    assert result["summary"]["random|2"]["runs"][0]["mean_dice"] == pytest.approx(
        files["test_random_k2_s0"]["mean_dice"])
    # The noise floor: repeat cells (r1000 + r11000 at k = 1, r1000 at k = 2) minus the cells.
    dice = {name: run["mean_dice"] for name, run in files.items()}
    k1 = ((dice["test_moco_lrc_k1_s0_r1000"] + dice["test_moco_lrc_k1_s0_r11000"])
          - (dice["test_moco_lrc_k1_s0"] + dice["test_moco_lrc_k1_s0_r10000"])) / 2
    k2 = dice["test_moco_lrc_k2_s0_r1000"] - dice["test_moco_lrc_k2_s0"]
    noise = result["noise_floor"]["finetune"]
    assert noise["n_seeds"] == 1 and noise["per_seed"]["0"] == pytest.approx((k1 + k2) / 2)
    text = (out / "label_efficiency.md").read_text()
    # The checkpoint rule counts each fine-tuning; the repeats of a cell are not noise floor.
    assert "| moco_lrc | 3 |" in text and "| moco_lrc (noise-floor repeat) | 3 |" in text
    assert "| random | 3 |" in text
    assert "## Cells that are the mean of several fine-tunings" in text
    assert f"| random | 1 | 0 | {cell['mean_dice']:.3f} | {dice['test_random_k1_s0']:.3f} (" in text
    # Rebuilt without the option, the table has single-run cells and says so in its header:
    # the first run's command (with --finetune-repeats 2) is not carried over.
    assert cli([*argv[:argv.index("--finetune-repeats")],
                *argv[argv.index("--finetune-repeat-ks") + 2:], "--report-only"]) == 0
    single = json.loads((out / "label_efficiency.json").read_text())
    assert "--finetune-repeats" not in single["command"]
    assert single["settings"]["finetune_repeats"] == 1
    assert single["summary"]["random|1"]["runs"][0]["mean_dice"] == pytest.approx(
        dice["test_random_k1_s0"])
    # Rebuilt again with the same options but fewer ks: the header of the table with k = 2
    # (same key, same way of forming cells) is not carried over either.
    assert cli([*argv, "--report-only"]) == 0
    assert "--finetune-repeats" in json.loads((out / "label_efficiency.json").read_text())[
        "command"]
    ks = len(argv) - 1 - argv[::-1].index("--ks")  # the last --ks: 1 2
    assert cli([*argv[:ks], "--ks", "1", *argv[ks + 3:], "--report-only"]) == 0
    only_k1 = json.loads((out / "label_efficiency.json").read_text())
    assert only_k1["settings"]["ks"] == [1] and "--ks 1 --test-cases" in only_k1["command"]
    assert set(only_k1["summary"]) == {"random|1", "moco_lrc|1"}
    # A cell whose second fine-tuning is missing is not reported; the report names the run.
    next(runs.glob("test_random_k1_s0_r10000-*.json")).unlink()
    capsys.readouterr()
    assert cli([*argv, "--report-only"]) == 0
    assert "[missing] test_random_k1_s0_r10000" in capsys.readouterr().err
    summary = json.loads((out / "label_efficiency.json").read_text())["summary"]
    assert "random|1" not in summary and "random|2" in summary


def test_repeat_options_are_checked(tmp_path: Path, capsys) -> None:
    data = two_organ_dataset(tmp_path / "Task_two")
    with pytest.raises(SystemExit):
        cli(tiny(data, tmp_path / "out", "--finetune-repeats", "2", "--finetune-repeat-ks", "3"))
    assert "--finetune-repeat-ks 3: not among --ks 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(tiny(data, tmp_path / "out", "--finetune-repeats", "3", "--skip-main",
                 "--readout-pilot", "--pilot-readout-offsets", "0", "1000"))  # fmt: skip
    assert "2 offsets do not form groups of --finetune-repeats 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(tiny(data, tmp_path / "out", "--finetune-repeats", "0"))
    assert "--finetune-repeats must be at least 1, not 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(tiny(data, tmp_path / "out", "--finetune-repeat-ks", "1"))
    assert "--finetune-repeat-ks without --finetune-repeats N (N > 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(tiny(data, tmp_path / "out", "--finetune-repeats", "2", "--skip-main",
                 "--readout-pilot", "--pilot-readout-offsets", "0", "0"))  # fmt: skip
    assert "--pilot-readout-offsets: 0 given twice would count twice" in capsys.readouterr().err
    # A seed or k given twice would enter the seed-level statistics twice.
    with pytest.raises(SystemExit):
        cli(tiny(data, tmp_path / "out", "--seeds", "0", "1", "0"))
    assert "--seeds: 0 given twice would count twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(tiny(data, tmp_path / "out", "--ks", "1", "1", "2"))
    assert "--ks: 1 given twice would count twice" in capsys.readouterr().err
