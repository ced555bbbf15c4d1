"""Finding the cases of a data set: MSD dataset.json, CSV, folders, DICOM series folders."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk

__all__ = [
    "VOLUME_SUFFIXES",
    "Case",
    "DataError",
    "DicomSeries",
    "discover_cases",
    "read_json",
    "select_dicom_series",
]

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

#: ``dicom_series`` policies (anything else is a SeriesInstanceUID).
LARGEST_SERIES, EACH_SERIES = "largest", "all"


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


@dataclass(frozen=True)
class Case:
    """One patient/volume: an image and optionally its label map."""

    case_id: str
    image: Path
    label: Path | None = None
    #: For a DICOM folder holding several series: the SeriesInstanceUID to read, or
    #: ``"largest"`` (see :func:`select_dicom_series`); None: the folder must hold one.
    series: str | None = None


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder: its files sorted along the slice normal."""

    uid: str
    description: str
    files: tuple[str, ...]


def _series_description(file: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
        return reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""
    except RuntimeError:
        return ""


def _series_of(folder: Path, uids: list[str] | None = None) -> list[DicomSeries]:
    uids = uids if uids is not None else list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    series = []
    for uid in uids:
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        series.append(DicomSeries(uid, _series_description(files[0]) if files else "", files))
    return series


def _series_listing(series: list[DicomSeries]) -> str:
    return "; ".join(
        f"{s.uid}" + (f" ({s.description!r})" if s.description else "") + f": {len(s.files)} "
        + ("slice" if len(s.files) == 1 else "slices")
        for s in series
    )  # fmt: skip


def select_dicom_series(folder: Path, choice: str | None) -> list[DicomSeries]:
    """The series of DICOM folder ``folder`` that ``choice`` asks for.

    Scanners export a localizer (scout) next to the diagnostic series, or several
    reconstructions, into one folder; which one to use is never guessed.

    Args:
        folder: a folder of DICOM files.
        choice: None: the folder's only series (an error when it holds several);
            ``"largest"``: the series with the most slices (an error on a tie);
            ``"all"``: every series; else a SeriesInstanceUID (0020,000E).

    Raises:
        DataError: no series, several series with ``choice=None``, a tie for "largest" or
            an unknown UID; the message lists each series (UID, SeriesDescription, slices).
    """
    uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not uids:
        raise DataError(f"{folder}: folder holds no DICOM series")
    how = (
        "choose with dicom_series=<SeriesInstanceUID>, 'largest' (the most slices) or 'all' "
        "(one case per series), or a 'series' column in a CSV of cases"
    )
    if choice is None:
        series = _series_of(folder, uids)
        if len(series) == 1:
            return series
        raise DataError(
            f"{folder}: holds {len(series)} DICOM series ({_series_listing(series)}); {how}"
        )
    if choice == EACH_SERIES:
        return _series_of(folder, uids)
    if choice == LARGEST_SERIES:
        series = _series_of(folder, uids)
        most = max(len(s.files) for s in series)
        top = [s for s in series if len(s.files) == most]
        if len(top) > 1:
            raise DataError(
                f"{folder}: dicom_series='largest' is ambiguous: {len(top)} series have {most} "
                f"slices ({_series_listing(series)}); choose one by its SeriesInstanceUID"
            )
        return top
    if choice not in uids:
        raise DataError(
            f"{folder}: no DICOM series with SeriesInstanceUID {choice!r}; the folder holds "
            f"{_series_listing(_series_of(folder, uids))}; {how}"
        )
    return _series_of(folder, [choice])


def _is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def _case_id(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_series_choice(dicom_series: str | None) -> None:
    if dicom_series is not None and (not isinstance(dicom_series, str) or not dicom_series):
        raise ValueError(
            "dicom_series must be None, 'largest', 'all' or a SeriesInstanceUID, got "
            f"{dicom_series!r}"
        )


def _image_cases(
    case_id: str,
    image: Path,
    label: Path | None,
    series: str | None,
    where: Path | None = None,
    dicom_only: bool = False,
) -> list[Case]:
    """The case(s) of one image path; a DICOM folder is checked for several series here
    (``where``: the CSV or JSON that names it, for the message). ``dicom_only``: a folder
    without DICOM series gives no case (when listing a folder's entries)."""
    if not image.is_dir():  # a file, or a missing path (reading names it)
        return [Case(case_id, image, label)]
    uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(image)))
    if not uids and dicom_only:
        return []
    if not uids or (len(uids) == 1 and series in (None, LARGEST_SERIES, EACH_SERIES)):
        return [Case(case_id, image, label)]  # one series (or none: reading says so)
    try:
        chosen = select_dicom_series(image, series)
    except DataError as err:
        raise DataError(f"{where}: {err}" if where else str(err)) from err
    if len(chosen) == 1:
        return [Case(case_id, image, label, chosen[0].uid)]
    if label is not None:
        raise DataError(
            f"{where or image}: dicom_series='all' makes one case per series of {image}, "
            f"but one label ({label}) is given for all {len(chosen)}; choose the labelled "
            "series by its SeriesInstanceUID (a 'series' column in a CSV)"
        )
    return [Case(f"{case_id}-{s.uid}", image, None, s.uid) for s in chosen]


