"""LRCDataModule: readers on real files, geometry checks, cache behaviour, views, splits."""

from __future__ import annotations

import dataclasses
import json
import locale
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from lrc_lightning import LRCDataModule
from lrc_lightning.data import DataError, PreprocessConfig, VolumeCache, discover_cases, read_volume
from lrc_lightning.data.cache import parse_shard
from lrc_lightning.data.cases import Case
from lrc_lightning.data.preprocess import build_entry
from lrc_lightning.data.splits import split_cases
from lrc_lightning.data.transforms import GeometryAugment, apply_affine

from .conftest import DEMO_CT, DEMO_MR, shared_path

CT = DEMO_CT / "example_ct_sm.nii.gz"
CT_SEG = DEMO_CT / "example_seg.nii.gz"
MR = DEMO_MR / "imagesTr" / "chaos_t2_001.nii.gz"
MR_SEG = DEMO_MR / "labelsTr" / "chaos_t2_001.nii.gz"


def _small_ct_cases(tmp: Path, n: int = 3) -> list[Case]:
    """n real CT volumes (sub-volumes of the shipped CT) with their labels, as NIfTI."""
    img, seg = sitk.ReadImage(str(CT)), sitk.ReadImage(str(CT_SEG))
    cases = []
    for i in range(n):
        sub, sub_seg = img[:, :, 10 * i : 10 * i + 10], seg[:, :, 10 * i : 10 * i + 10]
        p, q = tmp / f"ct{i}.nii.gz", tmp / f"ct{i}_seg.nii.gz"
        sitk.WriteImage(sub, str(p))
        sitk.WriteImage(sub_seg, str(q))
        cases.append(Case(f"ct{i}", p, q))
    return cases


# ---------------------------------------------------------------------------- readers
def test_reads_nifti_and_reorients_to_lps() -> None:
    image = read_volume(CT)
    assert image.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    raw = sitk.ReadImage(str(CT))  # stored RAS-like: x and y flipped
    assert raw.GetDirection()[0] == -1
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(raw)[:, ::-1, ::-1]
    )


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_reads_nrrd_and_mha_written_from_real_nifti(tmp_path, suffix) -> None:
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(CT)), str(path))
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(read_volume(path)), sitk.GetArrayFromImage(read_volume(CT))
    )


def test_reads_dicom_series_and_its_label() -> None:
    folder = shared_path("totalseg-example", "example_ct_dicom")
    image = read_volume(folder)
    assert image.GetSize() == (512, 512, 20)
    seg = read_volume(shared_path("totalseg-example", "example_seg_dicom.nii.gz"))
    from lrc_lightning.data.io import check_same_geometry

    check_same_geometry(image, seg, folder, Path("seg"))
    entry = build_entry(Case("dicom", folder), PreprocessConfig(modality="ct", image_size=128))
    assert entry["image"].shape == (20, 128, 128)
    assert discover_cases(folder)[0].case_id == "example_ct_dicom"


def _write_dicom_series(
    volume: sitk.Image,
    folder: Path,
    series_uid: str = "1.2.826.0.1.3680043.2.1125.1.1",
    description: str | None = None,
    prefix: str = "slice",
) -> list[Path]:
    """Write a real volume as an uncompressed DICOM CT series, one file per slice.

    GDCM's writer sets the process locale to "C" (reading does not): it is restored, else
    later tests decode their subprocesses' UTF-8 output as ASCII.
    """
    saved_locale = locale.setlocale(locale.LC_ALL)
    try:
        return _write_dicom_files(volume, folder, series_uid, description, prefix)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)


