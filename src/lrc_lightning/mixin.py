"""LRCMixin: add Localized Region Contrast to your own LightningModule in a few lines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lrc_lightning.heads import DenseProjectionHead
from lrc_lightning.loss import LocalizedRegionContrastLoss
from lrc_lightning.regions import DownsampleMode
from lrc_lightning.schedules import DEFAULT_LRC_WEIGHT, WeightSchedule, lrc_weight

if TYPE_CHECKING:
    from pytorch_lightning import Callback

__all__ = ["LRCConfig", "LRCMixin", "lrc_term", "SUPERPIXEL_KEYS", "VIEW_KEYS"]

#: Batch keys of the two views and of their super-pixel maps (LRCDataModule's names).
VIEW_KEYS = ("image_v1", "image_v2")
SUPERPIXEL_KEYS = ("superpixels_v1", "superpixels_v2")


def lrc_term(
    head: nn.Module,
    criterion: LocalizedRegionContrastLoss,
    features_v1: Tensor,
    features_v2: Tensor,
    superpixels_v1: Tensor,
    superpixels_v2: Tensor,
) -> Tensor:
    """Unweighted LRC loss of two views' features (shared by the mixin and the callback).

    The loss runs the head on the sampled pixels of both views in one call (BatchNorm sees
    both, as MoCo's and SimCLR's projectors do on the concatenated batch).
    """
    if features_v1.shape != features_v2.shape:
        raise ValueError(
            "the two views' features differ in shape: "
            f"{tuple(features_v1.shape)} vs {tuple(features_v2.shape)}"
        )
    return criterion(features_v1, features_v2, superpixels_v1, superpixels_v2, projector=head)


def check_batch_has_superpixels(batch: Any, keys: Sequence[str] = SUPERPIXEL_KEYS) -> None:
    """Raise a clear error when a batch carries no super-pixel maps."""
    if not isinstance(batch, Mapping) or any(k not in batch for k in keys):
        found = sorted(batch.keys()) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(
            f"LRC needs super-pixel maps in every training batch under the keys {list(keys)}, "
            f"but the batch has {found}. Use lrc_lightning.LRCDataModule (pre-training mode), "
            "or add maps computed with lrc_lightning.superpixels.felzenszwalb to your batches."
        )


@dataclass
class LRCConfig:
    """The LRC options of :meth:`LRCMixin.init_lrc`, as one config block (LightningCLI's
    ``model.init_args.lrc``). ``feature_level`` picks the decoder level of the reference
    models' backbone (-1: the finest)."""

    weight: float = DEFAULT_LRC_WEIGHT
    schedule: WeightSchedule = "constant"
    warmup_steps: int = 0
    temperature: float = 0.1
    num_regions: int = 16
    samples_per_region: int | None = 16
    min_pixels: int = 4
    downsample: DownsampleMode = "nearest"
    negatives_from_same_view: bool = False
    gather_distributed: bool = False
    embedding_dim: int = 128
    hidden_dim: int | None = None
    feature_level: int = -1

    def init_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`LRCMixin.init_lrc` (all but ``feature_channels``)."""
        kwargs = asdict(self)
        kwargs.pop("feature_level")
        return kwargs


# Lightning saves hyper-parameters in checkpoints and reloads them with
# torch.load(weights_only=True): the config must be an allowed global to resume.
torch.serialization.add_safe_globals([LRCConfig])


class LRCMixin:
    """Adds the LRC objective to a LightningModule.

    Put it first in the bases, call :meth:`init_lrc` in ``__init__`` and add
    :meth:`lrc_loss` to the loss in ``training_step``::

        class MyMoCoLRC(LRCMixin, MyMoCo):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.init_lrc(feature_channels=32)

            def training_step(self, batch, batch_idx):
                loss = super().training_step(batch, batch_idx)      # global objective
                f1, f2 = self.decoder_features(batch["image_v1"]), ...
                return loss + self.lrc_loss(f1, f2, batch["superpixels_v1"],
                                            batch["superpixels_v2"])

    ``lrc_loss`` returns ``lambda * L_LRC`` and logs ``train/lrc_loss`` (unweighted) and
    ``train/lrc_weight``. lambda follows the schedule given to ``init_lrc``; an
    :class:`~lrc_lightning.LRCCallback` (attached automatically through
    ``configure_callbacks`` unless ``attach_callback=False``) updates it every step, checks
    the batches and stores its state in checkpoints.
    """

    lrc_head: DenseProjectionHead
    lrc_criterion: LocalizedRegionContrastLoss
    lrc_current_weight: float

    def init_lrc(
        self,
        feature_channels: int,
        embedding_dim: int = 128,
        hidden_dim: int | None = None,
        weight: float = DEFAULT_LRC_WEIGHT,
        schedule: WeightSchedule = "constant",
        warmup_steps: int = 0,
        temperature: float = 0.1,
        num_regions: int = 16,
        samples_per_region: int | None = 16,
        min_pixels: int = 4,
        downsample: DownsampleMode = "nearest",
        negatives_from_same_view: bool = False,
        gather_distributed: bool = False,
        attach_callback: bool = True,
    ) -> None:
        """Build the projection head and the loss. Call once in ``__init__``.

        Args:
            feature_channels: channels of the decoder features passed to :meth:`lrc_loss`.
            embedding_dim, hidden_dim: projection head sizes (hidden defaults to input).
            weight, schedule, warmup_steps: lambda and its schedule
                (:func:`lrc_lightning.schedules.lrc_weight`).
            attach_callback: return an :class:`LRCCallback` with this schedule from
                ``configure_callbacks`` (it replaces any LRCCallback given to the Trainer).
            Others: see :class:`LocalizedRegionContrastLoss`.
        """
        if not isinstance(self, nn.Module):
            raise TypeError("LRCMixin must be mixed into a LightningModule (an nn.Module)")
        self.lrc_head = DenseProjectionHead(feature_channels, hidden_dim, embedding_dim)
        self.lrc_criterion = LocalizedRegionContrastLoss(
            temperature=temperature,
            num_regions=num_regions,
            samples_per_region=samples_per_region,
            min_pixels=min_pixels,
            downsample=downsample,
            negatives_from_same_view=negatives_from_same_view,
            gather_distributed=gather_distributed,
        )
        lrc_weight(0, weight, schedule, warmup_steps)  # validates the schedule arguments
        self.lrc_base_weight = float(weight)
        self.lrc_schedule: WeightSchedule = schedule
        self.lrc_warmup_steps = int(warmup_steps)
        self.lrc_current_weight = lrc_weight(0, weight, schedule, warmup_steps)
        self._lrc_attach_callback = attach_callback

    def _require_lrc(self) -> None:
        if not hasattr(self, "lrc_head"):
            raise RuntimeError(
                f"{type(self).__name__} uses LRCMixin but init_lrc() was never called; "
                "call self.init_lrc(feature_channels=...) in __init__"
            )

    def lrc_loss(
        self,
        features_v1: Tensor,
        features_v2: Tensor,
        superpixels_v1: Tensor,
        superpixels_v2: Tensor,
        log: bool = True,
    ) -> Tensor:
        """Weighted LRC term ``lambda * L_LRC`` for two views.

        Args:
            features_v1, features_v2: (B, C, h, w) decoder features of the two views
                (C = ``feature_channels``).
            superpixels_v1, superpixels_v2: (B, H, W) int region ids of the two views
                (-1 = ignore); brought to (h, w) by the loss.
            log: log ``train/lrc_loss`` and ``train/lrc_weight``.

        Returns:
            Scalar tensor to add to the module's own loss.
        """
        self._require_lrc()
        raw = lrc_term(
            self.lrc_head,
            self.lrc_criterion,
            features_v1,
            features_v2,
            superpixels_v1,
            superpixels_v2,
        )
        if log:
            log_lrc(self, raw, self.lrc_current_weight, features_v1.shape[0])
        return raw * self.lrc_current_weight

    def configure_callbacks(self) -> Sequence[Callback] | Callback:
        parent = super().configure_callbacks()  # type: ignore[misc]
        if not getattr(self, "_lrc_attach_callback", False):
            return parent
        from lrc_lightning.callback import LRCCallback

        parent_list = [parent] if not isinstance(parent, Sequence) else list(parent)
        own = LRCCallback(
            weight=self.lrc_base_weight,
            schedule=self.lrc_schedule,
            warmup_steps=self.lrc_warmup_steps,
        )
        return [*parent_list, own]


def log_lrc(module: Any, raw: Tensor, weight: float, batch_size: int) -> None:
    """Log the unweighted LRC loss and lambda (no-op without a Trainer)."""
    if getattr(module, "_trainer", None) is None:
        return
    module.log(
        "train/lrc_loss",
        raw.detach(),
        on_step=True,
        on_epoch=True,
        prog_bar=True,
        batch_size=batch_size,
    )
    module.log(
        "train/lrc_weight", float(weight), on_step=True, on_epoch=False, batch_size=batch_size
    )
