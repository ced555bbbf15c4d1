"""Finding the cases of a data set: MSD dataset.json, CSV, folders, DICOM series folders."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk

__all__ = ["VOLUME_SUFFIXES", "Case", "DataError", "discover_cases", "read_json"]

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


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
    meta = read_json(path)
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


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``.

    Raises:
        DataError: unreadable, not JSON (naming the line and column), or not an object.
    """
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable ({err})") from err
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _cases_from_csv(path: Path) -> list[Case]:
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh, strict=True)
            try:
                rows = list(reader)
            except csv.Error as err:
                raise DataError(f"{path}: not valid CSV at line {reader.line_num}: {err}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable ({err})") from err
    if not rows or "image" not in rows[0]:
        raise DataError(f"{path}: a CSV of cases needs a header with an 'image' column")
    cases = []
    for row in rows:
        image = (path.parent / row["image"]).resolve()
        label = (path.parent / row["label"]).resolve() if row.get("label") else None
        cases.append(Case(row.get("id") or _case_id(image), image, label))
    _check_unique(cases, str(path))
    return cases