def _write_dicom_files(
    volume: sitk.Image, folder: Path, series_uid: str, description: str | None, prefix: str
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.Cast(volume, sitk.sitkInt16)
    d = volume.GetDirection()
    tags = {
        "0008|0060": "CT",
        "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
        "0020|000e": series_uid,
        "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0018|0050": str(volume.GetSpacing()[2]),
    }
    if description is not None:
        tags["0008|103e"] = description
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for i in range(volume.GetDepth()):
        slice_ = volume[:, :, i]
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        position = volume.TransformIndexToPhysicalPoint((0, 0, i))
        slice_.SetMetaData("0020|0032", "\\".join(str(v) for v in position))
        slice_.SetMetaData("0020|0013", str(i))
        files.append(folder / f"{prefix}{i:03d}.dcm")
        writer.SetFileName(str(files[-1]))
        writer.Execute(slice_)
    return files


def test_dicom_series_decoded_in_blocks_equals_whole_read(tmp_path) -> None:
    from lrc_lightning.data import io

    folder = tmp_path / "series"
    _write_dicom_series(sitk.ReadImage(str(CT)), folder)
    whole = read_volume(folder)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(whole), sitk.GetArrayFromImage(read_volume(CT))
    )
    names = io.dicom_series_files(folder)
    assert [len(b) for b in io.dicom_blocks(names, 4)] == [8, 7, 7, 8]
    assert len(io.dicom_blocks(names[:7], 4)) == 1  # too few files to split
    blocks = [io.read_dicom_block(str(folder), b) for b in io.dicom_blocks(names, 4)]
    joined = io.checked_volume(io.assemble_dicom_blocks(blocks), folder)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(joined), sitk.GetArrayFromImage(whole))
    np.testing.assert_allclose(joined.GetOrigin(), whole.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(joined.GetSpacing(), whole.GetSpacing(), rtol=1e-6)
    assert joined.GetDirection() == whole.GetDirection()
    # Blocks that do not follow each other (a gap) or disagree on pixel type: not joined.
    assert io.assemble_dicom_blocks([blocks[0], blocks[2]]) is None
    cast = dataclasses.replace(blocks[1], array=blocks[1].array.astype(np.float32))
    assert io.assemble_dicom_blocks([blocks[0], cast]) is None


def test_parallel_precompute_of_one_dicom_series_matches_serial(tmp_path, monkeypatch) -> None:
    from lrc_lightning.data import precompute as precompute_module

    folder = tmp_path / "series"
    _write_dicom_series(sitk.ReadImage(str(CT)), folder)
    case = discover_cases(folder)[0]
    serial = VolumeCache(tmp_path / "a", PreprocessConfig(modality="ct", image_size=64))
    parallel = VolumeCache(tmp_path / "b", PreprocessConfig(modality="ct", image_size=64))
    serial.prepare([case], processes=1, progress=False)
    joined = []  # a single case goes through the pool, its series decoded by blocks
    assemble = precompute_module.assemble_dicom_blocks

    def spy(blocks):
        joined.append(len(blocks))
        return assemble(blocks)

    monkeypatch.setattr(precompute_module, "assemble_dicom_blocks", spy)
    parallel.prepare([case], processes=2, progress=False)
    assert joined == [4]  # 30 files, 2 workers: 4 blocks
    a, b = serial.load(case), parallel.load(case)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.superpixels, b.superpixels)
    assert a.meta["spacing"] == pytest.approx(b.meta["spacing"])


def test_dicom_series_with_an_unreadable_file_is_an_error(tmp_path) -> None:
    folder = tmp_path / "series"
    files = _write_dicom_series(sitk.ReadImage(str(CT)), folder)
    files[12].write_bytes(files[12].read_bytes()[:1000])  # truncated: GDCM leaves it out
    with pytest.raises(DataError, match=r"series.*missing or unevenly spaced.*slice011"):
        read_volume(folder)
    cache = VolumeCache(tmp_path / "cache", PreprocessConfig(modality="ct", image_size=64))
    with pytest.raises(DataError, match=r"series.*missing or unevenly spaced"):
        cache.prepare(discover_cases(folder), processes=2, progress=False)
    assert not any((tmp_path / "cache").glob("*/meta.json"))  # nothing half-written


def test_shared_jpeg2000_dicom_series_in_parallel_matches_serial(tmp_path) -> None:
    folder = shared_path("totalseg-example", "example_ct_dicom")
    case = discover_cases(folder)[0]
    caches = [VolumeCache(tmp_path / n, PreprocessConfig(modality="ct")) for n in "ab"]
    caches[0].prepare([case], processes=1, progress=False)
    caches[1].prepare([case], processes=2, progress=False)
    np.testing.assert_array_equal(caches[0].load(case).image, caches[1].load(case).image)
    np.testing.assert_array_equal(
        caches[0].load(case).superpixels, caches[1].load(case).superpixels
    )


