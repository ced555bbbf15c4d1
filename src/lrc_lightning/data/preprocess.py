"""Pre-processing of one case: read, check, orient, normalise, resample in-plane, segment.

The order, for every case (:func:`build_entry`; the process pool of
:mod:`~lrc_lightning.data.precompute` runs the same steps with super-pixels in parallel):

1. Read image (and label) through SimpleITK, reoriented to LPS without resampling
   (:func:`~lrc_lightning.data.io.read_volume`: a permutation and flips of the voxel grid).
2. **Slice along the acquisition plane.** ``slice_axis="auto"`` takes the through-plane axis
   of the voxel grid: the largest spacing, ties broken by the fewest voxels. Axial CT,
   sagittal or coronal MR and oblique short-axis cardiac MR then all give their native 2D
   images, never a cut across the stack; nothing is resampled through-plane. After the LPS
   reorientation every in-plane axis points to +L, +P or +S, so anatomy is consistently
   oriented: rows and columns keep the (S, P, L) order of the array (axial: rows P,
   columns L; sagittal: S, P; coronal: S, L). An explicit axis (0, 1, 2 of the (z, y, x)
   array) still wins.
3. Intensity normalisation to [0, 1] (:mod:`~lrc_lightning.data.intensity`).
4. **In-plane resampling** (optional ``spacing``, mm per row and column, as nnU-Net
   resamples), then ``image_size``: the slice is scaled so that its longer side is
   ``image_size`` (aspect ratio kept) and padded to a square: image with 0, super-pixel
   maps with -1, labels with :data:`IGNORE_LABEL`. Images bilinear (anti-aliased), label
   maps nearest.
5. Felzenszwalb super-pixels on each unpadded slice.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from lrc_lightning.data.cases import Case, DataError
from lrc_lightning.data.intensity import Modality, normalise
from lrc_lightning.data.io import check_same_geometry, read_volume
from lrc_lightning.superpixels.graph import (
    check_slice_size,
    felzenszwalb,
    felzenszwalb_3d,
    grid_regions,
)

__all__ = [
    "IGNORE_LABEL",
    "PreprocessConfig",
    "ReadCase",
    "SliceAxis",
    "assemble_entry",
    "build_entry",
    "choose_slice_axis",
    "read_case",
    "superpixels_of_slices",
    "supervoxels_of_volume",
]

SliceAxis = int | Literal["auto"]
#: How regions are made: Felzenszwalb's graph (the paper), or a fixed grid (the ablation).
RegionMethod = Literal["felzenszwalb", "grid"]
REGION_METHODS = ("felzenszwalb", "grid")

#: Stored label value of padded (and ignored) pixels; batches carry it as -1.
IGNORE_LABEL = 255

#: Spacings within this relative tolerance count as equal when choosing the slice axis.
_SPACING_TIE = 0.01
#: In-plane spacing ratio above which a warning names the file.
_ANISOTROPY_WARNING = 2.0


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that changes a cache entry."""

    modality: Modality = "mr"
    ct_window: str | tuple[float, float] = "abdomen"
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    image_size: int | None = None
    spacing: tuple[float, float] | None = None
    slice_axis: SliceAxis = "auto"
    foreground_threshold: float = 0.05
    min_foreground_fraction: float = 0.02
    superpixel_scale: float = 100.0
    superpixel_sigma: float = 0.8
    superpixel_min_size: int = 50
    background_threshold: float | None = None
    allowed_labels: tuple[int, ...] | None = None
    #: 3D supervoxels (:func:`~lrc_lightning.superpixels.felzenszwalb_3d`, spacing-aware)
    #: instead of per-slice super-pixels; for LRCDataModule(spatial_dims=3).
    supervoxels: bool = False
    #: Through-plane target spacing in mm: the slices are resampled to it (linear for the
    #: image, nearest for labels) before super-pixels; None keeps the file's slices.
    slice_spacing: float | None = None
    #: "grid": square regions of ``grid_cell`` pixels instead of Felzenszwalb's
    #: (:func:`~lrc_lightning.superpixels.grid_regions`; the superpixel_* options unused).
    regions: RegionMethod = "felzenszwalb"
    grid_cell: int = 16

    def __post_init__(self) -> None:
        if self.slice_axis not in (0, 1, 2, "auto"):
            raise ValueError(f"slice_axis must be 0, 1, 2 or 'auto', got {self.slice_axis!r}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.spacing is not None and (
            len(self.spacing) != 2 or min(float(s) for s in self.spacing) <= 0
        ):
            raise ValueError(f"spacing must be two positive values (rows, columns), got "
                             f"{self.spacing}")  # fmt: skip
        if self.slice_spacing is not None and self.slice_spacing <= 0:
            raise ValueError(f"slice_spacing must be > 0 mm, got {self.slice_spacing}")
        if self.regions not in REGION_METHODS:
            raise ValueError(f"regions must be one of {REGION_METHODS}, got {self.regions!r}")
        if self.grid_cell < 1:
            raise ValueError(f"grid_cell must be >= 1 pixel, got {self.grid_cell}")


