"""Training batches drawn and augmented on the training device, from slices held there.

The default path (:class:`~lrc_lightning.data.datasets.PairedViewSlices` in a DataLoader)
reads each slice from the memory-mapped cache, augments it on a CPU worker and has the
batch copied to the GPU. On a fast GPU with small slices that path, not the model, can set
the pace. :class:`DeviceBatches` holds every training slice (float16 image, int32 maps) on
the device once, and makes each batch with one gather, one batched warp
(:func:`~lrc_lightning.data.transforms.warp_batch`) and batched intensity augmentation: no
worker processes and no host-device copies per step. The augmentations and their
distributions are the same as the per-item path's (one random draw per sample).

Memory: 2 + 4 (+ 2 with labels) bytes per training pixel; CHAOS at 256x256 (718 slices) is
about 280 MB.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lrc_lightning.data.cache import CachedVolume
from lrc_lightning.data.datasets import require_left_right_columns
from lrc_lightning.data.transforms import (
    GeometryAugment,
    IntensityAugment,
    MirrorLabels,
    is_reflection,
    random_affines,
    warp_batch,
)

__all__ = ["DeviceBatches"]


class DeviceBatches:
    """An iterable of training batches made on ``device`` (one epoch per ``iter``).

    ``mode="pretrain"``: the kept slices of ``volumes``, batches as LRCDataModule's
    pre-training batches (``image_v1``, ``image_v2`` (B, 1, H, W), ``superpixels_v1``,
    ``superpixels_v2`` (B, H, W) int64, and ``label_v1``/``label_v2`` with ``with_labels``).
    ``mode="finetune"``: all slices, ``image`` and ``label``. The last incomplete batch of an
    epoch is dropped.

    Args:
        volumes: cached volumes (one slice size).
        batch_size: slices per batch.
        geometry, intensity: the augmentations (None: none of that kind).
        device: where slices are kept and batches made.
        seed: seeds the device generator of shuffling and augmentation.
        channels_last: images in ``torch.channels_last`` memory format.
        channels: channels of the images: the one channel repeated (identical copies,
            after augmentation), for a backbone that expects RGB input.
        mirror: label pairs swapped in samples whose warp is a reflection.
        foreground_ratio: fine-tuning: share of slices drawn from those that hold an organ
            (the rest uniformly, with replacement), as
            :func:`~lrc_lightning.data.datasets.foreground_sampler` draws them.

    Raises:
        ValueError: no slice to draw from, or slices of different sizes.
    """

    def __init__(
        self,
        volumes: Sequence[CachedVolume],
        batch_size: int,
        mode: Literal["pretrain", "finetune"] = "pretrain",
        geometry: GeometryAugment | None = None,
        intensity: IntensityAugment | None = None,
        with_labels: bool = False,
        device: torch.device | str = "cpu",
        seed: int = 0,
        channels_last: bool = False,
        mirror: MirrorLabels | None = None,
        foreground_ratio: float = 0.0,
        channels: int = 1,
    ) -> None:
        if mode not in ("pretrain", "finetune"):
            raise ValueError(f"mode must be 'pretrain' or 'finetune', got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be an integer >= 1, got {channels!r}")
        sizes = {tuple(v.image.shape[1:]) for v in volumes}
        if len(sizes) > 1:
            raise ValueError(f"DeviceBatches needs one slice size, got {sorted(sizes)}")
        self.mode = mode
        self.batch_size = batch_size
        self.geometry = geometry
        self.intensity = intensity
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.channels = channels
        self.mirror = mirror
        labels = mode == "finetune" or (
            with_labels and all(v.label is not None for v in volumes)
        )  # fmt: skip
        if labels and mirror is not None and geometry is not None:
            require_left_right_columns(volumes)
        images, maps, label_maps = [], [], []
        for v in volumes:
            index = v.kept_slices if mode == "pretrain" else list(range(v.image.shape[0]))
            if not index:
                continue
            images.append(torch.from_numpy(np.asarray(v.image[index], np.float16)))
            if mode == "pretrain":
                maps.append(torch.from_numpy(np.asarray(v.superpixels[index], np.int32)))
            if labels:
                label_maps.append(torch.from_numpy(v.label_ids(index).astype(np.int16)))
        if not images or sum(len(i) for i in images) < batch_size:
            raise ValueError(
                f"DeviceBatches: fewer training slices than one batch of {batch_size}"
            )
        self.images = torch.cat(images).to(self.device)
        self.superpixels = torch.cat(maps).to(self.device) if maps else None
        self.labels = torch.cat(label_maps).to(self.device) if label_maps else None
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.weights: Tensor | None = None
        if mode == "finetune" and foreground_ratio > 0 and self.labels is not None:
            organ = (self.labels > 0).flatten(1).any(1).double()
            if 0 < int(organ.sum()) < len(organ):
                self.weights = (1 - foreground_ratio) / len(organ) + (
                    foreground_ratio * organ / organ.sum()
                )

    def __len__(self) -> int:
        return len(self.images) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        if self.weights is not None:
            order = torch.multinomial(self.weights, len(self) * self.batch_size, replacement=True,
                                      generator=self.generator)  # fmt: skip
        else:
            order = torch.randperm(len(self.images), generator=self.generator, device=self.device)
        for i in range(len(self)):
            yield self.batch(order[i * self.batch_size : (i + 1) * self.batch_size])

    def _view(self, index: Tensor, maps: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        images = self.images[index].unsqueeze(1).float()
        if self.geometry is not None:
            theta = random_affines(self.geometry, len(index), self.generator, self.device)
            images, maps = warp_batch(theta, images, maps)
            if "label" in maps and self.mirror is not None:
                maps["label"] = self.mirror.apply(maps["label"], is_reflection(theta))
        else:
            maps = {k: m.long() for k, m in maps.items()}
        if self.intensity is not None:
            images = self.intensity.batch(images, self.generator)
        if self.channels > 1:
            images = images.repeat_interleave(self.channels, dim=1)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, maps

    def batch(self, index: Tensor) -> dict[str, Tensor]:
        """The batch of slices ``index`` (a (B,) tensor on the device)."""
        maps = {}
        if self.superpixels is not None:
            maps["superpixels"] = self.superpixels[index]
        if self.labels is not None:
            maps["label"] = self.labels[index]
        if self.mode == "finetune":
            image, out = self._view(index, maps)
            return {"image": image, "label": out["label"]}
        batch: dict[str, Tensor] = {}
        for view in ("v1", "v2"):
            image, out = self._view(index, maps)
            batch[f"image_{view}"] = image
            for key, m in out.items():
                batch[f"{key}_{view}"] = m
        return batch
