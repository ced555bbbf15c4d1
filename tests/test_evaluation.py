"""`lrc-lightning benchmark`: any data set, both readouts, paired statistics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from lrc_lightning.data.cases import DataError
from lrc_lightning.evaluation.label_efficiency import class_names
from lrc_lightning.evaluation.probe import fit_pixel_classifier, linear_probe_dice
from lrc_lightning.models import UNet2d
from lrc_lightning.tools.cli import main as cli
from tests.conftest import DEMO_MR

#: CHAOS labels 1 liver, 2/3 kidneys, 4 spleen -> a two-organ task with other names.
REMAP = np.array([0, 1, 2, 2, 0], dtype=np.uint8)


def two_organ_dataset(root: Path, labels: dict[str, str] | None = None) -> Path:
    """A 5-patient MSD folder made of the real demo volumes: kidneys merged, spleen dropped,
    and a fifth patient that is patient 001 mirrored left-right."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    sources = sorted((DEMO_MR / "imagesTr").glob("*.nii.gz"))
    training = []
    for i, source in enumerate([*sources, sources[0]]):
        image = sitk.ReadImage(str(source))
        label = sitk.ReadImage(str(DEMO_MR / "labelsTr" / source.name))
        remapped = sitk.GetImageFromArray(REMAP[sitk.GetArrayFromImage(label)])
        remapped.CopyInformation(label)
        if i == len(sources):
            image, remapped = (
                sitk.Flip(image, [True, False, False]),
                sitk.Flip(remapped, [True, False, False]),
            )
        name = f"case_{i:03d}.nii.gz"
        sitk.WriteImage(image, str(root / "imagesTr" / name))
        sitk.WriteImage(remapped, str(root / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    labels = labels or {"0": "background", "1": "hepar", "2": "ren"}
    (root / "dataset.json").write_text(json.dumps({"labels": labels, "training": training}))
    return root


def tiny(data: Path, out: Path, *extra: str) -> list[str]:
    return ["benchmark", "--data", str(data), "--out", str(out), "--work-dir", str(out / "w"),
            "--cache-dir", str(out / "cache"), "--size", "32", "--width", "4", "--depth", "2",
            "--batch-size", "4", "--pretrain-steps", "3", "--finetune-steps", "3",
            "--val-every", "1",
            "--probe-pixels", "256", "--seeds", "0", "--ks", "1", "--arms", "random",
            "moco_lrc", "--test-cases", "3", "--val-cases", "1", *extra]  # fmt: skip


def test_benchmark_runs_on_another_dataset_and_reports_its_classes(tmp_path: Path) -> None:
    data = two_organ_dataset(tmp_path / "Task_two")
    assert cli(tiny(data, tmp_path / "out")) == 0
    result = json.loads((tmp_path / "out" / "label_efficiency.json").read_text())
    assert result["classes"] == ["hepar", "ren"]
    assert result["command"].startswith("lrc-lightning benchmark --data")
    for key in ("summary", "probe_summary"):
        entry = result[key]["moco_lrc|1"]
        assert set(entry["per_organ"]) == {"hepar", "ren"}
        assert len(entry["runs"][0]["per_volume_mean"]) == 3  # the 3 test patients
    text = (tmp_path / "out" / "label_efficiency.md").read_text()
    assert "| arm | k | hepar | ren |" in text and "liver" not in text
    assert "## Readout: probe" in text and "95% t interval (seeds)" in text
    run = json.loads(
        next((tmp_path / "out" / "label_efficiency_runs").glob("test_moco*")).read_text()
    )
    assert run["classes"] == ["hepar", "ren"] and set(run["probe"]["per_organ"]) == {"hepar", "ren"}


def test_benchmark_refuses_label_values_outside_its_classes(tmp_path: Path, capsys) -> None:
    # dataset.json declares one organ, the label files hold two.
    data = two_organ_dataset(tmp_path / "Task_bad", {"0": "background", "1": "hepar"})
    with pytest.raises(SystemExit) as exit_info:
        cli(tiny(data, tmp_path / "out"))
    assert exit_info.value.code == 2
    assert re.search(r"labelsTr/case_00\d\.nii\.gz.*2", capsys.readouterr().err)
    assert not list((tmp_path / "out").glob("label_efficiency_runs/*.json"))


def test_class_names_from_json_or_option(tmp_path: Path) -> None:
    assert class_names(str(DEMO_MR), None) == ["liver", "right_kidney", "left_kidney", "spleen"]
    assert class_names(str(DEMO_MR), ["a", "b", "c", "d"]) == ["a", "b", "c", "d"]
    with pytest.raises(DataError, match=r"dataset\.json declares 4 classes.*--classes gives 2"):
        class_names(str(DEMO_MR), ["a", "b"])
    folder = tmp_path / "plain"
    folder.mkdir()
    with pytest.raises(DataError, match="give --classes"):
        class_names(str(folder), None)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dataset.json").write_text('{"labels": {"0": "bg", "1": }')
    with pytest.raises(DataError, match=r"broken/dataset\.json: not valid JSON at line 1, col"):
        class_names(str(broken), None)


def test_linear_probe_is_deterministic_and_uses_the_features() -> None:
    import SimpleITK as sitk

    def volume(name: str) -> tuple[np.ndarray, np.ndarray]:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(DEMO_MR / "imagesTr" / name)))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(DEMO_MR / "labelsTr" / name)))
        image = image[12:20, ::8, ::8].astype(np.float32)
        return image / image.max(), label[12:20, ::8, ::8]

    train, test = [volume("chaos_t2_001.nii.gz")], {"c2": volume("chaos_t2_002.nii.gz")}
    torch.manual_seed(0)
    backbone = UNet2d(width=4, depth=2)
    first = linear_probe_dice(backbone, train, test, 5, pixels_per_class=64, seed=0)
    again = linear_probe_dice(backbone, train, test, 5, pixels_per_class=64, seed=0)
    assert first == again  # same weights, same sample: bit-identical
    assert backbone.training  # the mode is restored
    torch.manual_seed(1)
    other = linear_probe_dice(UNet2d(width=4, depth=2), train, test, 5, pixels_per_class=64)
    assert other != first  # other weights, other result