def test_discover_msd_csv_folder_and_list(tmp_path) -> None:
    msd = discover_cases(DEMO_MR)
    assert [c.case_id for c in msd] == [
        "chaos_t2_001",
        "chaos_t2_002",
        "chaos_t2_003",
        "chaos_t2_005",
    ]
    assert all(c.label is not None and c.label.exists() for c in msd)
    csv = tmp_path / "cases.csv"
    csv.write_text(f"id,image,label\np1,{MR},{MR_SEG}\n")
    assert discover_cases(csv) == [Case("p1", MR.resolve(), MR_SEG.resolve())]
    folder = discover_cases(DEMO_MR / "imagesTr")
    assert len(folder) == 4 and folder[0].label is None
    assert len(discover_cases([str(MR), str(CT)])) == 2


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_file(tmp_path) -> None:
    with pytest.raises(DataError, match=r"missing\.nii\.gz: file not found"):
        read_volume(tmp_path / "missing.nii.gz")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(CT.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"truncated\.nii\.gz: unreadable or truncated"):
        read_volume(truncated)
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.float32)), str(flat))
    with pytest.raises(DataError, match=r"flat\.nii\.gz: expected a 3D"):
        read_volume(flat)
    four_d = tmp_path / "four.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 8, 8), np.float32)), str(four_d))
    with pytest.raises(DataError, match=r"four\.nii\.gz: expected a 3D"):
        read_volume(four_d)
    nan = tmp_path / "nan.mha"  # ITK's NIfTI writer drops NaN; MetaImage keeps it
    arr = np.zeros((3, 8, 8), np.float32)
    arr[1, 2, 2] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(nan))
    with pytest.raises(DataError, match=r"nan\.mha: contains NaN or inf"):
        read_volume(nan)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty folder"):
        discover_cases(empty)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nan_and_inf_in_nifti_are_found_in_the_raw_data(tmp_path, suffix) -> None:
    """SimpleITK reads a NIfTI's NaN and inf as 0 without a word: the file's own bytes are
    checked. Real CT, float32, 400 NaN and 1 inf voxels."""
    image = sitk.Cast(sitk.ReadImage(str(CT)), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(image)
    arr.reshape(-1)[1000:1400] = np.nan
    arr.reshape(-1)[5000] = np.inf
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(image)
    path = tmp_path / f"nan_ct{suffix}"
    sitk.WriteImage(bad, str(path))
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()  # ITK: zeros
    with pytest.raises(DataError, match=r"nan_ct\.nii(\.gz)?: contains 401 NaN or inf voxels"):
        read_volume(path)
    clean = tmp_path / f"clean{suffix}"
    sitk.WriteImage(image, str(clean))
    read_volume(clean)  # finite float data passes
    cache = VolumeCache(tmp_path / "cache", PreprocessConfig(modality="ct", image_size=32))
    with pytest.raises(DataError, match="nan_ct"):
        cache.prepare([Case("bad", path)])
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # nothing partial


def test_unparseable_case_lists_name_the_file_and_position(tmp_path) -> None:
    broken = tmp_path / "dataset.json"
    broken.write_text('{"labels": {"0": "background"},\n "training": [ ,]}')
    with pytest.raises(DataError, match=r"dataset\.json: not valid JSON at line 2, column"):
        discover_cases(broken)
    with pytest.raises(DataError, match=r"dataset\.json: not valid JSON at line 2"):
        LRCDataModule(str(tmp_path))
    bad_csv = tmp_path / "cases.csv"
    bad_csv.write_text('image,label\n"a.nii.gz,b.nii.gz\n')
    with pytest.raises(DataError, match=r"cases\.csv: not valid CSV at line \d"):
        discover_cases(bad_csv)


def test_mismatched_geometry_names_both_files(tmp_path) -> None:
    seg = sitk.ReadImage(str(CT_SEG))
    seg.SetSpacing((3.0, 3.0, 5.0))
    bad = tmp_path / "bad_seg.nii.gz"
    sitk.WriteImage(seg, str(bad))
    with pytest.raises(
        DataError, match=r"example_ct_sm.nii.gz and label .*bad_seg.nii.gz.*spacing"
    ):
        build_entry(Case("ct", CT, bad), PreprocessConfig(modality="ct"))


def test_labels_outside_declared_set(tmp_path) -> None:
    with pytest.raises(DataError, match=r"example_seg.nii.gz: label values \[.*\] are not among"):
        build_entry(
            Case("ct", CT, CT_SEG), PreprocessConfig(modality="ct", allowed_labels=(0, 1, 2))
        )


def test_constant_image_gives_one_superpixel_with_warning(tmp_path) -> None:
    const = tmp_path / "const.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 16, 16), 7, np.int16)), str(const))
    with pytest.warns(UserWarning, match=r"const\.nii\.gz: constant intensities"):
        entry = build_entry(Case("c", const), PreprocessConfig(modality="mr"))
    assert np.all(entry["superpixels"] == 0)


# ---------------------------------------------------------------------------- cache
def test_cache_miss_hit_invalidation_and_resume(tmp_path) -> None:
    cases = _small_ct_cases(tmp_path)
    cache = VolumeCache(tmp_path / "cache", PreprocessConfig(modality="ct", image_size=64))
    assert cache.prepare(cases, progress=False) == {"cached": 0, "built": 3, "skipped": 0}
    assert cache.prepare(cases, progress=False) == {"cached": 3, "built": 0, "skipped": 0}
    vol = cache.load(cases[0])
    assert vol.image.dtype == np.float16 and vol.superpixels.dtype == np.int16
    assert isinstance(vol.image, np.memmap)
    # A parameter change is a different key.
    other = VolumeCache(tmp_path / "cache", PreprocessConfig(modality="ct", image_size=32))
    assert other.entry_dir(cases[0]) != cache.entry_dir(cases[0])
    # Touching an input (new mtime) invalidates only its entry.
    os.utime(cases[1].image, ns=(1, 1))
    assert cache.prepare(cases, progress=False)["built"] == 1
    # An interrupted run (entry missing) resumes with the missing case only.
    shutil.rmtree(cache.entry_dir(cases[2]))
    assert cache.prepare(cases, progress=False) == {"cached": 2, "built": 1, "skipped": 0}


def test_label_corrected_with_same_size_and_preserved_mtime_rebuilds(tmp_path) -> None:
    """``cp -p`` (or ``rsync -a``) of a corrected label over the old one: same size, same
    mtime, new content; the stale entry must not be served."""
    img = sitk.ReadImage(str(CT))
    seg = sitk.ReadImage(str(CT_SEG))
    label, corrected = tmp_path / "seg.nii", tmp_path / "fixed" / "seg.nii"  # uncompressed:
    corrected.parent.mkdir()  # one size for any content
    sitk.WriteImage(sitk.Cast(sitk.Equal(seg, 5), sitk.sitkUInt8), str(label))  # liver
    sitk.WriteImage(sitk.Cast(sitk.Equal(seg, 2) * 2, sitk.sitkUInt8), str(corrected))
    assert label.stat().st_size == corrected.stat().st_size
    os.utime(corrected, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns))
    image = tmp_path / "ct.nii.gz"
    sitk.WriteImage(img, str(image))
    case = Case("ct", image, label)
    cache = VolumeCache(tmp_path / "cache", PreprocessConfig(modality="ct", image_size=122))
    cache.prepare([case], progress=False)
    assert set(np.unique(cache.load(case).label_ids()).tolist()) == {-1, 0, 1}
    mtime = label.stat().st_mtime_ns
    subprocess.run(["cp", "-p", str(corrected), str(label)], check=True)
    assert (label.stat().st_size, label.stat().st_mtime_ns) == (corrected.stat().st_size, mtime)
    assert cache.prepare([case], progress=False)["built"] == 1
    assert set(np.unique(cache.load(case).label_ids()).tolist()) == {-1, 0, 2}


