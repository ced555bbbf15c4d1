"""Real-world volumes: any acquisition plane, mixed sizes and spacings, nothing silent.

Each non-axial or oblique volume is the real CHAOS T2 volume of patient 001 written again
with another voxel-grid geometry (the same voxels), so the right answer is known: its
native slices are the original's.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import SimpleITK as sitk
import torch

from lrc_lightning import LRCDataModule
from lrc_lightning.data import DataError, PreprocessConfig, read_volume
from lrc_lightning.data.cases import Case
from lrc_lightning.data.preprocess import IGNORE_LABEL, build_entry, choose_slice_axis
from lrc_lightning.evaluation.image_logging import SuperpixelViewLogger
from lrc_lightning.tools.cli import main as cli

from .conftest import DEMO_CT, DEMO_MR

MR = DEMO_MR / "imagesTr" / "chaos_t2_001.nii.gz"
MR_SEG = DEMO_MR / "labelsTr" / "chaos_t2_001.nii.gz"
CT = DEMO_CT / "example_ct_sm.nii.gz"
CT_SEG = DEMO_CT / "example_seg.nii.gz"
CONFIG = PreprocessConfig(modality="mr")


def _axial() -> tuple[np.ndarray, tuple[float, float, float]]:
    """The LPS (z, y, x) array of the real volume and its (x, y, z) spacing."""
    image = read_volume(MR)
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def _write(array: np.ndarray, spacing, direction, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(d) for d in np.asarray(direction).reshape(-1)))
    sitk.WriteImage(image, str(path))
    return path


def _rotation(degrees_x: float, degrees_z: float) -> np.ndarray:
    ax, az = np.radians(degrees_x), np.radians(degrees_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def test_choose_slice_axis_largest_spacing_then_fewest_voxels() -> None:
    assert choose_slice_axis((7.7, 1.25, 1.25), (36, 256, 256)) == 0  # axial MR
    assert choose_slice_axis((1.0, 1.0, 8.0), (256, 256, 13)) == 2  # short axis on x
    assert choose_slice_axis((3.0, 3.0, 3.0), (112, 101, 122)) == 1  # isotropic: fewest
    assert choose_slice_axis((3.0, 3.0, 3.0), (100, 100, 100)) == 0  # full tie: z


def test_sagittal_acquisition_gives_the_native_slices(tmp_path: Path) -> None:
    """The same voxels labelled as a sagittal stack (through-plane axis along L)."""
    array, (sx, sy, sz) = _axial()
    original = build_entry(Case("axial", MR), CONFIG)["image"]
    sagittal = _write(array.transpose(1, 2, 0), (sz, sx, sy), np.eye(3), tmp_path / "sag.nii.gz")
    entry = build_entry(Case("sagittal", sagittal), CONFIG)
    assert entry["meta"]["slice_axis"] == 2
    np.testing.assert_array_equal(entry["image"], original)
    assert entry["meta"]["spacing"] == pytest.approx([sz, sy, sx])
    # An explicit axis still wins: axis 0 cuts across the stack, with a warning.
    with pytest.warns(UserWarning, match=r"sag\.nii\.gz: slices along axis 0 .*7\.7"):
        across = build_entry(Case("sagittal", sagittal), PreprocessConfig(slice_axis=0))
    assert across["image"].shape == (array.shape[1], array.shape[2], array.shape[0])


def test_mildly_oblique_acquisition_gives_the_same_slices(tmp_path: Path) -> None:
    array, spacing = _axial()
    original = build_entry(Case("axial", MR), CONFIG)["image"]
    oblique = _write(array, spacing, _rotation(25, 15), tmp_path / "oblique.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in-plane spacing is isotropic: no warning
        entry = build_entry(Case("oblique", oblique), CONFIG)
    np.testing.assert_array_equal(entry["image"], original)


def test_strongly_oblique_short_axis_stack_is_not_cut_across(tmp_path: Path) -> None:
    """A stack tilted 70 degrees (cardiac short axis): the reorientation to LPS moves the
    stack axis in-plane; the slices are still the native ones, up to in-plane flips and
    transposition."""
    array, spacing = _axial()
    original = build_entry(Case("axial", MR), CONFIG)["image"]
    tilted = _write(array, spacing, _rotation(70, 0), tmp_path / "sax.nii.gz")
    entry = build_entry(Case("sax", tilted), CONFIG)
    assert entry["meta"]["slice_axis"] != 0  # the stack axis left the z position
    got = entry["image"]
    assert got.shape[0] == original.shape[0]

    def variants(b: np.ndarray) -> list[np.ndarray]:
        return [v for base in (b, b.T) for v in (base, base[::-1], base[:, ::-1], base[::-1, ::-1])]

    def matches(i: int, j: int) -> bool:
        return any(v.shape == got[i].shape and np.array_equal(got[i], v)
                   for v in variants(original[j]))  # fmt: skip

    n = len(got)
    assert all(matches(i, i) for i in range(n)) or all(matches(i, n - 1 - i) for i in range(n))


def test_spacing_and_aspect_preserving_size_pad_maps_and_labels(tmp_path: Path) -> None:
    """The CT is 101 x 122 pixels at 3 mm: resampled to 1.5 mm it is 202 x 244; fitted
    into 64 x 64 it keeps its aspect ratio, padded with 0 / -1 / ignore."""
    config = PreprocessConfig(modality="ct", spacing=(1.5, 1.5))
    resampled = build_entry(Case("ct", CT, CT_SEG), config)
    assert resampled["image"].shape[1:] == (202, 244)
    assert resampled["meta"]["spacing"][1:] == pytest.approx([1.5, 1.5])
    entry = build_entry(Case("ct", CT, CT_SEG), PreprocessConfig(modality="ct", image_size=64))
    assert entry["image"].shape[1:] == (64, 64)
    assert entry["meta"]["content_shape"][1:] == [53, 64]  # 101 x 122 scaled by 64 / 122
    top = (64 - 53) // 2
    pad_rows = np.r_[0:top, top + 53 : 64]
    assert (entry["superpixels"][:, pad_rows] == -1).all()
    assert (entry["label"][:, pad_rows] == IGNORE_LABEL).all()
    assert (entry["image"][:, pad_rows] == 0).all()
    assert (entry["superpixels"][:, top : top + 53] >= 0).all()


def _ct_and_mr_dataset(root: Path) -> Path:
    """A CSV of two real volumes of different size and spacing (MR 256x256, CT 101x122)."""
    root.mkdir(parents=True, exist_ok=True)
    csv = root / "cases.csv"
    csv.write_text(f"image,id\n{MR},mr\n{CT},ct\n")
    return csv


def test_mixed_sizes_without_image_size_is_a_clear_error(tmp_path: Path) -> None:
    data = _ct_and_mr_dataset(tmp_path / "data")
    dm = LRCDataModule(str(data), cache_dir=str(tmp_path / "cache"), batch_size=2)
    dm.prepare_data()
    with pytest.raises(DataError, match=r"different sizes.*image_size") as err:
        dm.setup("fit")
    assert "case mr has 256x256" in str(err.value) and "case ct has 101x122" in str(err.value)


def test_mixed_sizes_and_spacings_batch_together_with_image_size(tmp_path: Path) -> None:
    data = _ct_and_mr_dataset(tmp_path / "data")
    dm = LRCDataModule(str(data), cache_dir=str(tmp_path / "cache"), batch_size=4,
                       image_size=64, spacing=(2.0, 2.0))  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image_v1"].shape == (4, 1, 64, 64)
    assert batch["superpixels_v1"].min() == -1  # the padding


def test_labels_padding_is_ignored_in_batches(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    csv = tmp_path / "d" / "cases.csv"
    csv.write_text(f"image,label,id\n{CT},{CT_SEG},ct\n")
    dm = LRCDataModule(str(csv), cache_dir=str(tmp_path / "cache"), batch_size=2,
                       image_size=64, mode="finetune", labelled_cases=1, augment=False,
                       modality="ct")  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].min() == -1 and batch["label"].max() > 0
    assert (batch["label"][:, :5] == -1).all()  # the rows padded above the 53-row content


def test_superpixel_view_logger_logs_at_the_first_step(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import CSVLogger

    from lrc_lightning.models import MoCoV2LRC, UNet2d

    dm = LRCDataModule(str(DEMO_MR), cache_dir=str(tmp_path / "cache"), image_size=32,
                       batch_size=4)  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, logger=CSVLogger(tmp_path), enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False,
        callbacks=[SuperpixelViewLogger(every_n_steps=500, max_images=2)],
    )  # fmt: skip
    trainer.fit(MoCoV2LRC(UNet2d(width=4, depth=2), queue_size=16), dm)
    panels = sorted(Path(trainer.log_dir).rglob("train_views_step*.png"))
    assert [p.name for p in panels] == ["train_views_step1_0.png", "train_views_step1_1.png"]


def test_preview_command_writes_the_grid(tmp_path: Path, capsys) -> None:
    from PIL import Image

    out = tmp_path / "preview.png"
    assert cli(["preview", "--data", str(DEMO_MR), "--data.cache_dir", str(tmp_path / "c"),
                "--data.image_size", "64", "--out", str(out), "--cases", "2", "--slices",
                "3", "--scales", "50", "200"]) == 0  # fmt: skip
    grid = np.asarray(Image.open(out))
    # 2 cases x 3 slices rows; 3 columns (cached map, scale 50, scale 200); 64 px tiles
    # enlarged to 192 plus a 16 px caption.
    assert grid.shape == (6 * (192 + 16), 3 * 192, 3)
    cached = [p for p in (tmp_path / "c").iterdir() if not p.name.startswith(".")]
    assert len(cached) == 2  # only the shown cases were pre-processed (the data has 4)
    lines = [line for line in capsys.readouterr().out.splitlines() if "slice" in line]
    assert len(lines) == 6 and all("axis 0" in line and "regions" in line for line in lines)
    fine, coarse = (int(lines[0].split(f"scale_{s}: ")[1].split(",")[0]) for s in (50, 200))
    assert fine > coarse  # a smaller scale gives more regions


def test_nothing_partial_after_bad_inputs(tmp_path: Path) -> None:
    """A bad case stops the cache fill with a clear error; entries already written stay
    valid, nothing half-written is left behind."""
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(MR.read_bytes()[:4000])
    data = tmp_path / "data.csv"
    data.write_text(f"image,id\n{MR},good\n{bad},bad\n")
    dm = LRCDataModule(str(data), cache_dir=str(tmp_path / "cache"), image_size=32)
    with pytest.raises(DataError, match=r"bad\.nii\.gz"):
        dm.prepare_data()
    entries = [p for p in (tmp_path / "cache").iterdir()]
    assert [p.name.split("-")[0] for p in entries] == ["good"]
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["case_id"] == "good" and dm.cache.is_valid(entries[0])
    assert torch.is_tensor(torch.from_numpy(np.load(entries[0] / "image.npy")))


def test_non_axial_and_mixed_sets_pre_train(tmp_path: Path) -> None:
    """MoCo v2 + LRC pre-trains on a sagittal MR stack next to the mixed-size, mixed-spacing
    CT and MR, with only image_size set."""
    from lrc_lightning.models import MoCoV2LRC, UNet2d

    array, (sx, sy, sz) = _axial()
    sagittal = _write(array.transpose(1, 2, 0), (sz, sx, sy), np.eye(3), tmp_path / "sag.nii.gz")
    data = tmp_path / "cases.csv"
    data.write_text(f"image,id\n{sagittal},sagittal\n{CT},ct\n{MR},mr\n")
    dm = LRCDataModule(str(data), cache_dir=str(tmp_path / "cache"), image_size=32,
                       batch_size=4)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(MoCoV2LRC(UNet2d(width=4, depth=2), queue_size=16), dm)
    assert trainer.global_step == 2
    assert dm.volumes(dm.cases())[0].meta["slice_axis"] == 2  # the sagittal stack's own axis


def test_3d_mode_on_a_sagittal_stack_and_mixed_sizes_without_image_size(tmp_path: Path) -> None:
    """Supervoxels and 3D patches need no common size: a sagittal MR stack, the CT and the
    axial MR (three sizes, three spacings) pre-train UNet3d together; the sagittal stack's
    supervoxels are computed on its native grid, the same voxels as the axial file's."""
    from lrc_lightning.models import MoCoV2LRC, UNet3d

    array, (sx, sy, sz) = _axial()
    sagittal = _write(array.transpose(1, 2, 0), (sz, sx, sy), np.eye(3), tmp_path / "sag.nii.gz")
    data = tmp_path / "cases.csv"
    data.write_text(f"image,id\n{sagittal},sagittal\n{CT},ct\n{MR},mr\n")
    dm = LRCDataModule(str(data), cache_dir=str(tmp_path / "cache"), spatial_dims=3,
                       patch_size=(8, 32, 32), batch_size=4, superpixel_scale=50,
                       superpixel_min_size=100)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")  # no "different sizes" error in 3D
    sag, ct, mr = dm.volumes(dm.cases())
    assert {sag.image.shape, ct.image.shape, mr.image.shape} == {(37, 256, 256), (30, 101, 122)}
    assert sag.meta["slice_axis"] == 2 and np.array_equal(sag.image, mr.image)
    assert np.array_equal(sag.superpixels, mr.superpixels)  # the same voxels, the same grid
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(MoCoV2LRC(UNet3d(width=4, depth=2), queue_size=16), dm)
    assert trainer.global_step == 2


def test_3d_fine_tuning_on_ct_with_other_labels(tmp_path: Path) -> None:
    """TotalSegmentator's label values (up to 104, with gaps): patches centred on labelled
    voxels, label values kept, padding ignored."""
    csv = tmp_path / "ct.csv"
    csv.write_text(f"image,label,id\n{CT},{CT_SEG},ct\n")
    dm = LRCDataModule(str(csv), cache_dir=str(tmp_path / "cache"), modality="ct",
                       spatial_dims=3, patch_size=(16, 64, 64), batch_size=4,
                       mode="finetune", labelled_cases=1, foreground_ratio=1.0,
                       augment=False)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    truth = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(CT_SEG)))).tolist())
    values = set(batch["label"].unique().tolist())
    assert values - {-1} <= truth and len(values - {-1, 0}) >= 3
    centre = batch["label"][:, 8, 32, 32]
    assert (centre > 0).all()  # every patch centred on a labelled voxel
