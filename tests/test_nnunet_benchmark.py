"""benchmarks/nnunet_label_efficiency.py: nnU-Net's own fine-tuning from random init and
from LRC pre-training, end to end on a tiny CHAOS set (thirdparty), and its pieces (split
folds, labelled patients, Dice in the label space, errors) without nnU-Net."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from .conftest import DEMO_MR, require_thirdparty
from .helpers import write_tiny_chaos_volumes

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "nnunet_label_efficiency.py"
ORGANS = ["liver", "right_kidney", "left_kidney", "spleen"]


@pytest.fixture(scope="module")
def bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nnunet_label_efficiency", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tiny_msd_dataset(folder: Path) -> Path:
    """The four shipped CHAOS T2 patients, 12 central slices at 64 x 64 (5 mm), as an
    MSD-style dataset (dataset.json with labels and a training list), like CHAOS itself."""
    meta = json.loads((DEMO_MR / "dataset.json").read_text())
    cases = write_tiny_chaos_volumes(folder)
    meta["training"] = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                        for c in cases]  # fmt: skip
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


# ---------------------------------------------------------------------- pieces, no nnU-Net
def _bench(module: ModuleType, tmp_path: Path, *extra: str) -> object:
    args = module.parse_args(["--data", str(DEMO_MR), "--out", str(tmp_path / "out"),
                              "--work-dir", str(tmp_path / "work"), "--test-ids",
                              "chaos_t2_005", "--val-ids", "chaos_t2_003", "--ks", "1", "2",
                              *extra])  # fmt: skip
    return module.NnUNetBenchmark(args)


def test_split_folds_put_the_labelled_in_train_and_the_validation_patients_in_val(
    bench_module: ModuleType, tmp_path: Path
) -> None:
    bench = _bench(bench_module, tmp_path)
    assert bench.pool == ["chaos_t2_001", "chaos_t2_002"]  # never a test or val patient
    assert bench.pretraining_cases() == bench.pool  # nnU-Net's dataset also holds val
    assert "chaos_t2_003" in bench.training_cases()
    one = bench_module.labelled_patients(bench.labelled_pool, 0, 1)
    two = bench_module.labelled_patients(bench.labelled_pool, 0, 2)
    assert two[:1] == one and sorted(two) == bench.pool  # nested in k
    # The rule of label_efficiency's Benchmark.labelled (same seed: same patients).
    order = np.random.default_rng(1000 + 0).permutation(2)
    assert two == [bench.pool[i] for i in order]

    folder = tmp_path / "pre"
    folder.mkdir()
    assert bench.fold(folder, one) == 0
    assert bench.fold(folder, two) == 1
    assert bench.fold(folder, list(reversed(two))) == 1  # the same split: found, not added
    assert bench.fold(folder, one) == 0
    splits = json.loads((folder / "splits_final.json").read_text())
    assert splits == [{"train": one, "val": ["chaos_t2_003"]},
                      {"train": sorted(two), "val": ["chaos_t2_003"]}]  # fmt: skip


def test_bad_ids_and_ks_name_the_option(bench_module: ModuleType, tmp_path: Path) -> None:
    from lrc_lightning.data.cases import DataError

    with pytest.raises(DataError, match=r"chaos-t2-demo: --test-ids names unknown cases "
                                        r"\['chaos_t2_999'\]"):  # fmt: skip
        _bench(bench_module, tmp_path, "--test-ids", "chaos_t2_999")
    with pytest.raises(DataError, match=r"--test-ids and --val-ids share \['chaos_t2_003'\]"):
        _bench(bench_module, tmp_path, "--test-ids", "chaos_t2_003")
    with pytest.raises(DataError, match=r"--ks \[1, 3\]: k must be 1\.\.2"):
        _bench(bench_module, tmp_path, "--ks", "1", "3")
    args = bench_module.build_parser().parse_args(["--data", str(tmp_path / "nowhere")])
    with pytest.raises(DataError, match=r"--data .*nowhere: no such file or folder"):
        bench_module.NnUNetBenchmark(args)
    args = bench_module.build_parser().parse_args(["--data", str(tmp_path)])
    with pytest.raises(DataError, match=r"no dataset.json with a 'labels' map.*no --classes"):
        bench_module.NnUNetBenchmark(args)


def test_missing_nnunet_or_cuda_is_a_clear_error_before_any_work(
    bench_module: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    import torch

    has_nnunet = importlib.util.find_spec("nnunetv2") is not None
    if has_nnunet and torch.cuda.is_available():
        pytest.skip("nnU-Net and CUDA are both here: nothing is missing")
    argv = ["--data", str(DEMO_MR), "--out", str(tmp_path / "out"), "--work-dir",
            str(tmp_path / "work"), "--test-ids", "chaos_t2_005", "--val-ids", "chaos_t2_003",
            "--ks", "1", "--seeds", "0", "--arms", "random", "--device", "cuda"]  # fmt: skip
    assert bench_module.main(argv) == 2
    expected = ("--device cuda: no CUDA device is available here; use --device cpu"
                if has_nnunet else "nnU-Net (nnunetv2) is not installed: pip install")
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # nothing was started


def test_run_key_follows_the_results_options_and_the_lrc_recipe(bench_module: ModuleType) -> None:
    from lrc_lightning import LRCConfig

    key = bench_module.run_key
    base = bench_module.parse_args(["--data", str(DEMO_MR)])
    assert key(base) == key(bench_module.parse_args(["--data", str(DEMO_MR / "dataset.json"),
                                                     "--lrc-weight", str(LRCConfig.weight)]))
    for other in (["--epochs", "3"], ["--lrc-weight", "1.0"], ["--tiny"], ["--ks", "9"]):
        changed = key(bench_module.parse_args(["--data", str(DEMO_MR), *other]))
        assert (changed != key(base)) == (other[0] != "--ks"), other  # k is in the run's name
    tiny = bench_module.parse_args(["--tiny", "--epochs", "3"])
    assert (tiny.epochs, tiny.iterations_per_epoch) == (3, 2)  # given options win over --tiny


def test_dice_is_scored_on_the_prediction_files_in_the_label_space(
    bench_module: ModuleType, tmp_path: Path
) -> None:
    import SimpleITK as sitk

    bench = _bench(bench_module, tmp_path)
    label = sitk.ReadImage(str(DEMO_MR / "labelsTr" / "chaos_t2_005.nii.gz"))
    truth = sitk.GetArrayFromImage(label)
    predicted = truth.copy()
    predicted[predicted == 1] = 0  # no liver
    spleen = np.argwhere(truth == 4)
    half = spleen[: len(spleen) // 2]
    predicted[tuple(half.T)] = 0  # half the spleen
    image = sitk.GetImageFromArray(predicted)
    image.CopyInformation(label)
    out = tmp_path / "pred"
    out.mkdir()
    sitk.WriteImage(image, str(out / "chaos_t2_005.nii.gz"))
    table = bench.score(out)
    rest = len(spleen) - len(half)
    assert table["chaos_t2_005"][:3] == [0.0, 1.0, 1.0]
    assert table["chaos_t2_005"][3] == pytest.approx(2 * rest / (rest + len(spleen)), abs=1e-6)
    record = bench.record(table)
    assert record["per_organ"]["liver"] == 0.0 and record["mean_dice"] == pytest.approx(
        sum(table["chaos_t2_005"]) / 4
    )

    sitk.WriteImage(image[:, :, :-1], str(out / "chaos_t2_005.nii.gz"))
    with pytest.raises(RuntimeError, match=r"pred/chaos_t2_005\.nii\.gz: shape .* but the label"):
        bench.score(out)
    (out / "chaos_t2_005.nii.gz").unlink()
    with pytest.raises(RuntimeError, match="wrote no prediction for chaos_t2_005"):
        bench.score(out)


# ---------------------------------------------------------------------- end to end
def _running(needle: str) -> list[int]:
    """Pids of processes whose command line holds ``needle``."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