def test_every_preprocessing_option_changes_the_cache_key(tmp_path) -> None:
    """A new PreprocessConfig field, or one dropped from the key, fails here."""
    changed = {
        "modality": "ct",
        "ct_window": "lung",
        "mr_percentiles": (1.0, 99.0),
        "image_size": 64,
        "spacing": (1.0, 1.0),
        "slice_axis": 0,
        "foreground_threshold": 0.1,
        "min_foreground_fraction": 0.05,
        "superpixel_scale": 50.0,
        "superpixel_sigma": 0.5,
        "superpixel_min_size": 20,
        "background_threshold": 0.1,
        "allowed_labels": (0, 1),
        "supervoxels": True,
        "slice_spacing": 2.0,
        "regions": "grid",
        "grid_cell": 8,
    }
    fields = {f.name: f.default for f in dataclasses.fields(PreprocessConfig)}
    assert set(changed) == set(fields), "give every PreprocessConfig field a changed value"
    case = Case("ct", CT, CT_SEG)
    keys = {"default": VolumeCache(tmp_path, PreprocessConfig()).key(case)}
    for name, value in changed.items():
        assert value != fields[name]
        keys[name] = VolumeCache(tmp_path, PreprocessConfig(**{name: value})).key(case)
    same = {k for k, v in keys.items() if list(keys.values()).count(v) > 1}
    assert not same, f"these options do not change the cache key: {sorted(same)}"
    assert VolumeCache(tmp_path, PreprocessConfig(), hash_content=True).key(case) != keys["default"]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_meta"])
