"""Batches made on the training device: the same augmentations, aligned maps, real training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from lrc_lightning import LRCDataModule
from lrc_lightning.data.cache import CachedVolume
from lrc_lightning.data.device_batches import DeviceBatches
from lrc_lightning.data.transforms import GeometryAugment, random_affine, random_affines, warp_batch
from lrc_lightning.models import MoCoV2LRC, UNet2d
from tests.conftest import DEMO_MR


def _blocky_volume(n: int = 6, size: int = 32) -> CachedVolume:
    """Slices whose intensity is a function of the region id: id k has value k / 20."""
    coarse = np.random.default_rng(0).integers(0, 16, (n, size // 8, size // 8))
    ids = coarse.repeat(8, 1).repeat(8, 2).astype(np.int16)
    ids[:, :4] = -1  # a padded strip
    image = np.where(ids >= 0, ids / 20.0, 0.0).astype(np.float16)
    label = np.where(ids >= 0, ids % 3, 255).astype(np.uint8)
    return CachedVolume("blocks", image, ids, label, list(range(n)), {})


def test_views_keep_image_and_maps_aligned() -> None:
    batches = DeviceBatches([_blocky_volume()], batch_size=4, with_labels=True,
                            geometry=GeometryAugment(), seed=1)  # fmt: skip
    batch = next(iter(batches))
    assert batch["image_v1"].shape == (4, 1, 32, 32) and batch["superpixels_v1"].dtype == torch.long
    for view in ("v1", "v2"):
        image, ids = batch[f"image_{view}"][:, 0], batch[f"superpixels_{view}"]
        inside = ids >= 0
        # Nearest map vs bilinear image: equal away from region borders (most pixels).
        close = (image[inside] - ids[inside] / 20.0).abs() < 1e-2
        assert close.float().mean() > 0.8
        labels = batch[f"label_{view}"]
        assert ((labels == -1) | (labels == ids % 3) | (ids == -1)).all()
    assert not torch.equal(batch["image_v1"], batch["image_v2"])  # two different views


def test_batched_affines_follow_the_per_item_distribution() -> None:
    aug = GeometryAugment(crop_scale=(0.5, 1.0), horizontal_flip=0.5, max_rotation=10.0)
    g = torch.Generator().manual_seed(0)
    batched = random_affines(aug, 4000, g)
    single = torch.stack([random_affine(aug, g) for _ in range(4000)])
    for theta in (batched, single):
        area = theta[:, :, :2].det().abs()  # the crop's area fraction (rotation keeps it)
        assert 0.5 - 1e-4 <= float(area.min()) and float(area.max()) <= 1.0 + 1e-4
    flips = lambda t: float((t[:, 0, 0] * t[:, 1, 1] < 0).float().mean())  # noqa: E731
    assert abs(flips(batched) - flips(single)) < 0.05 and abs(flips(batched) - 0.5) < 0.05


def test_warp_keeps_padding_and_marks_the_outside() -> None:
    ids = torch.zeros(1, 8, 8, dtype=torch.long)
    ids[:, :, :2] = -1  # padding on the left
    shift = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]])  # samples beyond the right edge
    _, maps = warp_batch(shift, torch.zeros(1, 1, 8, 8), {"superpixels": ids, "label": ids})
    assert (maps["label"][0, :, -2:] == 0).all() and (maps["superpixels"][0, :, -2:] == -1).all()
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    _, same = warp_batch(identity, torch.zeros(1, 1, 8, 8), {"label": ids})
    assert torch.equal(same["label"], ids)  # -1 stays -1


def test_device_batches_train_moco_lrc(tmp_path: Path) -> None:
    dm = LRCDataModule(str(DEMO_MR), cache_dir=str(tmp_path / "cache"), image_size=32,
                       batch_size=4, device_batches=True, channels_last=True)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(MoCoV2LRC(UNet2d(width=4, depth=2), queue_size=16), dm)
    assert trainer.global_step == 3
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceBatches)
    assert len(loader) == sum(len(v.kept_slices) for v in dm.volumes(dm.split.pool)) // 4
    batch = next(iter(loader))
    assert batch["image_v1"].is_contiguous(memory_format=torch.channels_last)


def test_finetune_batches_carry_ignored_padding_as_minus_one() -> None:
    batches = DeviceBatches([_blocky_volume()], batch_size=3, mode="finetune", seed=0)
    assert len(batches) == 2  # 6 slices, batches of 3
    batch = next(iter(batches))
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (3, 1, 32, 32) and batch["label"].dtype == torch.long
    assert (batch["label"][:, :4] == -1).all()  # the 255 stored in the cache
    assert batch["label"].max() <= 2
