"""Reading medical volumes through SimpleITK, with checks that name the file."""

from __future__ import annotations

import csv
import gzip
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
            reader = sitk.ImageSeriesReader()
            names = reader.GetGDCMSeriesFileNames(str(path))
            if not names:
                raise DataError(f"{path}: folder holds no DICOM series")
            reader.SetFileNames(names)
            image = reader.Execute()
        else:
            if path.name.lower().endswith(".gz"):
                _check_gzip_complete(path)
            image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        raise DataError(f"{path}: unreadable or truncated volume ({first})") from err
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
