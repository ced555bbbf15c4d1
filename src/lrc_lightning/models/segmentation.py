"""Supervised segmentation (pre-training or fine-tuning) with per-organ Dice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import CatMetric

from lrc_lightning.integrations.mixin import LRCMixin
from lrc_lightning.models.backbone import dense_channels
from lrc_lightning.models.metrics import (
    EMPTY_ORGAN_CONVENTIONS,
    EmptyOrgan,
    dice_per_organ,
    nanmean,
    soft_dice_loss,
)
from lrc_lightning.models.optim import (
    LRSchedule,
    OptimizerName,
    ReferenceModel,
    trainable_parameters,
)
from lrc_lightning.models.unet import UNet2d
from lrc_lightning.models.weights import BACKBONE_PREFIX, load_backbone_weights
from lrc_lightning.objective.term import LRCConfig

__all__ = [
    "FineTuneSegmentation",
    "SupervisedSegmentation",
    "SupervisedSegmentationLRC",
    "segmentation_head",
]


def _full_size(logits: Tensor, images: Tensor) -> Tensor:
    """Logits at the images' size: a backbone whose finest level is coarser than its input
    (MONAI's ``UNet`` stops at half size before its output layer) is upsampled."""
    if logits.shape[2:] == images.shape[2:]:
        return logits
    mode = "bilinear" if logits.ndim == 4 else "trilinear"
    return F.interpolate(logits, size=images.shape[2:], mode=mode, align_corners=False)


def segmentation_head(
    in_channels: int, num_classes: int, head_channels: int = 0, spatial_dims: int = 2
) -> nn.Module:
    """The classifier on the finest decoder features: a 1x1 convolution, or with
    ``head_channels > 0`` a 3x3 convolution to that many channels, batch norm and ReLU
    before it.

    Why the hidden layer, as observed (one draw, one seed; the mechanism is not
    established): on CHAOS T2 with ``UNet2d(width=8)``, whose finest features have 8
    channels, the 1x1 head left both kidneys at 0 Dice on its own *training* patient after
    600 steps; with 32 hidden channels all four organs were above 0.88 by step 200.

    Example:
        >>> import torch
        >>> head = segmentation_head(8, 5, head_channels=32)
        >>> head(torch.randn(2, 8, 16, 16)).shape
        torch.Size([2, 5, 16, 16])
        >>> segmentation_head(8, 5)
        Conv2d(8, 5, kernel_size=(1, 1), stride=(1, 1))

    Raises:
        ValueError: ``head_channels < 0`` or ``spatial_dims`` not 2 or 3.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if head_channels < 0:
        raise ValueError(f"head_channels must be >= 0 (0: a 1x1 head), got {head_channels}")
    conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    if head_channels == 0:
        return conv(in_channels, num_classes, kernel_size=1)
    norm = nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d
    return nn.Sequential(
        conv(in_channels, head_channels, kernel_size=3, padding=1, bias=False),
        norm(head_channels),
        nn.ReLU(inplace=True),
        conv(head_channels, num_classes, kernel_size=1),
    )


def _window_starts(length: int, window: int, overlap: float) -> list[int]:
    step = max(1, int(window * (1.0 - overlap)))
    starts = list(range(0, max(length - window, 0) + 1, step))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module, volume: Tensor, patch_size: tuple[int, ...], overlap: float = 0.5
) -> Tensor:
    """Logits of a whole (1, C, D, H, W) volume from (D', H', W') patches that overlap by
    ``overlap``, averaged where they overlap (the volume is zero-padded up to one patch).

    Example:
        >>> import torch
        >>> conv = torch.nn.Conv3d(1, 2, 1)
        >>> x = torch.randn(1, 1, 5, 9, 7)
        >>> torch.allclose(sliding_window_logits(conv, x, (4, 4, 4)), conv(x), atol=1e-6)
        True
    """
    spatial = volume.shape[2:]
    pad = [max(p - n, 0) for n, p in zip(spatial, patch_size, strict=True)]
    padded = F.pad(volume, [amount for p in reversed(pad) for amount in (0, p)])
    size = padded.shape[2:]
    total: Tensor | None = None
    counts = torch.zeros((1, 1, *size), device=volume.device)
    grids = [_window_starts(n, p, overlap) for n, p in zip(size, patch_size, strict=True)]
    for z in grids[0]:
        for y in grids[1]:
            for x in grids[2]:
                box = (..., slice(z, z + patch_size[0]), slice(y, y + patch_size[1]),
                       slice(x, x + patch_size[2]))  # fmt: skip
                logits = model(padded[box]).float()
                if total is None:
                    total = torch.zeros((1, logits.shape[1], *size), device=volume.device)
                total[box] += logits
                counts[box] += 1
    assert total is not None
    out = total / counts
    return out[..., : spatial[0], : spatial[1], : spatial[2]]


def _decoder_features(backbone: nn.Module, images: Tensor) -> list[Tensor]:
    if hasattr(backbone, "forward_features"):
        return list(backbone.forward_features(images)[1])  # type: ignore[operator]
    return [backbone(images)]


class SupervisedSegmentation(ReferenceModel):
    """Backbone + segmentation head (:func:`segmentation_head`) trained with cross-entropy
    + soft Dice.

    Training batches: ``image`` (B, 1, H, W) + ``label`` (B, H, W) (fine-tuning), or the two
    views ``image_v1``/``image_v2`` + ``label_v1``/``label_v2`` (pre-training mode with
    ``pretrain_with_labels``); label -1 is ignored. Validation/test batches: one volume,
    ``image`` (1, S, 1, H, W) + ``label`` (1, S, H, W), predicted slice by slice.

    Logs ``train/dice_mean`` (per 2D slice), ``{val,test}/dice_<organ>`` and
    ``{val,test}/dice_mean`` (per 3D volume); see :mod:`lrc_lightning.models.metrics` for the
    exact Dice definition. ``last_dice_table`` keeps the per-volume values of the last
    validation/test epoch for loggers.

    Args:
        backbone: default ``UNet2d()``; its finest decoder features feed the head.
        num_classes: classes including background.
        class_names: organ names for the logs (default ``class_1``...).
        dice_weight: weight of the soft Dice loss next to cross-entropy.
        eval_batch_size: slices per forward when predicting a volume (2D backbones).
        eval_patch_size: (D, H, W) patch of the sliding-window prediction of whole volumes
            with a 3D backbone (:class:`UNet3d`; windows overlap by half).
        empty_organ: Dice where a volume lacks an organ: ``"lrc"`` (this package's
            definition), or MONAI ``DiceMetric``'s ``"ignore"`` (``ignore_empty=True``) /
            ``"one"`` (``ignore_empty=False``); see
            :func:`lrc_lightning.models.metrics.dice_per_organ`.
        head_channels: 0 (default): a 1x1 convolution head; > 0: a 3x3 convolution to that
            many channels, batch norm and ReLU before it (:func:`segmentation_head`). Try it
            with narrow backbones: ``lrc-lightning benchmark`` fine-tunes with 32 since a
            width-8 backbone's 1x1 head failed to learn the kidneys there.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        num_classes: int = 5,
        class_names: list[str] | None = None,
        dice_weight: float = 1.0,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        lr_schedule: LRSchedule = "cosine",
        warmup_steps: int = 0,
        eval_batch_size: int = 32,
        ignore_index: int = -1,
        empty_organ: EmptyOrgan = "lrc",
        eval_patch_size: tuple[int, int, int] | None = None,
        head_channels: int = 0,
    ) -> None:
        super().__init__()
        if empty_organ not in EMPTY_ORGAN_CONVENTIONS:
            raise ValueError(
                f"empty_organ must be one of {EMPTY_ORGAN_CONVENTIONS}, got {empty_organ!r}"
            )
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + organs), got {num_classes}")
        names = list(class_names) if class_names else [f"class_{c}" for c in range(num_classes)]
        if len(names) == num_classes - 1:
            names = ["background", *names]
        if len(names) != num_classes:
            raise ValueError(
                f"class_names has {len(names)} names for {num_classes} classes "
                "(give all, or all but background)"
            )
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone if backbone is not None else UNet2d()
        self.spatial_dims = int(getattr(self.backbone, "spatial_dims", 2))
        self.head = segmentation_head(
            dense_channels(self.backbone, -1), num_classes, head_channels, self.spatial_dims
        )
        if self.spatial_dims == 3 and eval_patch_size is None:
            raise ValueError(
                f"{type(self.backbone).__name__} is 3D: give eval_patch_size=(D, H, W) for "
                "the sliding-window evaluation of whole volumes"
            )
        self.eval_patch_size = tuple(eval_patch_size) if eval_patch_size is not None else None
        self.num_classes = num_classes
        self.organ_names = names[1:]
        self.ignore_index = ignore_index
        self.empty_organ: EmptyOrgan = empty_organ
        # One row of per-organ Dice per volume; CatMetric gathers the rows of all ranks.
        self.volume_dice = CatMetric(nan_strategy="disable")
        self._volume_ids: list[str] = []
        self.last_dice_table: dict[str, list[float]] = {}

    def setup(self, stage: str) -> None:
        """Labels against ``num_classes`` before the first step: a label value the head has
        no output for is an ``IndexError`` deep in cross-entropy on a CPU and a device
        assert that ends the process on a GPU."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        config = getattr(datamodule, "config", None)
        allowed = getattr(config, "allowed_labels", None)
        if allowed:
            outside = sorted(v for v in allowed if v >= self.num_classes)
            if outside:
                raise ValueError(
                    f"the data declare label values {list(allowed)} but the model has "
                    f"num_classes={self.num_classes} (values 0..{self.num_classes - 1}): "
                    f"{outside} have no output; set num_classes={max(allowed) + 1}"
                )
        self._labels_checked = False

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> Tensor:
        """(B, C_in, *spatial) -> (B, num_classes, *spatial) logits (2D or 3D)."""
        return _full_size(self.head(_decoder_features(self.backbone, images)[-1]), images)

    def segmentation_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if not getattr(self, "_labels_checked", True):
            # Undeclared labels: the first batch is checked once (one host sync).
            self._labels_checked = True
            top = int(labels.max())
            if top >= self.num_classes:
                raise ValueError(
                    f"a training label has value {top} but the model has "
                    f"num_classes={self.num_classes} (values 0..{self.num_classes - 1}); "
                    f"set num_classes={top + 1} or declare the labels (dataset.json 'labels')"
                )
        ce = F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index)
        return ce + self.hparams["dice_weight"] * soft_dice_loss(logits, labels, self.ignore_index)

    @staticmethod
    def batch_views(batch: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        if "image" in batch:
            return [batch["image"]], [batch["label"]]
        if "label_v1" not in batch:
            raise KeyError(
                "supervised pre-training needs labels of both views: use LRCDataModule("
                f"mode='pretrain', pretrain_with_labels=True); the batch has {sorted(batch)}"
            )
        return [batch["image_v1"], batch["image_v2"]], [batch["label_v1"], batch["label_v2"]]

    def supervised_step(self, batch: dict[str, Any]) -> tuple[Tensor, list[Tensor]]:
        """Segmentation loss of the batch and the finest decoder features of each view."""
        images, labels = self.batch_views(batch)
        b = images[0].shape[0]
        stacked = torch.cat(images)
        features = _decoder_features(self.backbone, stacked)
        logits = _full_size(self.head(features[-1]), stacked)
        label = torch.cat(labels)
        loss = self.segmentation_loss(logits, label)
        with torch.no_grad():
            slice_dice = dice_per_organ(logits.argmax(1), label, self.num_classes, self.empty_organ)
        if self._trainer is not None:
            self.log("train/seg_loss", loss.detach(), prog_bar=True, batch_size=b)
            mean = nanmean(slice_dice)
            if not mean.isnan():
                self.log("train/dice_mean", mean, prog_bar=True, batch_size=b)
        return loss, list(features[self.dense_level].split(b))

    #: Decoder level returned as dense features (set by the LRC subclass).
    dense_level: int = -1

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.supervised_step(batch)[0]

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict_volume(self, volume: Tensor) -> Tensor:
        """(S, 1, H, W) image -> (S, H, W) class map: ``eval_batch_size`` slices at a time
        (2D), or sliding ``eval_patch_size`` windows over the volume (3D)."""
        if self.spatial_dims == 3:
            assert self.eval_patch_size is not None
            whole = volume.permute(1, 0, 2, 3).unsqueeze(0)  # (1, 1, S, H, W)
            return sliding_window_logits(self, whole, self.eval_patch_size)[0].argmax(0)
        size = self.hparams["eval_batch_size"]
        return torch.cat([self(chunk).argmax(1) for chunk in volume.split(size)])

    def _eval_step(self, batch: dict[str, Any]) -> Tensor:
        if batch["image"].ndim != 5:
            raise ValueError(
                "validation/test batches must be whole volumes (1, S, 1, H, W), got "
                f"{tuple(batch['image'].shape)}; LRCDataModule's val/test loaders give those"
            )
        prediction = self.predict_volume(batch["image"][0])
        dice = dice_per_organ(
            prediction[None], batch["label"][0][None], self.num_classes, self.empty_organ
        )
        self.volume_dice.update(dice)
        self._volume_ids += list(batch.get("case_id", ["?"]))
        return prediction

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._eval_step(batch)

    def _eval_epoch_end(self, stage: str) -> None:
        if not self._volume_ids and self.volume_dice.update_count == 0:
            return
        rows = self.volume_dice.compute().reshape(-1, self.num_classes - 1)
        self.volume_dice.reset()
        per_organ = nanmean(rows, dim=0)
        for name, value in zip(self.organ_names, per_organ.tolist(), strict=True):
            self.log(f"{stage}/dice_{name}", value, sync_dist=False)
        self.log(f"{stage}/dice_mean", float(nanmean(per_organ)), prog_bar=True)
        ids = (
            self._volume_ids
            if len(self._volume_ids) == len(rows)
            else [str(i) for i in range(len(rows))]
        )
        self.last_dice_table = {case: row.tolist() for case, row in zip(ids, rows, strict=True)}
        self._volume_ids = []

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")


class SupervisedSegmentationLRC(LRCMixin, SupervisedSegmentation):
    """Supervised pre-training + LRC (the paper's second setting): cross-entropy + Dice on
    both labelled views, plus LRC on their decoder features from the same forward pass.

    Args:
        lrc: LRC options (:class:`~lrc_lightning.LRCConfig`); the rest as
            :class:`SupervisedSegmentation`.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        lrc: LRCConfig | None = None,
        **segmentation_kwargs: Any,
    ) -> None:
        lrc = lrc if lrc is not None else LRCConfig()
        self.dense_level = lrc.feature_level
        super().__init__(backbone=backbone, **segmentation_kwargs)
        channels = dense_channels(self.backbone, lrc.feature_level)
        self.init_lrc(feature_channels=channels, config=lrc)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if "image_v1" not in batch:
            raise KeyError(
                "SupervisedSegmentationLRC needs two views: LRCDataModule(mode='pretrain')"
            )
        loss, (dense_v1, dense_v2) = self.supervised_step(batch)
        return loss + self.lrc_loss(
            dense_v1, dense_v2, batch["superpixels_v1"], batch["superpixels_v2"]
        )


