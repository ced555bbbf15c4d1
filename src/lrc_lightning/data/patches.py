"""3D patches: paired views of a volume with their supervoxels, and labelled patches.

A training item is a patch of ``patch_size`` (D, H, W) voxels of a cached volume: its centre
is a foreground voxel with probability ``foreground_ratio`` (a labelled organ when the case
has labels and ``labels_for_centres``, else a voxel brighter than the foreground
threshold), anywhere otherwise. Pre-training warps the patch twice (:class:`VolumeAugment`:
a random resized crop, flips, quarter turns and a small rotation in the (y, x) plane), each
warp moving image (trilinear), supervoxel map and label (nearest, exact integers) together:
outside the volume the map is -1 and the label -1 (ignored). Intensity changes touch the image
only. A patch's supervoxels are numbered 0..K-1 (:func:`relabel_patch`), within the loss's
bound on ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lrc_lightning.data.cache import CachedVolume
from lrc_lightning.data.transforms import IntensityAugment, MirrorLabels, is_reflection
from lrc_lightning.data.warping import warp_ids_nearest

__all__ = [
    "LabelledPatches",
    "PairedViewPatches",
    "PatchSampling",
    "VolumeAugment",
    "random_affine_3d",
    "relabel_patch",
    "warp_volume",
]


@dataclass
class VolumeAugment:
    """Random resized crop (fraction of the patch's volume), flips per axis (z, y, x),
    quarter turns (half turns when H != W) and a small rotation (degrees) in the (y, x)
    plane, all in voxel units: content keeps its proportions on non-square patches."""

    crop_scale: tuple[float, float] = (0.4, 1.0)
    flip: tuple[float, float, float] = (0.0, 0.5, 0.5)
    quarter_turns: bool = True
    max_rotation: float = 10.0

    def for_labels(self, mirror_pairs: bool) -> VolumeAugment:
        """The augmentation of patches that carry labels: the left-right (x) flip only
        when mirror pairs can be swapped, no z or y flip (see
        :meth:`~lrc_lightning.data.transforms.GeometryAugment.for_labels`)."""
        return replace(self, flip=(0.0, 0.0, self.flip[2] if mirror_pairs else 0.0))


@dataclass
class PatchSampling:
    """Where 3D patches come from: ``patch_size`` (D, H, W) voxels, centred on foreground
    with probability ``foreground_ratio`` (a labelled organ when the dataset centres on
    labels, else a voxel brighter than ``foreground_threshold``), ``patches_per_volume``
    items per volume and epoch."""

    patch_size: tuple[int, int, int] = (32, 96, 96)
    foreground_ratio: float = 0.5
    foreground_threshold: float = 0.05
    patches_per_volume: int = 8

    def __post_init__(self) -> None:
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(
                f"patch_size must be three positive sizes (D, H, W), got {self.patch_size}"
            )
        if not 0.0 <= self.foreground_ratio <= 1.0:
            raise ValueError(f"foreground_ratio must be in [0, 1], got {self.foreground_ratio}")
        if self.patches_per_volume < 1:
            raise ValueError(f"patches_per_volume must be >= 1, got {self.patches_per_volume}")
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]


def random_affine_3d(
    aug: VolumeAugment,
    size: tuple[int, int, int],
    generator: torch.Generator | None = None,
) -> Tensor:
    """A (3, 4) ``affine_grid`` matrix (output -> input, (x, y, z) coordinates) for a patch
    of ``size`` (D, H, W) voxels.

    ``affine_grid`` works in normalised coordinates, where a patch of H != W voxels is a
    square: a rotation written there stretches the content (a quarter turn of 32 x 64
    voxels would squeeze it by 2 along one axis and stretch it by 2 along the other). The
    rotation is therefore built in voxel units and converted. On planes with H != W the
    quarter turns are half turns only (0 or 180 degrees): a 90 degree turn of a non-square
    plane cannot cover it, and would leave the ends of its long side empty.
    """
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"size must be three positive sizes (D, H, W), got {size}")
    u = torch.rand(9, generator=generator).tolist()
    fraction = aug.crop_scale[0] + (aug.crop_scale[1] - aug.crop_scale[0]) * u[0]
    side = min(1.0, fraction ** (1.0 / 3.0))
    scale = [side, side, side]  # (x, y, z)
    centre = [(2 * u[1 + i] - 1) * (1 - side) for i in range(3)]
    for axis, probability in zip((2, 1, 0), aug.flip, strict=True):  # flip is (z, y, x)
        if u[4 + axis] < probability:
            scale[axis] = -scale[axis]
    _, h, w = size
    turns = int(u[7] * 4) % 4 if aug.quarter_turns else 0
    if h != w:
        turns -= turns % 2  # half turns only: see above
    angle = turns * math.pi / 2 + math.radians((2 * u[8] - 1) * aug.max_rotation)
    cos, sin = math.cos(angle), math.sin(angle)
    sx, sy, sz = scale
    cx, cy, cz = centre
    # A rotation R in voxel units is S^-1 R S in normalised units, S = diag(W/2, H/2): the
    # off-diagonal terms carry the aspect ratio. The crop scale is the same fraction on every
    # axis, and flips are signs: both commute with S.
    return torch.tensor(
        [[cos * sx, -sin * sy * h / w, 0.0, cx], [sin * sx * w / h, cos * sy, 0.0, cy],
         [0.0, 0.0, sz, cz]],
        dtype=torch.float32,
    )  # fmt: skip


def warp_volume(
    theta: Tensor, image: Tensor, maps: dict[str, Tensor], size: tuple[int, int, int]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Warp (N, C, D, H, W) images (trilinear, 0 outside) and (N, D, H, W) integer maps
    (nearest, -1 outside; -1 stays -1) with (N, 3, 4) matrices onto ``size``.

    Maps are gathered with integer indices (:func:`~lrc_lightning.data.warping.warp_ids_nearest`),
    never through float32: ids above 2**24 come back unchanged.
    """
    n = image.shape[0]
    grid = F.affine_grid(theta, [n, 1, *size], align_corners=False)
    warped = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)  # fmt: skip
    out = {key: warp_ids_nearest(value, grid, fill=-1).long() for key, value in maps.items()}
    return warped, out


