"""Images and tables for any Lightning logger: super-pixel views, predictions, Dice tables.

W&B gets images and tables, TensorBoard images and a markdown table, every other logger
with a ``log_dir`` (CSV) PNG files and a CSV table under ``<log_dir>/media``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only
from skimage.segmentation import find_boundaries
from torch import Tensor

__all__ = [
    "DiceTableLogger",
    "SegmentationImageLogger",
    "SuperpixelViewLogger",
    "log_images",
    "log_table",
    "overlay_boundaries",
    "overlay_labels",
]

#: Colours of classes 1..N (background stays grey).
_PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230]],
    dtype=np.float32,
)  # fmt: skip


def _grey(image: Tensor | np.ndarray) -> np.ndarray:
    array = np.asarray(image.detach().float().cpu() if isinstance(image, Tensor) else image)
    array = array.squeeze()
    low, high = np.percentile(array, (1, 99)) if array.size else (0.0, 1.0)
    scaled = np.clip((array - low) / max(high - low, 1e-6), 0, 1)
    return np.repeat(scaled[..., None] * 255.0, 3, axis=-1)


def overlay_boundaries(image: Tensor | np.ndarray, superpixels: Tensor | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the image in grey with super-pixel boundaries in yellow."""
    rgb = _grey(image)
    ids = np.asarray(superpixels.cpu() if isinstance(superpixels, Tensor) else superpixels)
    rgb[find_boundaries(ids, mode="inner")] = (255, 215, 0)
    rgb[ids < 0] *= 0.4  # ignored (-1) pixels darkened
    return rgb.astype(np.uint8)


def overlay_labels(image: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the image in grey with classes > 0 blended in colour."""
    rgb = _grey(image)
    ids = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    mask = ids > 0
    colours = _PALETTE[(ids[mask] - 1) % len(_PALETTE)]
    rgb[mask] = 0.5 * rgb[mask] + 0.5 * colours
    return rgb.astype(np.uint8)


@rank_zero_only
def log_images(trainer: pl.Trainer, key: str, images: list[np.ndarray], step: int) -> None:
    """Send (H, W, 3) uint8 images to every logger of the trainer."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=images, step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_images(key, np.stack(images), step, dataformats="NHWC")
        elif getattr(logger, "log_dir", None):
            from PIL import Image

            folder = Path(logger.log_dir) / "media"
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                name = f"{key.replace('/', '_')}_step{step}_{i}.png"
                Image.fromarray(image).save(folder / name)


@rank_zero_only
def log_table(
    trainer: pl.Trainer, key: str, columns: list[str], rows: list[list[Any]], step: int
) -> None:
    """Send a table to every logger of the trainer."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=columns, data=rows, step=step)
        elif isinstance(logger, TensorBoardLogger):
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
            logger.experiment.add_text(key, "\n".join(lines), step)
        elif getattr(logger, "log_dir", None):
            folder = Path(logger.log_dir) / "media"
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{key.replace('/', '_')}_step{step}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(columns)
                writer.writerows([[_cell(v) for v in row] for row in rows])


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class SuperpixelViewLogger(pl.Callback):
    """At the first training step and then every ``every_n_steps`` steps, logs the two views
    of a few pre-training slices side by side with their super-pixel boundaries (key
    ``train/views``): a look at what LRC contrasts before a long run gets under way. For 3D
    patches, their middle slice with its supervoxel boundaries."""

    def __init__(self, every_n_steps: int = 500, max_images: int = 4) -> None:
        if every_n_steps < 1 or max_images < 1:
            raise ValueError("every_n_steps and max_images must be >= 1")
        self.every_n_steps = every_n_steps
        self.max_images = max_images

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        step = trainer.global_step
        if (step != 1 and step % self.every_n_steps) or not isinstance(batch, dict):
            return
        if "image_v1" not in batch:
            return
        panels = []
        for i in range(min(self.max_images, batch["image_v1"].shape[0])):
            views = []
            for v in ("v1", "v2"):
                image, maps = batch[f"image_{v}"][i], batch[f"superpixels_{v}"][i]
                if maps.ndim == 3:  # (D, H, W) patch: its middle slice
                    image, maps = image[:, maps.shape[0] // 2], maps[maps.shape[0] // 2]
                views.append(overlay_boundaries(image, maps))
            panels.append(np.concatenate(views, axis=1))
        log_images(trainer, "train/views", panels, step)


class SegmentationImageLogger(pl.Callback):
    """After validation, logs ground truth | prediction overlays of the slices of the
    first volume with most foreground (key ``val/predictions``)."""

    def __init__(self, max_images: int = 4) -> None:
        if max_images < 1:
            raise ValueError("max_images must be >= 1")
        self.max_images = max_images
        self._panels: list[np.ndarray] = []

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if batch_idx != 0 or not isinstance(outputs, Tensor) or "label" not in batch:
            return
        image, label = batch["image"][0], batch["label"][0]
        order = (label > 0).flatten(1).sum(1).argsort(descending=True)[: self.max_images]
        self._panels = [
            np.concatenate(
                [overlay_labels(image[s], label[s]), overlay_labels(image[s], outputs[s])], axis=1
            )
            for s in order.tolist()
        ]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._panels and not trainer.sanity_checking:
            log_images(trainer, "val/predictions", self._panels, trainer.global_step)
        self._panels = []


class DiceTableLogger(pl.Callback):
    """Logs the per-volume, per-organ Dice of the last validation and test epochs as a table
    (keys ``val/dice_table``, ``test/dice_table``); needs a module with
    ``last_dice_table`` and ``organ_names`` (:class:`SupervisedSegmentation`)."""

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, key: str) -> None:
        table = getattr(pl_module, "last_dice_table", None)
        names = getattr(pl_module, "organ_names", None)
        if not table or names is None or trainer.sanity_checking:
            return
        rows = [[case, *values] for case, values in table.items()]
        log_table(trainer, key, ["case", *names], rows, trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, "val/dice_table")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, "test/dice_table")
