"""Real scanner exports never give a silent wrong result: several DICOM series in one
folder, 0/255 masks, case ids that look like paths, broken header spacings, unlabelled
validation cases, huge slices; and the cache survives dead processes and full disks."""

from __future__ import annotations

import csv
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lrc_lightning import LRCDataModule
from lrc_lightning.data import DataError, PreprocessConfig, VolumeCache, discover_cases, read_volume
from lrc_lightning.data.cases import Case
from lrc_lightning.data.preprocess import build_entry

from .conftest import DEMO_CT, DEMO_MR
from .test_data import _write_dicom_series

CT = DEMO_CT / "example_ct_sm.nii.gz"
CT_SEG = DEMO_CT / "example_seg.nii.gz"

SCOUT_UID = "1.2.826.0.1.3680043.2.1125.1.1"  # lower than the axial UID: ITK's own pick
AXIAL_UID = "1.2.826.0.1.3680043.2.1125.1.2"


# ---------------------------------------------------------------- several DICOM series
def _scanner_export(folder: Path) -> Path:
    """One folder as scanners export it: a 3-slice coronal localizer next to the axial
    series (the shipped CT, 30 slices), both real DICOM written by GDCM."""
    ct = sitk.ReadImage(str(CT))
    coronal = sitk.PermuteAxes(ct, [0, 2, 1])[:, :, 40:43]
    _write_dicom_series(coronal, folder, SCOUT_UID, "LOCALIZER", prefix="IM_A")
    _write_dicom_series(ct, folder, AXIAL_UID, "AX ABD 3mm", prefix="IM_B")
    return folder


def test_several_dicom_series_in_one_folder_are_never_picked_silently(tmp_path) -> None:
    folder = _scanner_export(tmp_path / "export")
    listing = (
        rf"export: holds 2 DICOM series \({SCOUT_UID} \('LOCALIZER'\): 3 slices; "
        rf"{AXIAL_UID} \('AX ABD 3mm'\): 30 slices\); choose with dicom_series="
    )
    with pytest.raises(DataError, match=listing):
        discover_cases(folder)
    with pytest.raises(DataError, match=listing):
        discover_cases(tmp_path)  # a folder of patient folders
    with pytest.raises(DataError, match=listing):
        read_volume(folder)
    axial = sitk.GetArrayFromImage(read_volume(CT))
    (case,) = discover_cases(folder, dicom_series="largest")
    assert (case.case_id, case.series) == ("export", AXIAL_UID)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(folder, AXIAL_UID)), axial)
    (scout,) = discover_cases(folder, dicom_series=SCOUT_UID)
    assert read_volume(folder, scout.series).GetSize() == (122, 3, 30)  # coronal, in LPS
    each = discover_cases(folder, dicom_series="all")
    assert [(c.case_id, c.series) for c in each] == [
        (f"export-{SCOUT_UID}", SCOUT_UID),
        (f"export-{AXIAL_UID}", AXIAL_UID),
    ]
    with pytest.raises(DataError, match=r"export: no DICOM series with SeriesInstanceUID '1\.2"):
        discover_cases(folder, dicom_series="1.2.3")
    # A CSV chooses per row; the label goes with the axial series.
    table = tmp_path / "cases.csv"
    with table.open("w", newline="") as fh:
        csv.writer(fh).writerows([["id", "image", "label", "series"],
                                  ["p1", "export", str(CT_SEG), AXIAL_UID]])  # fmt: skip
    (row,) = discover_cases(table)
    entry = build_entry(row, PreprocessConfig(modality="ct", image_size=32))
    assert entry["image"].shape == (30, 32, 32) and entry["label"].max() > 0
    with pytest.raises(DataError, match=r"cases\.csv: .*export: holds 2 DICOM series"):
        table.write_text("id,image\np1,export\n")
        discover_cases(table)