def relabel_patch(ids: np.ndarray) -> np.ndarray:
    """Number a patch's supervoxels 0..K-1 (in the order of their volume ids); -1 stays -1.

    Supervoxel ids are numbered over the whole volume (a 300 x 512 x 512 CT holds ~67k of
    them), but the loss bounds ids by the voxel count of one patch
    (:class:`~lrc_lightning.LocalizedRegionContrastLoss`): a 16 x 64 x 64 patch has 65,536.
    A patch holds at most as many supervoxels as voxels, so its own numbering always fits.
    Both views of a pair are warped from one relabelled patch: equal ids still mean the
    same supervoxel.
    """
    flat = np.maximum(ids.reshape(-1), -1)  # any negative id is "ignored"
    if flat.size == 0 or flat.max() < 0:
        return ids
    present = np.zeros(int(flat.max()) + 2, dtype=bool)  # slot 0 stands for -1
    present[flat + 1] = True
    present[0] = False
    rank = np.cumsum(present, dtype=np.int64) - 1  # new id of each present old id
    rank[0] = -1
    return rank[flat + 1].reshape(ids.shape)


def _box(volume: CachedVolume, centre: np.ndarray, size: tuple[int, int, int]) -> tuple:
    """Slices of the patch around ``centre`` (clipped) and where they land in the patch."""
    source, target = [], []
    for axis, n in enumerate(size):
        start = int(centre[axis]) - n // 2
        lo, hi = max(start, 0), min(start + n, volume.image.shape[axis])
        source.append(slice(lo, hi))
        target.append(slice(lo - start, hi - start))
    return tuple(source), tuple(target)


