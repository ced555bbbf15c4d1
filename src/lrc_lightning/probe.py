"""Online segmentation probe: watch representation quality during pre-training.

Self-supervised libraries probe classification with a linear head; segmentation needs a
dense one. Every few epochs this callback fits a 1x1 convolution (a per-pixel linear
classifier) on frozen dense features of the few labelled slices, then scores 3D Dice per
organ on the validation volumes. The pre-training itself is not touched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrc_lightning.metrics import dice_per_organ, nanmean

__all__ = ["SegmentationProbe", "fit_pixel_classifier", "sample_pixels"]


def sample_pixels(
    labels: Tensor, per_class: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Up to ``per_class`` random pixels of every class present in a (H, W) label map.

    Returns (rows, cols). Class-balanced, so small organs are not drowned by background.
    """
    rows, cols = [], []
    for c in labels.unique().tolist():
        if c < 0:
            continue
        where = (labels == c).nonzero()
        pick = torch.randperm(len(where), generator=generator)[:per_class]
        rows.append(where[pick, 0])
        cols.append(where[pick, 1])
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    return torch.cat(rows), torch.cat(cols)


def fit_pixel_classifier(
    features: Tensor, labels: Tensor, num_classes: int, steps: int = 200, lr: float = 0.05
) -> nn.Conv2d:
    """A 1x1 conv fitted by full-batch Adam on (N, C) pixel features and (N,) labels.

    Features are standardised with their training mean/std, folded into the conv.
    """
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    x = (features - mean) / std
    linear = nn.Linear(features.shape[1], num_classes).to(features.device)
    optimizer = torch.optim.Adam(linear.parameters(), lr=lr)
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    weight = counts.sum() / (num_classes * counts)  # balance what sampling did not
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(linear(x), labels, weight=weight).backward()
            optimizer.step()
    conv = nn.Conv2d(features.shape[1], num_classes, 1).to(features.device)
    with torch.no_grad():
        conv.weight.copy_((linear.weight / std)[:, :, None, None])
        conv.bias.copy_(linear.bias - (linear.weight * mean / std).sum(1))
    return conv