def discover_cases(
    data: str | Path | list[str] | list[Path], dicom_series: str | None = None
) -> list[Case]:
    """Resolve the ``data`` argument of :class:`LRCDataModule` into cases.

    Accepts: an MSD ``dataset.json`` (or a folder holding one: images and labels from its
    ``training`` list), a CSV with columns ``image`` and optionally ``label``, ``id`` and
    ``series`` (paths relative to the CSV; ``series``: the SeriesInstanceUID to read from a
    DICOM folder), a folder of volume files and/or DICOM series folders, a single file or
    DICOM folder, or a list of any of these paths.

    Args:
        data: see above.
        dicom_series: which series of a DICOM folder that holds several (a localizer next
            to the axial series, say): None (default) makes that an error listing each
            series (SeriesInstanceUID, SeriesDescription, slice count); ``"largest"``
            takes the series with the most slices; ``"all"`` makes one case per series
            (id ``<folder>-<SeriesInstanceUID>``); a SeriesInstanceUID takes that series
            (every DICOM folder must hold it; a CSV's ``series`` column chooses per
            row). Folders with one series are read as they are.

    Raises:
        DataError: a missing or unreadable input, duplicate case ids, or a DICOM folder
            with several series and no choice (see :func:`select_dicom_series`).
    """
    _check_series_choice(dicom_series)
    if isinstance(data, (list, tuple)):
        cases = [c for item in data for c in discover_cases(item, dicom_series)]
        _check_unique(cases, "the list of inputs")
        return cases
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir() and (path / "dataset.json").is_file():
        path = path / "dataset.json"
    if path.suffix == ".json":
        return _cases_from_msd(path, dicom_series)
    if path.suffix.lower() == ".csv":
        return _cases_from_csv(path, dicom_series)
    if _is_volume_file(path):
        return [Case(_case_id(path), path)]
    if path.is_dir():
        as_series = _image_cases(_case_id(path), path, None, dicom_series, dicom_only=True)
        if as_series:
            return as_series
        found = [
            c
            for p in sorted(path.iterdir())
            if _is_volume_file(p) or p.is_dir()
            for c in _image_cases(_case_id(p), p, None, dicom_series, dicom_only=True)
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


def _cases_from_msd(path: Path, dicom_series: str | None) -> list[Case]:
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
        cases += _image_cases(_case_id(image), image, label, dicom_series, path)
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


def _cases_from_csv(path: Path, dicom_series: str | None) -> list[Case]:
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
        series = row.get("series") or dicom_series
        cases += _image_cases(row.get("id") or _case_id(image), image, label, series, path)
    _check_unique(cases, str(path))
    return cases
