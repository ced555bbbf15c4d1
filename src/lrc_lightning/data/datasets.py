"""Torch datasets over cached volumes: paired pre-training views, labelled slices, volumes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, WeightedRandomSampler

from lrc_lightning.data.cache import CachedVolume
from lrc_lightning.data.cases import DataError
from lrc_lightning.data.transforms import (
    GeometryAugment,
    IntensityAugment,
    MirrorLabels,
    apply_affine,
    is_reflection,
)

__all__ = [
    "LabelledSlices",
    "PairedViewSlices",
    "Volumes",
    "foreground_sampler",
    "require_left_right_columns",
    "sagittal_mirror_error",
]

#: Slice axis (of the LPS (z, y, x) array) whose slices have rows and columns (S, P): a
#: sagittal slice, whose column flip is an anterior-posterior flip, not a left-right one.
SAGITTAL_AXIS = 2


def require_left_right_columns(volumes: Sequence[CachedVolume]) -> None:
    """Refuse mirror-label swaps on slices whose columns do not run left-right.

    A 2D flip mirrors the columns; swapping right/left labels with it is right only where the
    columns are the patient's left-right axis: axial and coronal slices of the LPS-oriented
    arrays, not sagittal ones (``slice_axis=2``, or ``"auto"`` on a sagittal acquisition),
    where the swap would put each kidney's label on the other one.

    Raises:
        DataError: naming the sagittal cases and what to do.
    """
    sagittal = [v.case_id for v in volumes if v.meta.get("slice_axis") == SAGITTAL_AXIS]
    if sagittal:
        raise sagittal_mirror_error(f"cases {sagittal} are")


def sagittal_mirror_error(what: str) -> DataError:
    """The error of mirror-label swaps on sagittal slices (``what``: "cases [...] are")."""
    return DataError(
        f"mirror_labels: {what} sliced sagittally (slice_axis 2), where a flip mirrors "
        "anterior-posterior, not left-right, so swapping left/right labels would be wrong; "
        "slice them axially or coronally (slice_axis=0 or 1) or drop mirror_labels (then "
        "labelled batches are not flipped)"
    )



def _slice_index(volumes: list[CachedVolume], kept_only: bool) -> list[tuple[int, int]]:
    index = []
    for v, vol in enumerate(volumes):
        slices = vol.kept_slices if kept_only else range(vol.image.shape[0])
        index += [(v, int(s)) for s in slices]
    return index


def _slice(array: np.ndarray, s: int, dtype: type) -> Tensor:
    """One slice of a memory-mapped (S, H, W) array as a tensor (copied out of the map)."""
    return torch.from_numpy(np.asarray(array[s], dtype=dtype))


class _SliceDataset(Dataset):
    index: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.index)


class PairedViewSlices(_SliceDataset):
    """Two augmented views of each kept slice with their super-pixel maps.

    Items: ``image_v1``/``image_v2`` (1, H, W) float32, ``superpixels_v1``/``_v2`` (H, W)
    int64 (-1 = outside/ignored), plus ``label_v1``/``label_v2`` when labels exist and
    ``with_labels`` is set, and ``case_id``/``slice_index``. ``mirror`` swaps its label
    pairs in a view whose warp is a reflection.
    """

    def __init__(
        self,
        volumes: list[CachedVolume],
        geometry: GeometryAugment | None = None,
        intensity: IntensityAugment | None = None,
        with_labels: bool = False,
        mirror: MirrorLabels | None = None,
    ) -> None:
        self.volumes = volumes
        self.index = _slice_index(volumes, kept_only=True)
        if not self.index:
            raise ValueError("no non-empty slice in the pre-training cases")
        self.geometry = geometry if geometry is not None else GeometryAugment()
        self.intensity = intensity if intensity is not None else IntensityAugment()
        self.with_labels = with_labels and all(v.label is not None for v in volumes)
        if self.with_labels and mirror is not None:
            require_left_right_columns(volumes)
        self.mirror = mirror

    def __getitem__(self, i: int) -> dict[str, Tensor | str | int]:
        v, s = self.index[i]
        vol = self.volumes[v]
        image = _slice(vol.image, s, np.float32).unsqueeze(0)
        maps = {"superpixels": _slice(vol.superpixels, s, np.int64)}
        if self.with_labels:
            maps["label"] = torch.from_numpy(vol.label_ids(s))
        item: dict[str, Tensor | str | int] = {"case_id": vol.case_id, "slice_index": s}
        for view in ("v1", "v2"):
            theta = self.geometry.sample()
            warped, warped_maps = apply_affine(theta, image, maps)
            if "label" in warped_maps and self.mirror is not None:
                warped_maps["label"] = self.mirror.apply(warped_maps["label"], is_reflection(theta))
            item[f"image_{view}"] = self.intensity(warped)
            for key, m in warped_maps.items():
                item[f"{key}_{view}"] = m
        return item


class LabelledSlices(_SliceDataset):
    """Image + label slices (all slices of labelled cases), optionally augmented;
    ``mirror`` swaps its label pairs in a slice whose warp is a reflection."""

    def __init__(
        self,
        volumes: list[CachedVolume],
        geometry: GeometryAugment | None = None,
        intensity: IntensityAugment | None = None,
        mirror: MirrorLabels | None = None,
    ) -> None:
        missing = [v.case_id for v in volumes if v.label is None]
        if missing:
            raise ValueError(f"fine-tuning needs labels; these cases have none: {missing}")
        self.volumes = volumes
        self.index = _slice_index(volumes, kept_only=False)
        if geometry is not None and mirror is not None:
            require_left_right_columns(volumes)
        self.geometry = geometry
        self.intensity = intensity
        self.mirror = mirror

    def organ_slices(self) -> list[int]:
        """Dataset indexes of the slices that hold a labelled organ (a value > 0)."""
        organ = {}
        for v, vol in enumerate(self.volumes):
            labels = vol.label_ids()
            organ[v] = (labels > 0).reshape(len(labels), -1).any(1)
        return [i for i, (v, s) in enumerate(self.index) if organ[v][s]]

    def __getitem__(self, i: int) -> dict[str, Tensor | str | int]:
        v, s = self.index[i]
        vol = self.volumes[v]
        image = _slice(vol.image, s, np.float32).unsqueeze(0)
        label = torch.from_numpy(vol.label_ids(s))
        if self.geometry is not None:
            theta = self.geometry.sample()
            image, maps = apply_affine(theta, image, {"label": label})
            label = maps["label"]
            if self.mirror is not None:
                label = self.mirror.apply(label, is_reflection(theta))
        if self.intensity is not None:
            image = self.intensity(image)
        return {"image": image, "label": label, "case_id": vol.case_id, "slice_index": s}


def foreground_sampler(
    length: int, organ_indexes: list[int], foreground_ratio: float
) -> WeightedRandomSampler | None:
    """Draws ``length`` items per epoch: with probability ``foreground_ratio`` one of
    ``organ_indexes`` (uniformly), else any item (uniformly), as nnU-Net oversamples
    foreground. None (plain shuffling) when there is nothing to oversample.

    Few labelled patients give few organ slices among many empty ones; drawn uniformly, a
    small organ appears in a handful of batches and the fine-tuned network learns to
    predict background there.
    """
    if foreground_ratio <= 0 or not organ_indexes or len(organ_indexes) == length:
        return None
    weights = torch.full((length,), (1.0 - foreground_ratio) / length, dtype=torch.float64)
    weights[organ_indexes] += foreground_ratio / len(organ_indexes)
    # The global generator: seeded by seed_everything like the loader's shuffling.
    return WeightedRandomSampler(weights.tolist(), length, replacement=True)


class Volumes(Dataset):
    """Whole volumes for 3D evaluation: ``image`` (S, 1, H, W), ``label`` (S, H, W)."""

    def __init__(self, volumes: list[CachedVolume]) -> None:
        self.volumes = volumes

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> dict[str, Tensor | str]:
        vol = self.volumes[i]
        item: dict[str, Tensor | str] = {
            "image": torch.from_numpy(np.asarray(vol.image, dtype=np.float32)).unsqueeze(1),
            "case_id": vol.case_id,
        }
        if vol.label is not None:
            item["label"] = torch.from_numpy(vol.label_ids())
        return item
