"""Torch datasets over cached volumes: paired pre-training views, labelled slices, volumes."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lrc_lightning.data.cache import CachedVolume
from lrc_lightning.data.transforms import GeometryAugment, IntensityAugment, apply_affine

__all__ = ["LabelledSlices", "PairedViewSlices", "Volumes"]


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
    ``with_labels`` is set, and ``case_id``/``slice_index``.
    """

    def __init__(
        self,
        volumes: list[CachedVolume],
        geometry: GeometryAugment | None = None,
        intensity: IntensityAugment | None = None,
        with_labels: bool = False,
    ) -> None:
        self.volumes = volumes
        self.index = _slice_index(volumes, kept_only=True)
        if not self.index:
            raise ValueError("no non-empty slice in the pre-training cases")
        self.geometry = geometry if geometry is not None else GeometryAugment()
        self.intensity = intensity if intensity is not None else IntensityAugment()
        self.with_labels = with_labels and all(v.label is not None for v in volumes)

    def __getitem__(self, i: int) -> dict[str, Tensor | str | int]:
        v, s = self.index[i]
        vol = self.volumes[v]
        image = _slice(vol.image, s, np.float32).unsqueeze(0)
        maps = {"superpixels": _slice(vol.superpixels, s, np.int64)}
        if self.with_labels:
            maps["label"] = torch.from_numpy(vol.label_ids(s))
        item: dict[str, Tensor | str | int] = {"case_id": vol.case_id, "slice_index": s}
        for view in ("v1", "v2"):
            warped, warped_maps = apply_affine(self.geometry.sample(), image, maps)
            item[f"image_{view}"] = self.intensity(warped)
            for key, m in warped_maps.items():
                item[f"{key}_{view}"] = m
        return item


class LabelledSlices(_SliceDataset):
    """Image + label slices (all slices of labelled cases), optionally augmented."""

    def __init__(
        self,
        volumes: list[CachedVolume],
        geometry: GeometryAugment | None = None,
        intensity: IntensityAugment | None = None,
    ) -> None:
        missing = [v.case_id for v in volumes if v.label is None]
        if missing:
            raise ValueError(f"fine-tuning needs labels; these cases have none: {missing}")
        self.volumes = volumes
        self.index = _slice_index(volumes, kept_only=False)
        self.geometry = geometry
        self.intensity = intensity

    def __getitem__(self, i: int) -> dict[str, Tensor | str | int]:
        v, s = self.index[i]
        vol = self.volumes[v]
        image = _slice(vol.image, s, np.float32).unsqueeze(0)
        label = torch.from_numpy(vol.label_ids(s))
        if self.geometry is not None:
            image, maps = apply_affine(self.geometry.sample(), image, {"label": label})
            label = maps["label"]
        if self.intensity is not None:
            image = self.intensity(image)
        return {"image": image, "label": label, "case_id": vol.case_id, "slice_index": s}


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