class FineTuneSegmentation(SupervisedSegmentation):
    """Fine-tune a pre-trained backbone for segmentation with few labels.

    ``pretrained`` is a pre-training checkpoint (``.ckpt``; the weights under
    ``pretrained_prefix`` are taken) or a file from ``lrc-lightning export`` / plain
    ``torch.save(backbone.state_dict())``. Loading is strict: a clear error lists missing,
    unexpected and mis-shaped keys. ``pretrained=None`` is the random-init baseline.

    Args:
        pretrained, pretrained_prefix: where the backbone weights come from.
        freeze_backbone: train the head only (a linear probe with the default
            ``head_channels=0``).
        backbone_lr_scale: learning-rate factor of the pre-trained backbone.
        trust_checkpoint: load ``pretrained`` with the unrestricted unpickler, which runs
            whatever code the file asks for (default: the safe loader,
            :mod:`lrc_lightning.runtime.serialization`). Only for files you made yourself.
        Others: see :class:`SupervisedSegmentation`.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        pretrained: str | None = None,
        pretrained_prefix: str = BACKBONE_PREFIX,
        freeze_backbone: bool = False,
        backbone_lr_scale: float = 1.0,
        trust_checkpoint: bool = False,
        **segmentation_kwargs: Any,
    ) -> None:
        super().__init__(backbone=backbone, **segmentation_kwargs)
        if backbone_lr_scale <= 0:
            raise ValueError(f"backbone_lr_scale must be > 0, got {backbone_lr_scale}")
        if pretrained is not None:
            load_backbone_weights(
                self.backbone, Path(pretrained), pretrained_prefix, trust_checkpoint
            )
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def optimizer_parameters(self) -> list[Any]:
        h = self.hparams
        scale = h["backbone_lr_scale"]
        params = trainable_parameters(self)
        if scale == 1.0:
            return params
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        groups = [
            {"params": [p for p in params if id(p) in backbone_ids], "lr": h["lr"] * scale},
            {"params": [p for p in params if id(p) not in backbone_ids]},
        ]
        return [g for g in groups if g["params"]]
