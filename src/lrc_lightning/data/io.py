"""Reading medical volumes through SimpleITK, with checks that name the file."""

from __future__ import annotations

import gzip
import itertools
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lrc_lightning.data.cases import DataError, select_dicom_series

__all__ = ["check_same_geometry", "checked_volume", "read_volume"]

#: Every volume is reoriented to this (ITK's identity direction): arrays are (z, y, x) with
#: axial slices along axis 0, whatever the file's orientation.
CANONICAL_ORIENTATION = "LPS"


#: NIfTI float datatypes (header code -> numpy dtype) whose NaN/inf ITK replaces by 0.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_layout(header: bytes) -> tuple[str, str, int] | None:
    """(byte order, float dtype, data offset) of a NIfTI-1/2 float volume, else None."""
    for order in "<>":
        if len(header) >= 4 and struct.unpack(order + "i", header[:4])[0] == 348:
            if len(header) < 112:
                return None
            datatype = struct.unpack(order + "h", header[70:72])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
        elif len(header) >= 4 and struct.unpack(order + "i", header[:4])[0] == 540:
            if len(header) < 176:
                return None
            datatype = struct.unpack(order + "h", header[12:14])[0]
            offset = int(struct.unpack(order + "q", header[168:176])[0])
        else:
            continue
        kind = _NIFTI_FLOATS.get(datatype)
        return (order, kind, offset) if kind else None
    return None


def _check_nifti_spacing(header: bytes, path: Path) -> None:
    """Raise unless the raw header's voxel sizes (``pixdim[1..3]``) are positive and finite.

    ITK's NIfTI reader turns a zero or NaN ``pixdim`` into 1 mm and a negative one into its
    absolute value with a flipped axis, without a word; a wrong spacing then picks the
    wrong slice plane (``slice_axis="auto"``) and wrong super-pixel and patch sizes. The
    value is only visible in the bytes (ITK's metadata shows the repaired one).
    """
    for order in "<>":
        if len(header) >= 4 and struct.unpack(order + "i", header[:4])[0] == 348:
            if len(header) < 108:
                return
            dim = struct.unpack(order + "8h", header[40:56])
            pixdim = struct.unpack(order + "8f", header[76:108])
        elif len(header) >= 4 and struct.unpack(order + "i", header[:4])[0] == 540:
            if len(header) < 168:
                return
            dim = struct.unpack(order + "8q", header[16:80])
            pixdim = struct.unpack(order + "8d", header[104:168])
        else:
            continue
        bad = [
            f"pixdim[{i}] = {pixdim[i]:g}"
            for i in range(1, min(max(int(dim[0]), 1), 3) + 1)
            if not (np.isfinite(pixdim[i]) and pixdim[i] > 0)
        ]
        if bad:
            raise DataError(
                f"{path}: invalid voxel spacing in the NIfTI header ({', '.join(bad)}; "
                "spacings must be positive millimetres, and SimpleITK would silently read "
                "1 mm or flip the axis); rewrite the file with its true spacing (e.g. "
                "image.SetSpacing(...) and sitk.WriteImage, or nibabel's header.set_zooms)"
            )
        return


def _scan_nifti(path: Path) -> int:
    """Read a ``.nii``/``.nii.gz`` file once, raw: check its header's voxel spacing and that
    its gzip stream is complete, and count its NaN/inf voxels (float data only).

    ITK's NIfTI reader zero-fills a truncated ``.nii.gz`` and replaces NaN and inf by 0
    without a word, so both must be seen in the bytes themselves.

    Raises:
        DataError: a truncated or corrupt gzip stream, a bad voxel spacing.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    nonfinite = 0
    try:
        with opener(path, "rb") as fh:
            head = fh.read(544)
            _check_nifti_spacing(head, path)
            layout = _nifti_layout(head)
            if layout is None:
                while fh.read(1 << 24):  # integer data: only the stream is checked
                    pass
                return 0
            order, kind, offset = layout
            dtype = np.dtype(order + kind)
            pending = head[offset:] if offset < len(head) else b""
            if offset > len(head):
                fh.read(offset - len(head))
            while True:
                chunk = fh.read(1 << 24)
                data = pending + chunk
                usable = len(data) - len(data) % dtype.itemsize
                if usable:
                    values = np.frombuffer(data[:usable], dtype=dtype)
                    nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
                pending = data[usable:]
                if not chunk:
                    return nonfinite
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(f"{path}: unreadable or truncated volume (gzip stream: {err})") from err


def read_volume(path: str | Path, series: str | None = None) -> sitk.Image:
    """Read a 3D volume (file or DICOM series folder), reoriented to LPS.

    Args:
        path: a volume file or a folder of DICOM files.
        series: for a folder holding several DICOM series, the SeriesInstanceUID to read
            or ``"largest"`` (:func:`~lrc_lightning.data.cases.select_dicom_series`).

    Raises:
        DataError: missing or unreadable file, not 3D, or non-finite voxels; a DICOM
            folder with several series and no ``series``.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        if path.is_dir():
            image = _read_series(dicom_series_files(path, series), path)
        else:
            name = path.name.lower()
            if name.endswith((".nii", ".nii.gz")):
                nonfinite = _scan_nifti(path)
                if nonfinite:
                    raise DataError(
                        f"{path}: contains {nonfinite} NaN or inf voxels (SimpleITK's NIfTI "
                        "reader would silently read them as 0); fix or mask them in the file"
                    )
            elif name.endswith(".gz"):
                _scan_nifti(path)  # the gzip stream only
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
    if not all(np.isfinite(s) and s > 0 for s in image.GetSpacing()):
        raise DataError(
            f"{path}: invalid voxel spacing {image.GetSpacing()} (must be positive mm); "
            "rewrite the file with its true spacing"
        )
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


def dicom_series_files(path: Path, series: str | None = None) -> list[str]:
    """The files of the DICOM series in folder ``path``, sorted along the slice normal.

    ``series``: None (the folder must hold one series), a SeriesInstanceUID or
    ``"largest"``; never a silent pick among several (ITK alone would take the series with
    the lowest UID, a 3-slice localizer as readily as the axial series).

    Raises:
        DataError: no series, or not exactly one series chosen (the message lists them).
    """
    chosen = select_dicom_series(path, series)
    if len(chosen) != 1:
        raise DataError(
            f"{path}: dicom_series={series!r} chooses {len(chosen)} series; one is read "
            "per case (discover_cases makes one case per series with 'all')"
        )
    return list(chosen[0].files)


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