def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, damage) -> None:
    cases = _small_ct_cases(tmp_path, 1)
    cache = VolumeCache(tmp_path / "cache", PreprocessConfig(modality="ct", image_size=64))
    cache.prepare(cases, progress=False)
    entry = cache.entry_dir(cases[0])
    good = np.array(cache.load(cases[0]).superpixels)
    target = entry / "superpixels.npy"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "flip_byte":
        data = bytearray(target.read_bytes())
        data[-10] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        (entry / "meta.json").unlink()
    with pytest.warns(UserWarning, match="corrupt: rebuilding"):
        assert cache.prepare(cases, progress=False)["built"] == 1
    np.testing.assert_array_equal(cache.load(cases[0]).superpixels, good)


def test_load_without_entry_is_a_clear_error(tmp_path) -> None:
    cache = VolumeCache(tmp_path / "cache", PreprocessConfig(modality="ct"))
    with pytest.raises(DataError, match="run prepare_data"):
        cache.load(Case("ct", CT))


def test_shards_fill_one_cache_together(tmp_path) -> None:
    cases = _small_ct_cases(tmp_path)
    cache = VolumeCache(tmp_path / "cache", PreprocessConfig(modality="ct", image_size=64))
    a = cache.prepare(cases, shard="0/2", progress=False)
    b = cache.prepare(cases, shard="1/2", progress=False)
    assert a == {"cached": 0, "built": 2, "skipped": 1}
    assert b == {"cached": 0, "built": 1, "skipped": 2}
    assert cache.prepare(cases, progress=False)["cached"] == 3
    with pytest.raises(ValueError, match="i/n"):
        parse_shard("2")
    with pytest.raises(ValueError, match="0 <= i < n"):
        parse_shard("3/3")


def test_parallel_precompute_matches_serial(tmp_path) -> None:
    cases = _small_ct_cases(tmp_path)
    serial = VolumeCache(tmp_path / "a", PreprocessConfig(modality="ct", image_size=64))
    parallel = VolumeCache(tmp_path / "b", PreprocessConfig(modality="ct", image_size=64))
    serial.prepare(cases, processes=1, progress=False)
    parallel.prepare(cases, processes=2, progress=False)
    for c in cases:
        np.testing.assert_array_equal(serial.load(c).superpixels, parallel.load(c).superpixels)