def test_datamodule_reads_the_chosen_series_of_a_scanner_export(tmp_path) -> None:
    folder = _scanner_export(tmp_path / "data" / "export")
    with pytest.raises(DataError, match="holds 2 DICOM series"):
        LRCDataModule(str(tmp_path / "data"), cache_dir=str(tmp_path / "c"), image_size=32,
                      modality="ct").prepare_data()  # fmt: skip
    dm = LRCDataModule(str(folder.parent), cache_dir=str(tmp_path / "c"), image_size=32,
                       modality="ct", dicom_series="largest", batch_size=2)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    (volume,) = dm.volumes(dm.split.pool)
    assert volume.image.shape == (30, 32, 32)  # the axial series, not the localizer
    assert next(iter(dm.train_dataloader()))["image_v1"].shape == (2, 1, 32, 32)


# ---------------------------------------------------------------- label values
def _liver_mask(path: Path, value: int) -> Path:
    """The shipped CT's liver (TotalSegmentator label 5) as a binary mask 0/``value``."""
    seg = sitk.ReadImage(str(CT_SEG))
    mask = sitk.Cast(sitk.Equal(seg, 5), sitk.sitkUInt8) * value
    sitk.WriteImage(mask, str(path))
    return path


def test_a_0_255_mask_is_an_error_not_ignored_pixels(tmp_path) -> None:
    mask = _liver_mask(tmp_path / "liver_0_255.nii.gz", 255)
    remedy = r"must lie in 0\.\.254 \(255 is reserved for padding.*found \[255\]; remap"
    with pytest.raises(DataError, match=rf"liver_0_255\.nii\.gz: label values {remedy}"):
        build_entry(Case("ct", CT, mask), PreprocessConfig(modality="ct"))
    with pytest.raises(DataError, match=r"liver_0_255\.nii\.gz: .*found \[255\]"):
        build_entry(Case("ct", CT, mask), PreprocessConfig(modality="ct", allowed_labels=(0, 1)))
    # The remapped mask (0/1) trains on every liver voxel; the padding the package adds
    # itself is still ignored (-1 in batches).
    fixed = _liver_mask(tmp_path / "liver_0_1.nii.gz", 1)
    cache = VolumeCache(tmp_path / "cache", PreprocessConfig(modality="ct", image_size=122))
    case = Case("ct", CT, fixed)
    cache.prepare([case], progress=False)
    ids = cache.load(case).label_ids()
    assert ids.shape == (30, 122, 122)  # 101 rows padded to 122
    assert int((ids == 1).sum()) == 38634  # every liver voxel of the file
    assert int((ids == -1).sum()) == 30 * 21 * 122  # exactly the padded rows


# ---------------------------------------------------------------- case ids as paths
def test_case_ids_that_look_like_paths_stay_inside_the_cache(tmp_path) -> None:
    images = sorted((DEMO_MR / "imagesTr").glob("*.nii.gz"))[:3]
    table = tmp_path / "data" / "cases.csv"
    table.parent.mkdir()
    ids = ["sub-01/ses-01", "../../x", "sub-01_ses-01"]  # the last sanitises like the first
    with table.open("w", newline="") as fh:
        rows = [[i, str(p), str(DEMO_MR / "labelsTr" / p.name)]
                for i, p in zip(ids, images, strict=True)]  # fmt: skip
        csv.writer(fh).writerows([["id", "image", "label"], *rows])
    cache_dir = tmp_path / "data" / "cache"
    dm = LRCDataModule(str(table), cache_dir=str(cache_dir), image_size=32, batch_size=2,
                       mode="finetune", val_cases=["sub-01/ses-01"])  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    entries = sorted(p.name for p in cache_dir.iterdir())
    assert len(entries) == 3 and all(not p.startswith(".") for p in entries)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing escaped
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cache", "cases.csv"]
    for case in dm.cases():
        entry = dm.cache.entry_dir(case)
        assert entry.parent == cache_dir
        assert json.loads((entry / "meta.json").read_text())["case_id"] == case.case_id
    (val,) = dm.volumes(dm.split.val)
    np.testing.assert_array_equal(val.image, dm.cache.load(discover_cases(table)[0]).image)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch["case_id"]) <= {"../../x", "sub-01_ses-01"}
    assert next(iter(dm.val_dataloader()))["image"].shape[2:] == (1, 32, 32)


