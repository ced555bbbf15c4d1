"""Reading medical volumes through SimpleITK, with checks that name the file."""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

__all__ = [
    "Case",
    "DataError",
    "VOLUME_SUFFIXES",
    "check_same_geometry",
    "checked_volume",
    "discover_cases",
    "read_volume",
]

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

#: Every volume is reoriented to this (ITK's identity direction): arrays are (z, y, x) with
#: axial slices along axis 0, whatever the file's orientation.
CANONICAL_ORIENTATION = "LPS"


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


@dataclass(frozen=True)
class Case:
    """One patient/volume: an image and optionally its label map."""

    case_id: str
    image: Path
    label: Path | None = None


def _is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def _case_id(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_dicom_dir(path: Path) -> bool:
    return path.is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def discover_cases(data: str | Path | list[str] | list[Path]) -> list[Case]:
    """Resolve the ``data`` argument of :class:`LRCDataModule` into cases.

    Accepts: an MSD ``dataset.json`` (or a folder holding one: images and labels from its
    ``training`` list), a CSV with columns ``image`` and optionally ``label`` and ``id``
    (paths relative to the CSV), a folder of volume files and/or DICOM series folders, a
    single file or DICOM folder, or a list of any of these paths.
    """
    if isinstance(data, (list, tuple)):
        cases = [c for item in data for c in discover_cases(item)]
        _check_unique(cases, "the list of inputs")
        return cases
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir() and (path / "dataset.json").is_file():
        path = path / "dataset.json"
    if path.suffix == ".json":
        return _cases_from_msd(path)
    if path.suffix.lower() == ".csv":
        return _cases_from_csv(path)
    if _is_volume_file(path) or _is_dicom_dir(path):
        return [Case(_case_id(path), path)]
    if path.is_dir():
        found = [
            Case(_case_id(p), p)
            for p in sorted(path.iterdir())
            if _is_volume_file(p) or _is_dicom_dir(p)
        ]
        if not found:
            raise DataError(
                f"{path}: empty folder: no {', '.join(VOLUME_SUFFIXES)} file, DICOM series or "
                "dataset.json found"
            )
        _check_unique(found, str(path))
        return found
    raise DataError(
        f"{path}: not a volume ({', '.join(VOLUME_SUFFIXES)}), DICOM folder, CSV or JSON"
    )


def _check_unique(cases: list[Case], where: str) -> None:
    seen: dict[str, Path] = {}
    for c in cases:
        if c.case_id in seen:
            raise DataError(
                f"{where}: case id {c.case_id!r} appears twice ({seen[c.case_id]}, {c.image})"
            )
        seen[c.case_id] = c.image


def _cases_from_msd(path: Path) -> list[Case]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable dataset.json ({err})") from err
    entries = meta.get("training")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: no 'training' list in dataset.json")
    cases = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry:
            raise DataError(f"{path}: training entry {i} has no 'image'")
        image = (path.parent / entry["image"]).resolve()
        label = (path.parent / entry["label"]).resolve() if entry.get("label") else None
        cases.append(Case(_case_id(image), image, label))
    _check_unique(cases, str(path))
    return cases


def _cases_from_csv(path: Path) -> list[Case]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "image" not in rows[0]:
        raise DataError(f"{path}: a CSV of cases needs a header with an 'image' column")
    cases = []
    for row in rows:
        image = (path.parent / row["image"]).resolve()
        label = (path.parent / row["label"]).resolve() if row.get("label") else None
        cases.append(Case(row.get("id") or _case_id(image), image, label))
    _check_unique(cases, str(path))
    return cases


def _check_gzip_complete(path: Path) -> None:
    # ITK's NIfTI reader fills a truncated .nii.gz with zeros without an error: check the
    # gzip stream ourselves (a full decompression pass, ~30 ms per MB of file).
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(f"{path}: unreadable or truncated volume (gzip stream: {err})") from err


def read_volume(path: str | Path) -> sitk.Image:
    """Read a 3D volume (file or DICOM series folder), reoriented to LPS.

    Raises:
        DataError: missing or unreadable file, not 3D, or non-finite voxels.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        if path.is_dir():
            image = _read_series(dicom_series_files(path), path)
        else:
            if path.name.lower().endswith(".gz"):
                _check_gzip_complete(path)
            image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise _unreadable(path, err) from err
    return checked_volume(image, path)


def _unreadable(path: Path, err: Exception) -> DataError:
    first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
    return DataError(f"{path}: unreadable or truncated volume ({first})")


def checked_volume(image: sitk.Image, path: Path) -> sitk.Image:
    """Check a freshly read volume and reorient it to LPS (``read_volume``'s last step)."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{path}: expected a 3D single-channel volume, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s), size {image.GetSize()}"
        )
    if min(image.GetSize()) < 1:
        raise DataError(f"{path}: empty volume of size {image.GetSize()}")
    image = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
    arr = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise DataError(
                f"{path}: contains NaN or inf voxels ({int((~np.isfinite(arr)).sum())})"
            )
    return image


# ---------------------------------------------------------------- DICOM in parallel
# Decoding a compressed DICOM series (JPEG 2000 CT, say) is serial inside ITK and can
# dominate pre-computation. A series is therefore decoded in contiguous blocks of its
# sorted files by pool workers, then put back together here: only when the blocks agree on
# pixel type, in-plane geometry and a uniform slice spacing, else the caller reads the
# series in one piece, so the result is always what ``read_volume`` gives.


def dicom_series_files(path: Path) -> list[str]:
    """The files of the DICOM series in folder ``path``, sorted along the slice normal."""
    names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)))
    if not names:
        raise DataError(f"{path}: folder holds no DICOM series")
    return names