class _Patches(Dataset):
    """Shared sampling: ``patches_per_volume`` items per volume and epoch, centres biased
    towards foreground."""

    #: Centre patches on labelled voxels (fine-tuning) instead of bright ones.
    labels_for_centres = False

    def __init__(
        self,
        volumes: list[CachedVolume],
        sampling: PatchSampling,
        geometry: VolumeAugment | None,
        intensity: IntensityAugment | None,
    ) -> None:
        if not volumes:
            raise ValueError("no volume to draw 3D patches from")
        self.volumes = volumes
        self.sampling = sampling
        self.patch_size = sampling.patch_size
        self.geometry, self.intensity = geometry, intensity
        self.foreground = [
            self._foreground_voxels(v, sampling.foreground_threshold, self.labels_for_centres)
            for v in volumes
        ]

    @staticmethod
    def _foreground_voxels(volume: CachedVolume, threshold: float, use_labels: bool) -> np.ndarray:
        """Up to 4096 (z, y, x) foreground voxels, found on a 1:4 in-plane grid."""
        if use_labels and volume.label is not None:
            mask = np.isin(volume.label[:, ::4, ::4], (0, 255), invert=True)
        else:
            mask = np.asarray(volume.image[:, ::4, ::4], dtype=np.float32) > threshold
        found = np.argwhere(mask) * np.array([1, 4, 4])
        if len(found) > 4096:
            found = found[np.random.default_rng(0).choice(len(found), 4096, replace=False)]
        return found

    def __len__(self) -> int:
        return len(self.volumes) * self.sampling.patches_per_volume

    def _centre(self, v: int) -> np.ndarray:
        candidates = self.foreground[v]
        if len(candidates) and float(torch.rand(())) < self.sampling.foreground_ratio:
            return candidates[int(torch.randint(len(candidates), ()))]
        shape = self.volumes[v].image.shape
        return np.array([int(torch.randint(n, ())) for n in shape])

    def _patch(self, i: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(1, D, H, W) image, (D, H, W) supervoxels (-1 outside), (D, H, W) label or None."""
        v = i // self.sampling.patches_per_volume
        source, target = _box(self.volumes[v], self._centre(v), self.patch_size)
        volume = self.volumes[v]
        image = np.zeros(self.patch_size, dtype=np.float32)
        image[target] = volume.image[source]
        maps = np.full(self.patch_size, -1, dtype=np.int64)
        maps[target] = volume.superpixels[source]
        maps = relabel_patch(maps)
        label = None
        if volume.label is not None:
            label_np = np.full(self.patch_size, -1, dtype=np.int64)
            label_np[target] = volume.label_ids(source)
            label = torch.from_numpy(label_np)
        return torch.from_numpy(image).unsqueeze(0), torch.from_numpy(maps), label


class PairedViewPatches(_Patches):
    """Pre-training items: ``image_v1``, ``image_v2`` (1, D, H, W), ``superpixels_v1``,
    ``superpixels_v2`` (D, H, W) int64 (-1 outside), optionally ``label_v1``/``label_v2``."""

    def __init__(
        self,
        volumes: list[CachedVolume],
        sampling: PatchSampling,
        geometry: VolumeAugment | None = None,
        intensity: IntensityAugment | None = None,
        with_labels: bool = False,
        mirror: MirrorLabels | None = None,
    ) -> None:
        super().__init__(volumes, sampling, geometry or VolumeAugment(),
                         intensity or IntensityAugment())  # fmt: skip
        self.with_labels = with_labels and all(v.label is not None for v in volumes)
        self.mirror = mirror

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        image, maps, label = self._patch(i)
        wanted = {"superpixels": maps}
        if self.with_labels and label is not None:
            wanted["label"] = label
        item: dict[str, Tensor] = {}
        for view in ("v1", "v2"):
            assert self.geometry is not None and self.intensity is not None
            theta = random_affine_3d(self.geometry, self.patch_size).unsqueeze(0)
            warped, warped_maps = warp_volume(
                theta, image.unsqueeze(0), {k: m.unsqueeze(0) for k, m in wanted.items()},
                self.patch_size,
            )  # fmt: skip
            if "label" in warped_maps and self.mirror is not None:
                warped_maps["label"] = self.mirror.apply(warped_maps["label"], is_reflection(theta))
            # (1, D, H, W) as (C=D, H, W): one intensity draw for the whole view.
            item[f"image_{view}"] = self.intensity(warped[0, 0]).unsqueeze(0)
            for key, value in warped_maps.items():
                item[f"{key}_{view}"] = value[0]
        return item


class LabelledPatches(_Patches):
    """Fine-tuning items: ``image`` (1, D, H, W) and ``label`` (D, H, W) int64 (-1 ignored),
    centred on a labelled organ with probability ``foreground_ratio``; one random warp when
    ``geometry`` is given (``mirror`` swaps its label pairs when the warp reflects)."""

    labels_for_centres = True

    def __init__(
        self,
        volumes: list[CachedVolume],
        sampling: PatchSampling,
        geometry: VolumeAugment | None = None,
        intensity: IntensityAugment | None = None,
        mirror: MirrorLabels | None = None,
    ) -> None:
        missing = [v.case_id for v in volumes if v.label is None]
        if missing:
            raise ValueError(f"fine-tuning cases without a label: {missing}")
        super().__init__(volumes, sampling, geometry, intensity)
        self.mirror = mirror

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        image, _, label = self._patch(i)
        assert label is not None
        if self.geometry is not None:
            theta = random_affine_3d(self.geometry, self.patch_size).unsqueeze(0)
            warped, maps = warp_volume(theta, image.unsqueeze(0), {"label": label.unsqueeze(0)},
                                       self.patch_size)  # fmt: skip
            if self.mirror is not None:
                maps["label"] = self.mirror.apply(maps["label"], is_reflection(theta))
            image, label = warped[0], maps["label"][0]
        if self.intensity is not None:
            image = self.intensity(image[0]).unsqueeze(0)
        return {"image": image, "label": label}