@pytest.mark.thirdparty
def test_benchmark_end_to_end_on_cpu_stops_on_sigterm_and_resumes(tmp_path: Path) -> None:
    """nnU-Net plans, preprocesses, fine-tunes (random init; MoCo + LRC pre-trained) and
    predicts; SIGTERM during nnU-Net's training ends it and its child; the rerun does only
    what is missing; a third run computes nothing."""
    require_thirdparty("nnunetv2")
    data = write_tiny_msd_dataset(tmp_path / "chaos-tiny")
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, str(SCRIPT), "--data", str(data), "--out", str(out),
               "--work-dir", str(work), "--tiny", "--device", "cpu", "--arms", "random",
               "moco_lrc", "--ks", "1", "--seeds", "0", "--test-ids", "chaos_t2_005",
               "--val-ids", "chaos_t2_003"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    runs = out / "nnunet_label_efficiency_runs"

    # 1. Stopped by SIGTERM while nnU-Net trains the second run (MoCo + LRC, pre-trained).
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 600
    child_log = None
    while time.monotonic() < deadline and process.poll() is None:
        logs = list((work / "finetune").glob("test_moco_lrc_k1_s0-*/nnunet.log"))
        if logs and "Epoch 0" in logs[0].read_text(errors="replace"):
            child_log = logs[0]
            break
        time.sleep(0.2)
    assert child_log is not None, process.communicate()
    spec = str(child_log.with_name("spec.json"))
    assert _running(spec)  # nnU-Net's trainer runs in its own process
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "run the same command again" in stderr
    assert not _running(spec)  # the child is ended with it
    assert "[1/2] test_random_k1_s0" in stdout and "[2/2] test_moco_lrc_k1_s0" in stdout
    assert "fine-tuning with nnU-Net's nnUNetTrainer" in stdout
    assert [p.name.split("-")[0] for p in runs.glob("*.json")] == ["test_random_k1_s0"]

    # nnU-Net's dataset: the test patient only in imagesTs; the fold is the labelled patient
    # in train, the validation patient in val.
    (raw,) = work.glob("nnunet_2d-*/raw/Dataset950_*")
    assert sorted(p.name for p in (raw / "imagesTr").iterdir()) == [
        "chaos_t2_001_0000.nii.gz", "chaos_t2_002_0000.nii.gz", "chaos_t2_003_0000.nii.gz"]
    assert [p.name for p in (raw / "imagesTs").iterdir()] == ["chaos_t2_005_0000.nii.gz"]
    (splits,) = work.glob("nnunet_2d-*/preprocessed/Dataset950_*/splits_final.json")
    random_run = json.loads(next(runs.glob("*.json")).read_text())
    assert json.loads(splits.read_text()) == [{"train": random_run["labelled"],
                                               "val": ["chaos_t2_003"]}]  # fmt: skip

    # 2. Resumed: the finished run and the pre-training are reused.
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 of 2 runs already done (skipped); 1 to run" in done.stdout
    assert "pre-training moco_lrc" not in done.stdout and "nnU-Net dataset:" not in done.stdout
    files = sorted(runs.glob("*.json"))
    assert [p.name.split("-")[0] for p in files] == ["test_moco_lrc_k1_s0", "test_random_k1_s0"]
    for file in files:
        result = json.loads(file.read_text())
        assert list(result["per_organ"]) == ORGANS
        assert all(math.isfinite(v) for v in result["per_organ"].values()), result["per_organ"]
        assert set(result["per_volume"]) == {"chaos_t2_005"} and result["k"] == 1
        assert result["labelled"] == random_run["labelled"]  # paired by seed
        assert result["nnunet"]["epochs_run"] == 1 and result["nnunet"]["fold"] == 0
        assert len(result["nnunet"]["validation"]["mean_fg_dice"]) == 1
    lrc = json.loads(files[0].read_text())
    assert lrc["nnunet"]["pretrained_weights"].endswith(".pth") and lrc["variant"]["lrc"]
    table = json.loads((out / "nnunet_label_efficiency_2d.json").read_text())
    difference = table["comparisons"]["moco_lrc - random"]
    assert difference["mean"] == pytest.approx(lrc["mean_dice"] - random_run["mean_dice"])
    assert f"| moco_lrc - random | 1 | {difference['mean']:+.3f} |" in (
        out / "nnunet_label_efficiency_2d.md").read_text()
    assert not list(work.glob("finetune/*/nnUNet_results/*/*/fold_0/checkpoint_*.pth"))

    # 3. Everything done: nothing is recomputed, no run file is rewritten.
    stamps = [p.stat().st_mtime_ns for p in files]
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of 2 runs already done (skipped); 0 to run" in again.stdout
    assert "[1/2]" not in again.stdout and "fine-tuning" not in again.stdout
    assert [p.stat().st_mtime_ns for p in files] == stamps