@dataclass(frozen=True)
class DicomBlock:
    """Slices ``names`` of a series, decoded: (k, y, x) array and the block's geometry."""

    array: np.ndarray
    origin: tuple[float, ...]
    spacing: tuple[float, ...]
    direction: tuple[float, ...]


def _read_series(names: list[str], folder: Path) -> sitk.Image:
    """Decode DICOM files (sorted along the slice normal); raise on missing slices.

    GDCM leaves out a file it cannot parse and ITK then only warns about the gap, which
    would give a volume with silently missing slices: the positions are checked here.
    """
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    try:
        positions = [
            [float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
            for i in range(len(names))
        ]
    except (RuntimeError, ValueError):  # no or malformed Image Position: nothing to check
        return image
    if len(positions) >= 3:
        normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
        steps = np.diff(np.array(positions) @ normal)
        step = float(np.median(steps))
        bad = np.flatnonzero(np.abs(steps - step) > 0.1 * abs(step) + 1e-3)
        if len(bad):
            i = int(bad[0])
            raise DataError(
                f"{folder}: DICOM series has missing or unevenly spaced slices: "
                f"{steps[i]:.3g} mm between {Path(names[i]).name} and "
                f"{Path(names[i + 1]).name}, {step:.3g} mm elsewhere (an unreadable file "
                "is left out of the series: check the folder's files)"
            )
    return image


def read_dicom_block(folder: str, names: list[str]) -> DicomBlock:
    """Decode consecutive files of one series (a pool worker's task; at least 2 files,
    so ITK measures the slice spacing from positions rather than trusting a tag)."""
    try:
        image = _read_series(names, Path(folder))
    except RuntimeError as err:
        raise _unreadable(Path(folder), err) from err
    return DicomBlock(
        sitk.GetArrayFromImage(image), image.GetOrigin(), image.GetSpacing(), image.GetDirection()
    )


def dicom_blocks(names: list[str], count: int, min_slices: int = 4) -> list[list[str]]:
    """Split sorted series files into at most ``count`` contiguous blocks of at least
    ``min_slices`` (>= 2) files; a single block means: read it whole."""
    count = max(1, min(count, len(names) // max(2, min_slices)))
    bounds = [round(i * len(names) / count) for i in range(count + 1)]
    return [names[a:b] for a, b in itertools.pairwise(bounds)]


def assemble_dicom_blocks(blocks: list[DicomBlock], tolerance: float = 1e-3) -> sitk.Image | None:
    """One image from consecutive blocks, or None when they do not fit together as a
    uniformly spaced series (then read the series whole, as ``read_volume`` does)."""
    first = blocks[0]
    if any(
        b.array.dtype != first.array.dtype
        or b.array.shape[1:] != first.array.shape[1:]
        or not np.allclose(b.direction, first.direction, atol=tolerance)
        or not np.allclose(b.spacing, first.spacing, rtol=tolerance, atol=0)
        for b in blocks[1:]
    ):
        return None
    direction = np.array(first.direction).reshape(3, 3)
    step = first.spacing[2] * direction[:, 2]  # one slice along the normal, in mm
    offset = 0
    for b in blocks:
        expected = np.array(first.origin) + offset * step
        if not np.allclose(b.origin, expected, atol=tolerance * 10 * max(first.spacing)):
            return None
        offset += b.array.shape[0]
    image = sitk.GetImageFromArray(np.concatenate([b.array for b in blocks]))
    image.SetOrigin(first.origin)
    image.SetSpacing(first.spacing)
    image.SetDirection(first.direction)
    return image


def check_same_geometry(
    image: sitk.Image,
    label: sitk.Image,
    image_path: Path,
    label_path: Path,
    tolerance: float = 1e-3,
) -> None:
    """Raise :class:`DataError` naming both files unless size, spacing, origin and
    direction agree (spacing/origin within ``tolerance`` relative to the spacing)."""
    problems = []
    if image.GetSize() != label.GetSize():
        problems.append(f"size {image.GetSize()} vs {label.GetSize()}")
    sp_i, sp_l = np.array(image.GetSpacing()), np.array(label.GetSpacing())
    if not np.allclose(sp_i, sp_l, rtol=tolerance, atol=0):
        problems.append(f"spacing {tuple(sp_i)} vs {tuple(sp_l)}")
    if not np.allclose(
        image.GetOrigin(), label.GetOrigin(), atol=tolerance * float(sp_i.max()) * 10
    ):
        problems.append(f"origin {image.GetOrigin()} vs {label.GetOrigin()}")
    if not np.allclose(image.GetDirection(), label.GetDirection(), atol=tolerance):
        problems.append(f"direction {image.GetDirection()} vs {label.GetDirection()}")
    if problems:
        raise DataError(
            f"image {image_path} and label {label_path} do not share a geometry: "
            + "; ".join(problems)
        )