def test_probe_solver_reaches_the_optimum() -> None:
    """The convex objective's gradient vanishes at the returned classifier, whatever the
    feature scale (no learning rate to tune)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=generator)
    features = torch.randn(300, 4, generator=generator) * 100 + labels[:, None] * 40.0
    head = fit_pixel_classifier(features, labels, 3, l2=1e-2)
    w = head.weight[:, :, 0, 0].detach().double().requires_grad_(True)
    b = head.bias.detach().double().requires_grad_(True)
    x = features.double()
    std = x.std(0)
    counts = torch.bincount(labels, minlength=3).double()
    weight = counts.sum() / (3 * counts)
    loss = torch.nn.functional.cross_entropy(x @ w.T + b, labels, weight=weight)
    # The penalty is on the weights of standardised features: w_std = w * std.
    loss = loss + 0.5 * 1e-2 * ((w * std) ** 2).sum()
    loss.backward()
    assert float((w.grad / std).abs().max()) < 1e-4  # the gradient w.r.t. w * std
    assert float(b.grad.abs().max()) < 1e-4


def test_benchmark_with_device_batches_and_channels_last(tmp_path: Path) -> None:
    """The GPU levers run on CPU too (the harness is tested without a GPU); they change the
    random draws, so their runs get keys of their own."""
    data = two_organ_dataset(tmp_path / "Task_two")
    assert cli([*tiny(data, tmp_path / "out"), "--device-batches", "--channels-last"]) == 0
    runs = sorted(p.name for p in (tmp_path / "out" / "label_efficiency_runs").glob("*.json"))
    assert len(runs) == 2
    assert cli(tiny(data, tmp_path / "out")) == 0
    assert len(list((tmp_path / "out" / "label_efficiency_runs").glob("*.json"))) == 4


def test_run_keys_version_one_never_reused_and_later_options_only_when_set() -> None:
    """Runs are found by a hash of their options. The readout options of version 2 always
    enter it, so no run of the earlier fine-tuning readout (one that did not train) is
    reused; spacing, device batches and channels-last enter it only when set."""
    from lrc_lightning.evaluation.label_efficiency import build_parser, settings_key

    base = ("--data ../shared/data/chaos-t2 --size 128 --width 8 --depth 4 --pretrain-steps 400 "
            "--finetune-steps 150 --slice-axis 0").split()  # fmt: skip
    plain = settings_key(build_parser().parse_args(base))
    runs = Path(__file__).resolve().parents[1] / "benchmarks/results/label_efficiency_runs"
    # 11eacfe1: the key these options had with the version-1 readout (committed runs).
    assert list(runs.glob("test_moco_k1_s0-11eacfe1.json")) and plain != "11eacfe1"
    assert not list(runs.glob(f"*-{plain}*.json"))
    for extra in (["--spacing", "1.5", "1.5"], ["--device-batches"], ["--channels-last"],
                  ["--patience", "2"], ["--val-every", "50"], ["--foreground-ratio", "0.3"],
                  ["--mirror-labels", "right_kidney", "left_kidney"],
                  ["--probe-levels", "bottleneck"]):  # fmt: skip
        assert settings_key(build_parser().parse_args([*base, *extra])) != plain, extra
    assert settings_key(build_parser().parse_args([*base, "--threads", "1"])) == plain


def test_benchmark_checks_case_counts_and_labels_before_training(tmp_path: Path, capsys) -> None:
    data = two_organ_dataset(tmp_path / "Task_two")  # 5 patients
    with pytest.raises(SystemExit) as exit_info:
        cli([*tiny(data, tmp_path / "out"), "--test-cases", "3", "--val-cases", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"5 cases, but 3 test \+ 2 validation \+ k=1 .* need 6", err)
    # A scored patient (test or validation with this split) without its label file.
    spec = json.loads((data / "dataset.json").read_text())
    for entry in spec["training"]:
        entry.pop("label")
        break
    (data / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(SystemExit) as exit_info:
        cli(tiny(data, tmp_path / "out2"))
    assert exit_info.value.code == 2
    assert "cases without a label: ['case_000']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.json"))


def test_checkpoint_rule_on_a_dataset_with_other_organ_names(tmp_path: Path) -> None:
    """The organ rule reads each organ's validation Dice by the data set's own class names
    (here 'hepar', 'ren'); the table counts what it did per arm."""
    data = two_organ_dataset(tmp_path / "Task_two")
    out = tmp_path / "out"
    assert cli(tiny(data, out, "--patience", "0", "--checkpoint-min-organ", "0.02")) == 0
    for path in (out / "label_efficiency_runs").glob("test_*.json"):
        v = json.loads(path.read_text())["finetune_validation"]
        assert [sorted(organs) for _, organs in v["organ_curve"]] == [["hepar", "ren"]] * 3
        organs = dict(v["organ_curve"])[v["best_step"]]
        qualifying = [s for s, o in v["organ_curve"] if min(o.values()) >= 0.02]
        # The flag says whether any validation qualified; if one did, the checkpoint is one.
        assert v["best_every_organ"] is bool(qualifying)
        assert (min(organs.values()) >= 0.02) is bool(qualifying)
        assert v["stopped_step"] == 3  # --patience 0: the whole schedule
    text = (out / "label_efficiency.md").read_text()
    assert "## The checkpoint rule (every organ >= 0.02 on the validation patients)" in text
    assert "| random | 1 |" in text and "| moco_lrc | 1 |" in text