# ---------------------------------------------------------------- header spacing
def _with_pixdim(path: Path, axis: int, value: float) -> Path:
    """The shipped CT with ``pixdim[axis]`` patched in its raw NIfTI-1 header."""
    raw = bytearray(gzip.open(CT).read())
    assert struct.unpack("<i", raw[:4])[0] == 348 and struct.unpack("<8f", raw[76:108])[3] == 3
    raw[76 + 4 * axis : 80 + 4 * axis] = struct.pack("<f", value)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(bytes(raw)))
    else:
        path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize(
    ("name", "axis", "value", "itk_reads"),
    [("zero.nii.gz", 3, 0.0, 1.0), ("negative.nii", 3, -3.0, 3.0),
     ("nan.nii.gz", 1, float("nan"), 1.0)],
)  # fmt: skip
def test_zero_negative_or_nan_header_spacing_is_an_error(
    tmp_path, name, axis, value, itk_reads
) -> None:
    path = _with_pixdim(tmp_path / name, axis, value)
    shown = "nan" if value != value else f"{value:g}"
    message = rf"{name}: invalid voxel spacing in the NIfTI header \(pixdim\[{axis}\] = {shown};"
    with pytest.raises(DataError, match=message):
        read_volume(path)
    with pytest.raises(DataError, match=message):  # as a label file too
        build_entry(Case("ct", CT, path), PreprocessConfig(modality="ct"))
    # SimpleITK alone reads a spacing that is not in the file (zero and NaN as 1 mm; with
    # 3 x 3 x 1 mm, slice_axis="auto" would cut sagittal slices out of the axial CT).
    assert sitk.ReadImage(str(path)).GetSpacing()[axis - 1] == itk_reads


# ---------------------------------------------------------------- early checks
def test_unlabelled_validation_case_is_named_not_dropped(tmp_path) -> None:
    images = sorted((DEMO_MR / "imagesTr").glob("*.nii.gz"))[:3]
    table = tmp_path / "cases.csv"
    with table.open("w", newline="") as fh:  # the third case's label went missing
        rows = [[p.name[:12], str(p), str(DEMO_MR / "labelsTr" / p.name) if i < 2 else ""]
                for i, p in enumerate(images)]  # fmt: skip
        csv.writer(fh).writerows([["id", "image", "label"], *rows])
    ids = [r[0] for r in rows]
    dm = LRCDataModule(str(table), cache_dir=str(tmp_path / "c"), image_size=32,
                       val_cases=[ids[0], ids[2]])  # fmt: skip
    message = rf"val_cases: case\(s\) \['{ids[2]}'\] have no label file.*1 of 2 cases scored"
    with pytest.raises(DataError, match=message):
        dm.setup("fit")
    dm = LRCDataModule(str(table), cache_dir=str(tmp_path / "c"), image_size=32,
                       test_cases=[ids[2]])  # fmt: skip
    with pytest.warns(UserWarning, match=rf"test_cases: none of the cases \['{ids[2]}'\]"):
        dm.setup("fit")
    assert dm.test_dataloader() == []


def test_huge_2d_slice_is_an_error_before_any_allocation() -> None:
    from lrc_lightning.superpixels.graph import BYTES_PER_PIXEL_2D, _memory_limit, felzenszwalb

    side = 23171  # 4 edges per pixel no longer fit int32 indices
    view = np.broadcast_to(np.float32(0.5), (side, side))  # no memory behind it
    with pytest.raises(ValueError, match=rf"a {side}x{side} slice has too many pixels"):
        felzenszwalb(view)
    limit = _memory_limit()
    side = int((1.2 * limit / BYTES_PER_PIXEL_2D) ** 0.5) + 1
    if 4 * side * side >= 2**31:
        pytest.skip(f"{limit / 2**30:.0f} GiB of memory: every addressable slice fits")
    with pytest.raises(ValueError, match=rf"a {side}x{side} slice needs about .* GiB .*more than"):
        felzenszwalb(np.broadcast_to(np.float32(0.5), (side, side)))


def test_slice_made_huge_by_an_option_names_the_file_before_reading_on() -> None:
    # spacing in metres instead of millimetres: the 3 mm CT upsampled 300x in-plane.
    with pytest.raises(DataError, match=r"example_ct_sm\.nii\.gz: super-pixels: a 30300x36600 "
                                        r"slice has too many pixels"):  # fmt: skip
        build_entry(Case("ct", CT), PreprocessConfig(modality="ct", spacing=(0.01, 0.01)))