# ---------------------------------------------------------------------------- views
def test_transformed_map_lines_up_with_transformed_image() -> None:
    torch.manual_seed(0)
    h = w = 48
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ids = rows * w + cols  # one id per pixel: its position can be read back from the id
    # Bilinear warping of a linear ramp is exact; the ones channel marks pixels whose four
    # bilinear neighbours all lie inside the input.
    image = torch.stack([rows, cols, torch.ones_like(rows)]).float()
    aug = GeometryAugment(
        crop_scale=(0.4, 0.9), horizontal_flip=0.5, vertical_flip=0.5, max_rotation=15
    )
    for _ in range(10):
        warped, maps = apply_affine(aug.sample(), image, {"superpixels": ids, "label": ids % 3})
        sp = maps["superpixels"]
        r, c = warped[0], warped[1]
        interior = (sp >= 0) & (warped[2] > 1 - 1e-5)
        assert interior.float().mean() > 0.4
        # The nearest-neighbour id sits within half a pixel of the bilinear position.
        assert ((sp[interior] // w).float() - r[interior]).abs().max() <= 0.5 + 1e-4
        assert ((sp[interior] % w).float() - c[interior]).abs().max() <= 0.5 + 1e-4
        # Labels follow the same mapping.
        assert torch.equal(maps["label"][interior], sp[interior] % 3)


def test_paired_views_from_real_cache(tmp_path) -> None:
    dm = LRCDataModule(
        str(DEMO_MR),
        cache_dir=str(tmp_path),
        batch_size=3,
        image_size=64,
        test_cases=1,
        pretrain_with_labels=True,
    )
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image_v1"].shape == (3, 1, 64, 64)
    assert batch["superpixels_v2"].dtype == torch.int64
    assert batch["label_v1"].shape == (3, 64, 64) and batch["label_v1"].max() <= 4
    # Both views come from the same slice: they share super-pixel ids.
    for i in range(3):
        a = set(batch["superpixels_v1"][i].unique().tolist()) - {-1}
        b = set(batch["superpixels_v2"][i].unique().tolist()) - {-1}
        assert len(a & b) >= 1


def test_finetune_and_volume_batches(tmp_path) -> None:
    dm = LRCDataModule(
        str(DEMO_MR),
        cache_dir=str(tmp_path),
        batch_size=2,
        image_size=64,
        mode="finetune",
        test_cases=1,
        val_cases=1,
        labelled_cases=1,
    )
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 64, 64) and batch["label"].shape == (2, 64, 64)
    vol = next(iter(dm.val_dataloader()))
    assert vol["image"].shape[2:] == (1, 64, 64) and vol["label"].shape[0] == 1
    assert {c for c in batch["case_id"]} <= {c.case_id for c in dm.split.labelled}


# ---------------------------------------------------------------------------- splits
def test_patient_level_splits_never_leak_and_are_nested() -> None:
    cases = [Case(f"p{i:02d}", Path(f"p{i}.nii.gz")) for i in range(20)]
    s = split_cases(cases, test_cases=5, val_cases=2, labelled_cases=4, seed=3)
    ids = lambda xs: {c.case_id for c in xs}  # noqa: E731
    assert len(s.test) == 5 and not ids(s.test) & (ids(s.pool) | ids(s.val))
    assert not ids(s.val) & ids(s.pool)
    assert ids(s.labelled) <= ids(s.pool)
    small = split_cases(cases, test_cases=5, val_cases=2, labelled_cases=1, seed=3)
    assert ids(small.labelled) <= ids(s.labelled) and ids(small.test) == ids(s.test)
    assert ids(split_cases(cases, 5, seed=4).test) != ids(s.test)
    frac = split_cases(cases, test_cases=5, labelled_cases=0.2, seed=3)
    assert len(frac.labelled) == 3
    named = split_cases(cases, test_cases=["p00", "p01"])
    assert ids(named.test) == {"p00", "p01"}
    with pytest.raises(ValueError, match="unknown case ids"):
        split_cases(cases, test_cases=["nope"])


def test_full_chaos_dataset_json_lists_twenty_patients() -> None:
    path = shared_path("chaos-t2", "dataset.json")
    assert len(discover_cases(path)) == 20
    labels = json.loads(path.read_text())["labels"]
    assert sorted(map(int, labels)) == [0, 1, 2, 3, 4]