class SegmentationProbe(pl.Callback):
    """Fits a detached per-pixel linear head on labelled slices and logs Dice per organ.

    Needs an :class:`~lrc_lightning.LRCDataModule` with ``labelled_cases`` (probe training
    slices) and ``val_cases`` (probe evaluation volumes), and a module whose ``backbone``
    gives dense features (the reference models), or ``feature_fn``: a method name of the
    module mapping (B, 1, H, W) images to (B, C, H', W') features.

    Logs ``probe/dice_<organ>`` and ``probe/dice_mean`` every ``every_n_epochs`` epochs.

    Args:
        every_n_epochs: how often to probe.
        pixels_per_class: pixels sampled per class and slice for fitting.
        max_slices: labelled slices used (those with most foreground first).
        steps, lr: fitting budget of the head.
        num_classes, class_names: default from the data set's labels.
        batch_size: slices per forward.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        pixels_per_class: int = 64,
        max_slices: int = 256,
        steps: int = 200,
        lr: float = 0.05,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        feature_fn: str | None = None,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        if every_n_epochs < 1 or pixels_per_class < 1 or max_slices < 1 or steps < 1:
            raise ValueError("every_n_epochs, pixels_per_class, max_slices, steps must be >= 1")
        self.every_n_epochs = every_n_epochs
        self.pixels_per_class = pixels_per_class
        self.max_slices = max_slices
        self.steps = steps
        self.lr = lr
        self.num_classes = num_classes
        self.class_names = class_names
        self.feature_fn = feature_fn
        self.batch_size = batch_size
        self.seed = seed

    def _volumes(self, trainer: pl.Trainer) -> tuple[list[Any], list[Any]]:
        datamodule = trainer.datamodule
        split = getattr(datamodule, "split", None)
        if split is None or not split.labelled or not split.val:
            raise ValueError(
                "SegmentationProbe needs an LRCDataModule with labelled_cases >= 1 and "
                "val_cases >= 1 (its labelled slices train the probe, its validation volumes "
                "score it)"
            )
        labelled, val = datamodule.volumes(split.labelled), datamodule.volumes(split.val)
        for v in labelled + val:
            if v.label is None:
                raise ValueError(f"SegmentationProbe: case {v.case_id} has no label")
        return labelled, val

    def _features(self, pl_module: pl.LightningModule, images: Tensor) -> Tensor:
        if self.feature_fn is not None:
            return getattr(pl_module, self.feature_fn)(images)
        backbone = getattr(pl_module, "backbone", None)
        if backbone is None:
            raise ValueError(
                f"{type(pl_module).__name__} has no `backbone`; give SegmentationProbe "
                "feature_fn='<method returning dense features>'"
            )
        from lrc_lightning.models.backbone import backbone_features

        return backbone_features(backbone, images, -1)[1]  # type: ignore[return-value]

    @torch.no_grad()
    def _dense(self, pl_module: pl.LightningModule, image: np.ndarray) -> Tensor:
        """Features of (S, H, W) slices, brought to the image resolution."""
        out = []
        for start in range(0, len(image), self.batch_size):
            x = torch.from_numpy(np.asarray(image[start : start + self.batch_size], np.float32))
            x = x[:, None].to(pl_module.device)
            f = self._features(pl_module, x).float()
            out.append(F.interpolate(f, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return torch.cat(out)

    def probe(self, pl_module: pl.LightningModule, trainer: pl.Trainer) -> dict[str, float]:
        labelled, val = self._volumes(trainer)
        num_classes = self.num_classes or int(max(v.label.max() for v in labelled + val)) + 1
        generator = torch.Generator().manual_seed(self.seed)
        # The labelled slices with most foreground first, at most max_slices of them.
        ranked = sorted(
            ((int((np.asarray(v.label[s]) > 0).sum()), i, s)
             for i, v in enumerate(labelled) for s in range(v.label.shape[0])),
            reverse=True,
        )[: self.max_slices]  # fmt: skip
        features, targets = [], []
        for i, v in enumerate(labelled):
            chosen = sorted(s for _, j, s in ranked if j == i)
            for start in range(0, len(chosen), self.batch_size):
                batch = chosen[start : start + self.batch_size]
                dense = self._dense(pl_module, np.asarray(v.image[batch]))
                for k, s in enumerate(batch):
                    label = torch.from_numpy(np.asarray(v.label[s], np.int64))
                    rows, cols = sample_pixels(label, self.pixels_per_class, generator)
                    features.append(dense[k][:, rows, cols].T)
                    targets.append(label[rows, cols].to(dense.device))
        head = fit_pixel_classifier(
            torch.cat(features), torch.cat(targets), num_classes, self.steps, self.lr
        )
        rows_dice = []
        with torch.no_grad():
            for v in val:
                logits = torch.cat(
                    [head(f[None]) for f in self._dense(pl_module, np.asarray(v.image))]
                )
                prediction = logits.argmax(1).cpu()
                target = torch.from_numpy(np.asarray(v.label, np.int64))
                rows_dice.append(dice_per_organ(prediction[None], target[None], num_classes))
        per_organ = nanmean(torch.cat(rows_dice), dim=0)
        names = self.class_names or [f"class_{c}" for c in range(1, num_classes)]
        if len(names) == num_classes:
            names = names[1:]
        result = {f"dice_{n}": float(d) for n, d in zip(names, per_organ.tolist(), strict=True)}
        result["dice_mean"] = float(nanmean(per_organ))
        return result

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            result = self.probe(pl_module, trainer)
        finally:
            pl_module.train(was_training)
        for key, value in result.items():
            pl_module.log(f"probe/{key}", value, prog_bar=key == "dice_mean")