def choose_slice_axis(spacing_zyx: tuple[float, ...], shape_zyx: tuple[int, ...]) -> int:
    """The (z, y, x) array axis to slice along: the through-plane axis of the voxel grid.

    Largest spacing; spacings within 1% are a tie, broken by the fewest voxels, then by
    the lowest axis (z first).
    """
    largest = max(spacing_zyx)
    tied = [a for a in range(3) if spacing_zyx[a] >= largest * (1 - _SPACING_TIE)]
    return min(tied, key=lambda a: (shape_zyx[a], a))


@dataclass
class ReadCase:
    """One case after steps 1-4, before super-pixels and padding."""

    case: Case
    image: np.ndarray  # (S, h, w) float32 in [0, 1], contiguous, unpadded
    label: np.ndarray | None  # (S, h, w) uint8
    spacing: list[float]  # (through-plane, row, column) mm after resampling
    slice_axis: int  # of the LPS (z, y, x) array
    padded_size: tuple[int, int] | None  # (H, W) after padding, None without image_size


def _read_label(case: Case, image: sitk.Image, config: PreprocessConfig) -> np.ndarray | None:
    """The label map of ``case`` as uint8, every value checked.

    :data:`IGNORE_LABEL` is the package's own padding value: a file that holds it (a 0/255
    binary mask, a common export) would otherwise lose that structure to "ignore" without
    a word, so it is an error like any value outside the declared labels.
    """
    if case.label is None:
        return None
    label = read_volume(case.label)
    check_same_geometry(image, label, case.image, case.label)
    label_arr = sitk.GetArrayFromImage(label)
    if np.issubdtype(label_arr.dtype, np.floating):
        if not np.all(label_arr == np.round(label_arr)):
            raise DataError(f"{case.label}: label map has non-integer values")
    values = np.unique(label_arr)
    remap = (
        "remap the file's values to the labels (e.g. 0/255 masks to 0/1: "
        "sitk.WriteImage(sitk.Cast(label > 0, sitk.sitkUInt8), path))"
    )
    if values.min() < 0 or values.max() >= IGNORE_LABEL:
        found = [v for v in values.tolist() if v < 0 or v >= IGNORE_LABEL]
        raise DataError(
            f"{case.label}: label values must lie in 0..{IGNORE_LABEL - 1} ({IGNORE_LABEL} "
            f"is reserved for padding, which is ignored), found {_listed(found)}; {remap}"
        )
    if config.allowed_labels is not None:
        extra = sorted(set(values.tolist()) - set(config.allowed_labels))
        if extra:
            raise DataError(
                f"{case.label}: label values {_listed(extra)} are not among the declared "
                f"labels {list(config.allowed_labels)} (LRCDataModule(labels=...) or the "
                f"'labels' of dataset.json); {remap}, or declare them"
            )
    return label_arr.astype(np.uint8)


def _listed(values: list[Any], limit: int = 10) -> str:
    """``values`` as a list for a message: the first ``limit`` and a count of the rest."""
    shown = ", ".join(str(int(v) if float(v).is_integer() else v) for v in values[:limit])
    more = f", ... ({len(values)} in all)" if len(values) > limit else ""
    return f"[{shown}{more}]"


