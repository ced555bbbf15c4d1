"""The benchmark scripts run end to end at toy sizes (their figures come from full runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import DEMO_MR

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 600) -> str:
    """stdout of a benchmark script that must succeed."""
    return run_process(*args, timeout=timeout).stdout


def run_process(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_label_efficiency_outputs_and_resumes(tmp_path: Path) -> None:
    args = ["benchmarks/label_efficiency.py", "--data", str(DEMO_MR), "--out", str(tmp_path),
            "--work-dir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"),
            "--size", "32", "--width", "4", "--depth", "2", "--batch-size", "4",
            "--pretrain-steps", "2", "--finetune-steps", "2", "--val-every", "1",
            "--seeds", "0", "--ks", "1",
            "--arms", "random", "moco_lrc", "--test-cases", "1", "--val-cases", "1"]  # fmt: skip
    run(*args)
    result = json.loads((tmp_path / "label_efficiency.json").read_text())
    assert {"command", "versions", "hardware", "summary"} <= set(result)
    for arm in ("random", "moco_lrc"):
        entry = result["summary"][f"{arm}|1"]
        assert 0.0 <= entry["mean"] <= 1.0 and entry["n_seeds"] == 1
        assert set(entry["per_organ"]) == {"liver", "right_kidney", "left_kidney", "spleen"}
    text = (tmp_path / "label_efficiency.md").read_text()
    assert "| moco_lrc |" in text
    expected = result["summary"]["moco_lrc|1"]["mean"] - result["summary"]["random|1"]["mean"]
    assert f"| moco_lrc - random | 1 | {expected:+.3f} | - (n=1) |" in text
    table = str(tmp_path / "label_efficiency.json")
    compared = run("benchmarks/compare_runs.py", table, "moco_lrc", table, "random")
    won = int(expected > 0)
    assert f"| {expected:+.3f} | - (n=1) | - | - | {won}/1 | k=1: {expected:+.3f} |" in compared
    assert (tmp_path / "label_efficiency.png").stat().st_size > 1000
    runs = sorted((tmp_path / "label_efficiency_runs").glob("*.json"))
    assert len(runs) == 2
    stamps = [p.stat().st_mtime_ns for p in runs]

    out = run(*args)  # resumed: nothing is recomputed
    assert "pre-trained" not in out
    assert [p.stat().st_mtime_ns for p in runs] == stamps
    run(*args[:-1], "1", "--finetune-steps", "4")  # other options: new runs, none reused
    assert len(list((tmp_path / "label_efficiency_runs").glob("*.json"))) == 4

    # Another LRC recipe (lambda): the LRC arm runs again, random init is reused.
    run(*args, "--lrc-weight", "0.5")
    names = sorted(p.name for p in (tmp_path / "label_efficiency_runs").glob("*.json"))
    assert len(names) == 5
    # (each arm also has the run with --finetune-steps 4 from above)
    assert sum(n.startswith("test_moco_lrc_k1_s0-") for n in names) == 3
    assert sum(n.startswith("test_random_k1_s0-") for n in names) == 2

    # Report only: tables from the finished runs; a missing seed is named, not run.
    seeds = args.index("--seeds") + 1
    report = [*args[:seeds], "0", "1", *args[seeds + 1 :], "--report-only", "--tag", "_partial"]
    done = run_process(*report, timeout=300)
    assert "[missing] test_random_k1_s1" in done.stderr
    assert len(list((tmp_path / "label_efficiency_runs").glob("*.json"))) == 5
    partial = json.loads((tmp_path / "label_efficiency_partial.json").read_text())
    assert partial["summary"]["moco_lrc|1"]["n_seeds"] == 1

    # Diagnostics of the finished pre-trainings: the probe on every level, regions per level.
    run("benchmarks/lrc_diagnostics.py", *args[1:], "--region-batches", "2")
    result = json.loads((tmp_path / "lrc_diagnostics.json").read_text())
    assert set(result["probe_per_level"]) == {"random", "moco_lrc"}
    assert set(result["probe_per_level"]["moco_lrc"]) == {"bottleneck", "-2", "-1"}
    regions = result["regions"]  # a smaller map cannot hold more regions
    assert regions["-2 (16x16)"]["mean_present_in_both"] <= regions["-1 (32x32)"][
        "mean_present_in_both"
    ]
    work = args.index("--work-dir") + 1
    no_weights = [*args[:work], str(tmp_path / "empty"), *args[work + 1 :]]
    missing = subprocess.run(
        [sys.executable, "benchmarks/lrc_diagnostics.py", *no_weights[1:], "--arms", "moco_lrc"],
        cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=300,
    )  # fmt: skip
    assert missing.returncode != 0 and "run benchmarks/label_efficiency.py first" in missing.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_step_overhead_on_cuda_without_a_gpu_is_a_clear_error() -> None:
    done = subprocess.run([sys.executable, "benchmarks/step_overhead.py", "--device", "cuda"],
                          cwd=ROOT, capture_output=True, encoding="utf-8", timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "--device cuda: no CUDA device is available" in done.stderr


def test_data_pipeline_prints_headline_json(tmp_path: Path) -> None:
    out = run("benchmarks/data_pipeline.py", "--data", str(tmp_path), "--cases", "2", "--size",
              "32", "--sets", "chaos_t2", "--processes", "1", "2", "--batch-size", "2",
              "--json-out", str(tmp_path / "h.json"))  # fmt: skip
    headline = json.loads(out.strip().splitlines()[-1])
    assert headline == json.loads((tmp_path / "h.json").read_text())
    assert headline["chaos_t2_slices_per_s_1proc"] > 0
    assert headline["chaos_t2_scaling_2proc"] == pytest.approx(
        headline["chaos_t2_slices_per_s_2proc"] / headline["chaos_t2_slices_per_s_1proc"],
        abs=0.02,
    )
    assert headline["loader_batches_per_s_1worker"] > 0 and headline["cached_slice_load_us"] > 0


def test_step_overhead_prints_headline_json() -> None:
    out = run("benchmarks/step_overhead.py", "--sizes", "32", "--batches", "2", "--repeats",
              "2", "--warmup", "1", "--width", "4", "--depth", "2", "--no-memory")  # fmt: skip
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["headline"] == "cpu_32_b2"
    assert summary["step_time_ratio"] > 0 and summary["step_time_ratio_vs_encoder_only"] > 0


def test_readout_throughput_ratios_and_seconds_per_seed() -> None:
    """Side by side on real demo batches: the ratios are those of the printed medians, and
    seconds per seed follows the docstring's formula from the JSON's own figures."""
    import re

    out = run("benchmarks/readout_throughput.py", "--size", "32", "--steps", "2", "--warmup",
              "0", "--no-compile", "--threads", "1", "--width", "4", "--depth", "2",
              timeout=300)  # fmt: skip
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary) == {
        "median_s", "ratio", "compile_s", "compile_notes", "load_s", "seconds_per_seed",
        "seconds_per_later_seed", "evaluation_share", "seeds_per_cpu_hour", "best",
        "volume_slices", "load_average_before", "load_average_after", "settings",
    }  # fmt: skip
    assert summary["volume_slices"] == 36  # chaos_t2_005, the demo's validation volume
    assert summary["compile_s"] == {"1": {}}  # --no-compile
    labels = {"finetune": "finetune step", "validation": "validation (36 sl.)",
              "pretrain": "pretrain step"}  # fmt: skip
    # One thread count: two threads on a shared 2-core machine take 10-20 times longer.
    for threads in ("1",):
        median, ratio = summary["median_s"][threads], summary["ratio"][threads]
        assert set(median) == set(ratio) == set(labels)
        for phase, label in labels.items():
            assert set(median[phase]) == {"default", "channels_last"}
            row = re.search(
                rf"threads {threads} \| {re.escape(label)} +\| default +([\d.]+) ms "
                rf"\(1\.000x\) \| channels_last +([\d.]+) ms \(([\d.]+)x\)",
                out,
            )
            assert row, f"no table row for threads {threads}, {phase}:\n{out}"
            default_ms, channels_last_ms, printed = map(float, row.groups())
            assert ratio[phase]["default"] == 1.0
            assert ratio[phase]["channels_last"] == pytest.approx(
                median[phase]["channels_last"] / median[phase]["default"], rel=1e-3
            )
            assert ratio[phase]["channels_last"] == pytest.approx(
                channels_last_ms / default_ms, rel=0.01
            )
            assert printed == pytest.approx(ratio[phase]["channels_last"], abs=6e-4)
            assert median[phase]["default"] * 1e3 == pytest.approx(default_ms, abs=0.06)
        # seconds per seed: 15 runs of 1200 steps, 12 validations of 107 slices and 206 test
        # slices each, 3 pre-trainings of 400 steps (loading included; no compile).
        load = summary["load_s"][threads]
        for variant in ("default", "channels_last"):
            per_slice = (median["validation"][variant] + load["validation"]) / 36
            run_s = (1200 * (median["finetune"][variant] + load["finetune"])
                     + (12 * 107 + 206) * per_slice)  # fmt: skip
            pre = 3 * 400 * (median["pretrain"][variant] + load["pretrain"])
            seed = summary["seconds_per_seed"][threads][variant]
            assert seed == pytest.approx(15 * run_s + pre, rel=1e-3)
            assert summary["seconds_per_later_seed"][threads][variant] == pytest.approx(
                12 * run_s + pre, rel=1e-3
            )
            assert summary["evaluation_share"][threads][variant] == pytest.approx(
                (12 * 107 + 206) * per_slice / run_s, rel=1e-2
            )
            assert summary["seeds_per_cpu_hour"][threads][variant] == pytest.approx(
                3600 / (seed * int(threads)), rel=1e-3
            )
    per_hour = {f"threads {t} {v}": x for t, row in summary["seeds_per_cpu_hour"].items()
                for v, x in row.items()}  # fmt: skip
    assert summary["best"] == max(per_hour, key=per_hour.__getitem__)
    assert f"most seeds per CPU hour: {summary['best']}" in out


def test_readout_throughput_compile_threads_outside_threads_is_an_error() -> None:
    done = subprocess.run([sys.executable, "benchmarks/readout_throughput.py", "--threads", "1",
                           "--compile-threads", "2"], cwd=ROOT, capture_output=True,
                          encoding="utf-8", timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "--compile-threads [2] are not among --threads [1]" in done.stderr



def test_benchmark_progress_grid_arm_and_sigterm_keeps_finished_runs(tmp_path: Path) -> None:
    """Progress lines, the moco_lrc_grid arm, and SIGTERM: the benchmark stops within
    seconds with 128 + 15, every finished run intact, no half-written file."""
    import signal
    import time

    args = ["benchmarks/label_efficiency.py", "--data", str(DEMO_MR), "--out", str(tmp_path),
            "--work-dir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"),
            "--size", "32", "--width", "4", "--depth", "2", "--batch-size", "4",
            "--pretrain-steps", "2", "--finetune-steps", "2", "--val-every", "1",
            "--probe-pixels", "64", "--probe-levels", "bottleneck", "-1", "--grid-cell", "8",
            "--ks", "1", "--arms", "moco_lrc", "moco_lrc_grid", "--test-cases", "1",
            "--val-cases", "1", "--seeds"]  # fmt: skip
    out = run(*args, "0")
    assert "0 of 2 runs already done; 2 to run" in out
    assert "[1/2] test_moco_lrc_k1_s0" in out and "[2/2] test_moco_lrc_grid_k1_s0" in out
    assert "min left for the rest" in out  # an estimate once a run has finished
    result = json.loads((tmp_path / "label_efficiency.json").read_text())
    assert set(result["probe_levels_summary"]) == {"bottleneck"}
    assert "moco_lrc - moco_lrc_grid" in result["comparisons"]["finetune"]
    grid = json.loads(next((tmp_path / "label_efficiency_runs").glob("*grid*")).read_text())
    assert grid["variant"]["regions"] == "grid" and grid["variant"]["grid_cell"] == 8
    runs = sorted((tmp_path / "label_efficiency_runs").glob("*.json"))
    before = {p.name: p.read_bytes() for p in runs}

    # The same command through `python -m lrc_lightning.cli benchmark`: its exit status
    # must reach the shell (a SLURM or CI script must see the stop).
    process = subprocess.Popen(
        [sys.executable, "-m", "lrc_lightning.cli", "benchmark", *args[1:], "0", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8",
        errors="replace",
    )  # fmt: skip
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "pre-training moco_lrc seed 1" in line:
            break
    assert "2 of 4 runs already done; 2 to run\n" in lines
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert time.monotonic() - start < 20
    assert process.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in err and "run the same command again to resume" in err
    after = {p.name: p.read_bytes() for p in (tmp_path / "label_efficiency_runs").iterdir()}
    assert after == before  # finished runs kept as they were, nothing half-written
    assert not list((tmp_path / "work").glob("*s1*"))  # no weights of the stopped run


def test_organ_intensities_flags_a_patient_whose_bright_spot_darkens_its_organs(
    tmp_path: Path,
) -> None:
    import shutil

    import numpy as np
    import SimpleITK as sitk

    data = tmp_path / "data"
    shutil.copytree(DEMO_MR, data)
    # chaos_t2_005 gets a bright non-organ structure (1% of the voxels at 4x the maximum):
    # the upper percentile rises and its organs come out dark after normalisation.
    path = data / "imagesTr" / "chaos_t2_005.nii.gz"
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labelsTr" / path.name)))
    outside = np.flatnonzero(labels == 0)[:: max(1, (labels == 0).sum() // (array.size // 100))]
    array.flat[outside] = 4 * array.max()
    bright = sitk.GetImageFromArray(array)
    bright.CopyInformation(image)
    sitk.WriteImage(bright, str(path))
    out = run("benchmarks/organ_intensities.py", "--data", str(data), "--exclude",
              "chaos_t2_001", "--out", str(tmp_path / "o.json"))  # fmt: skip
    flagged = [line.split()[0] for line in out.splitlines() if "outlier" in line]
    assert flagged == ["chaos_t2_005"]
    cases = json.loads((tmp_path / "o.json").read_text())["cases"]
    assert sorted(cases) == ["chaos_t2_002", "chaos_t2_003", "chaos_t2_005"]  # 001 excluded
    assert cases["chaos_t2_005"]["brightest_in_organs"] == 0.0
    assert cases["chaos_t2_002"]["brightest_in_organs"] > 0.0
    few = subprocess.run([sys.executable, "benchmarks/organ_intensities.py", "--data", str(data),
                          "--exclude", "chaos_t2_001", "chaos_t2_002"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert few.returncode == 2 and "2 case(s) after --exclude" in few.stderr
    assert cases["chaos_t2_005"]["right_kidney"]["median"] < 0.5 * min(
        cases[c]["right_kidney"]["median"] for c in ("chaos_t2_002", "chaos_t2_003")
    )


def test_pilot_power_matches_the_exact_range_of_two_normals() -> None:
    """Two groups: the range |X1 - X2| of two means with sd s is half-normal with scale
    s * sqrt(2), so P(range <= w) = erf(w / (2 s)); more fine-tunings per mean pass more."""
    import math

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from pilot_power import pass_probability
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    p, mean_range = pass_probability(0.05, 1, 2, 0.07, reps=400_000, seed=1)
    assert p == pytest.approx(math.erf(0.07 / (2 * 0.05)), abs=0.004)
    assert mean_range == pytest.approx(2 * 0.05 / math.sqrt(math.pi), rel=0.01)
    three, _ = pass_probability(0.05, 3, 2, 0.07, reps=400_000, seed=1)
    assert three == pytest.approx(math.erf(0.07 / (2 * 0.05 / math.sqrt(3))), abs=0.004)
    lines = run("benchmarks/pilot_power.py", "--sd", "0.053", "--reps", "1000").splitlines()
    assert json.loads(lines[0])["sd_of_a_value"] == pytest.approx(0.053 / math.sqrt(3), abs=1e-4)
    with pytest.raises(ValueError, match="need n >= 1, groups >= 2"):
        pass_probability(0.05, 3, 1, 0.07)


def test_seeds_needed_matches_simulated_seed_differences() -> None:
    """The readout-noise sd of a seed's mean-over-k difference, against a simulation of it
    (k = 1 a mean of 3 fine-tunings per arm, k = 2 and 4 single), and the seeds it implies."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from seeds_needed import seed_sd, seeds_needed
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rng = np.random.default_rng(0)
    noise = lambda n: rng.normal(0, 0.077, (200_000, n)).mean(axis=1)  # noqa: E731
    diffs = ((noise(3) - noise(3)) + (noise(1) - noise(1)) + (noise(1) - noise(1))) / 3
    assert seed_sd(0.077, [3, 1, 1]) == pytest.approx(diffs.std(), rel=0.01)
    assert seeds_needed(0.077, [3, 1, 1], 0.015) == 14  # 0.0554**2 / 0.015**2 = 13.6
    assert seeds_needed(0.0, [1, 1, 1], 0.015) == 2
    out = json.loads(run("benchmarks/seeds_needed.py", "--sd", "0.077", "--df", "13",
                         "--repeats", "3", "1", "1"))  # fmt: skip
    assert out["seed_sd"] == 0.0554 and out["seeds_needed"] == 14
    assert out["sd_ci95"] == [0.056, 0.124] and out["seeds_needed_ci95"] == [8, 36]
    bad = subprocess.run([sys.executable, "benchmarks/seeds_needed.py", "--sd", "0.077",
                          "--repeats", "3"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--repeats: 1 values for 3 --ks" in bad.stderr