def _resample_slices(volume: np.ndarray, count: int, label: bool) -> np.ndarray:
    """(S, h, w) -> (count, h, w) along the slice axis: nearest for label maps, linear
    (between slice centres) otherwise."""
    if len(volume) == count:
        return volume
    t = torch.from_numpy(np.ascontiguousarray(volume))[None, None].float()
    size = (count, *volume.shape[1:])
    if label:
        out = F.interpolate(t, size=size, mode="nearest-exact")
        return np.ascontiguousarray(out[0, 0].numpy().astype(volume.dtype))
    out = F.interpolate(t, size=size, mode="trilinear", align_corners=False)
    return np.ascontiguousarray(np.clip(out[0, 0].numpy(), 0.0, 1.0))


def _resize(slices: np.ndarray, size: tuple[int, int], label: bool) -> np.ndarray:
    """(S, h, w) -> (S, *size): nearest for label maps, anti-aliased bilinear otherwise."""
    if slices.shape[1:] == size:
        return slices
    t = torch.from_numpy(np.ascontiguousarray(slices)).unsqueeze(1)
    if label:
        out = F.interpolate(t.float(), size=size, mode="nearest-exact")
        return out.squeeze(1).numpy().astype(slices.dtype)
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    return np.clip(out.squeeze(1).numpy(), 0.0, 1.0)


def _in_plane_size(
    shape: tuple[int, int], spacing: tuple[float, float], config: PreprocessConfig
) -> tuple[tuple[int, int], tuple[float, float]]:
    """Slice size and spacing after ``spacing`` resampling and ``image_size`` fitting."""
    h, w = shape
    sy, sx = spacing
    if config.spacing is not None:
        ty, tx = (float(s) for s in config.spacing)
        h, w = max(1, round(h * sy / ty)), max(1, round(w * sx / tx))
        sy, sx = ty, tx
    if config.image_size is not None:
        scale = config.image_size / max(h, w)
        new_h = min(config.image_size, max(1, round(h * scale)))
        new_w = min(config.image_size, max(1, round(w * scale)))
        sy, sx = sy * h / new_h, sx * w / new_w
        h, w = new_h, new_w
    return (h, w), (sy, sx)


def read_case(
    case: Case, config: PreprocessConfig, read_image: Any = read_volume
) -> ReadCase:
    """Steps 1-4 of the module docstring for one case (``read_image(path, series)`` reads
    the image: :func:`~lrc_lightning.data.io.read_volume` or a parallel DICOM reader)."""
    image = read_image(case.image, case.series)
    arr = sitk.GetArrayFromImage(image)  # (z, y, x), LPS
    label_arr = _read_label(case, image, config)
    spacing_zyx = tuple(reversed(image.GetSpacing()))
    axis = (
        choose_slice_axis(spacing_zyx, arr.shape)
        if config.slice_axis == "auto"
        else int(config.slice_axis)
    )
    in_plane = [a for a in range(3) if a != axis]
    row_spacing, col_spacing = (float(spacing_zyx[a]) for a in in_plane)
    size, (sy, sx) = _in_plane_size(
        tuple(arr.shape[a] for a in in_plane), (row_spacing, col_spacing), config
    )
    if not config.supervoxels:  # before normalising: a slice too large is an OOM kill later
        try:
            check_slice_size(size)
        except ValueError as err:
            raise DataError(f"{case.image}: super-pixels: {err}") from err
    ratio = max(row_spacing, col_spacing) / min(row_spacing, col_spacing)
    if ratio > _ANISOTROPY_WARNING and config.spacing is None:
        warnings.warn(
            f"{case.image}: slices along axis {axis} have in-plane spacing "
            f"{row_spacing:.3g} x {col_spacing:.3g} mm ({ratio:.1f}:1); is slice_axis right? "
            "(slice_axis='auto' takes the through-plane axis; spacing=(r, c) resamples)",
            stacklevel=2,
        )
    norm = normalise(arr, config.modality, config.ct_window, config.mr_percentiles, str(case.image))
    norm = np.moveaxis(norm, axis, 0)
    if label_arr is not None:
        label_arr = np.moveaxis(label_arr, axis, 0)
    norm = _resize(norm, size, label=False)
    if label_arr is not None:
        label_arr = np.ascontiguousarray(_resize(label_arr, size, label=True))
    slice_spacing = float(spacing_zyx[axis])
    if config.slice_spacing is not None:
        count = max(1, round(len(norm) * slice_spacing / config.slice_spacing))
        slice_spacing = slice_spacing * len(norm) / count
        norm = _resample_slices(norm, count, label=False)
        if label_arr is not None:
            label_arr = _resample_slices(label_arr, count, label=True)
    padded = (config.image_size, config.image_size) if config.image_size is not None else None
    return ReadCase(
        case=case,
        image=np.ascontiguousarray(norm, dtype=np.float32),
        label=label_arr,
        spacing=[slice_spacing, sy, sx],
        slice_axis=axis,
        padded_size=padded,
    )


def supervoxels_of_volume(
    image: np.ndarray, spacing: list[float], config: PreprocessConfig, source: str = "volume"
) -> np.ndarray:
    """Supervoxels of a (S, h, w) volume with its (S, h, w)-axis spacing (numba only).

    Raises:
        DataError: the volume cannot be segmented (e.g. too many voxels); names ``source``.
    """
    if config.regions == "grid":
        return grid_regions(image, config.grid_cell, config.background_threshold)
    try:
        return felzenszwalb_3d(
            image,
            config.superpixel_scale,
            config.superpixel_sigma,
            config.superpixel_min_size,
            spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
            background_threshold=config.background_threshold,
        )
    except ValueError as err:
        raise DataError(f"{source}: supervoxels: {err}") from err


def superpixels_of_slices(images: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Felzenszwalb super-pixels (or grid regions) of (k, h, w) slices (numba only, no
    torch: pool-safe)."""
    if config.regions == "grid":
        return np.stack([grid_regions(s, config.grid_cell, config.background_threshold)
                         for s in images])  # fmt: skip
    return np.stack(
        [
            felzenszwalb(
                s,
                config.superpixel_scale,
                config.superpixel_sigma,
                config.superpixel_min_size,
                config.background_threshold,
            )
            for s in images
        ]
    )


def _pad(slices: np.ndarray, size: tuple[int, int] | None, value: float) -> np.ndarray:
    """Centre (S, h, w) in (S, *size), filling with ``value``."""
    if size is None or slices.shape[1:] == size:
        return slices
    h, w = slices.shape[1:]
    top, left = (size[0] - h) // 2, (size[1] - w) // 2
    out = np.full((len(slices), *size), value, dtype=slices.dtype)
    out[:, top : top + h, left : left + w] = slices
    return out


def assemble_entry(
    read: ReadCase, superpixels: np.ndarray, config: PreprocessConfig
) -> dict[str, Any]:
    """The arrays and metadata of a cache entry (step 5's output padded like the image)."""
    norm, label_arr = read.image, read.label
    foreground = (norm > config.foreground_threshold).mean(axis=(1, 2))
    kept = [int(i) for i in np.flatnonzero(foreground >= config.min_foreground_fraction)]
    n_regions = superpixels.reshape(len(norm), -1).max(1) + 1
    sp_dtype = np.int16 if superpixels.max() < np.iinfo(np.int16).max else np.int32
    image = _pad(norm, read.padded_size, 0.0)
    arrays: dict[str, Any] = {
        "image": image.astype(np.float16),
        "superpixels": _pad(superpixels.astype(sp_dtype), read.padded_size, -1),
    }
    if label_arr is not None:
        arrays["label"] = _pad(label_arr, read.padded_size, IGNORE_LABEL)
    if config.supervoxels:
        n_regions = np.array([int(superpixels.max()) + 1])  # ids span the volume
    arrays["meta"] = {
        "case_id": read.case.case_id,
        "image_file": str(read.case.image),
        "label_file": str(read.case.label) if read.case.label else None,
        "shape": list(image.shape),
        "content_shape": list(norm.shape),
        "slice_axis": read.slice_axis,
        "spacing": read.spacing,
        "kept_slices": kept,
        "regions_per_slice": {
            "min": int(n_regions.min()),
            "median": float(np.median(n_regions)),
            "max": int(n_regions.max()),
        },
    }
    return arrays


def build_entry(case: Case, config: PreprocessConfig) -> dict[str, Any]:
    """Read, normalise, resample and segment one case (no I/O to the cache)."""
    read = read_case(case, config)
    if config.supervoxels:
        supervoxels = supervoxels_of_volume(read.image, read.spacing, config, str(case.image))
        return assemble_entry(read, supervoxels, config)
    return assemble_entry(read, superpixels_of_slices(read.image, config), config)
