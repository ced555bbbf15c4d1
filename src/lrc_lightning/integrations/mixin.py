"""LRCMixin: add Localized Region Contrast to your own LightningModule in a few lines."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lrc_lightning.objective.batches import BatchFormat, BatchFormatName, LRCInputs
from lrc_lightning.objective.batches import batch_format as resolve_batch_format
from lrc_lightning.objective.heads import DenseProjectionHead
from lrc_lightning.objective.loss import LocalizedRegionContrastLoss
from lrc_lightning.objective.term import (
    HEAD_OPTIONS,
    LRCConfig,
    build_criterion,
    build_head,
    check_head_sizes,
    log_lrc,
    lrc_term,
    trainer_step,
    warn_if_too_coarse,
)

__all__ = ["LRCConfig", "LRCMixin", "SUPERPIXEL_KEYS", "VIEW_KEYS"]

#: Checkpoint entry of LRC's own records (the callback's head, the mixin's options).
CHECKPOINT_KEY = "lrc_lightning"
#: Batch keys of the two views and of their super-pixel maps (LRCDataModule's names).
VIEW_KEYS = ("image_v1", "image_v2")
SUPERPIXEL_KEYS = ("superpixels_v1", "superpixels_v2")


class LRCMixin:
    """Adds the LRC objective to a LightningModule (``pytorch_lightning`` or
    ``lightning.pytorch``: the mixin imports neither).

    Put it first in the bases, call :meth:`init_lrc` in ``__init__`` and add
    :meth:`lrc_loss` to the loss in ``training_step``::

        class MyMoCoLRC(LRCMixin, MyMoCo):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.init_lrc(feature_channels=32)              # or None: inferred

            def training_step(self, batch, batch_idx):
                loss = super().training_step(batch, batch_idx)  # global objective
                x1, x2, s1, s2 = self.lrc_inputs(batch)         # any batch structure
                f1, f2 = self.decoder_features(x1), self.decoder_features(x2)
                return loss + self.lrc_loss(f1, f2, s1, s2)

    ``lrc_loss`` returns ``lambda * L_LRC`` and logs ``train/lrc_loss`` (unweighted) and
    ``train/lrc_weight``. lambda follows :meth:`LRCConfig.weight_at` of the Trainer's
    ``global_step``, so it needs no callback and resumes with the step. On the first step
    with a Trainer, a warning says if fewer than 2 regions per image reach the loss.
    """

    lrc_head: DenseProjectionHead
    lrc_criterion: LocalizedRegionContrastLoss
    lrc_config: LRCConfig

    def init_lrc(
        self,
        feature_channels: int | None = None,
        config: LRCConfig | None = None,
        batch_format: BatchFormatName | BatchFormat = "dict",
        **options: Any,
    ) -> None:
        """Build the projection head and the loss. Call once in ``__init__``.

        Args:
            feature_channels: channels of the features passed to :meth:`lrc_loss`; ``None``
                infers them at the first call (before a DDP run, give them or run one step).
            config: the LRC options (:class:`LRCConfig`; default: its defaults).
            batch_format: where :meth:`lrc_inputs` finds views and maps
                (:mod:`lrc_lightning.objective.batches`).
            **options: :class:`LRCConfig` fields that override ``config``
                (``init_lrc(32, weight=1.0, schedule="linear", warmup_steps=100)``).

        Raises:
            TypeError: not an ``nn.Module``, or an unknown option.
        """
        if not isinstance(self, nn.Module):
            raise TypeError("LRCMixin must be mixed into a LightningModule (an nn.Module)")
        resolved = (config if config is not None else LRCConfig()).replace(**options)
        self.lrc_config = resolved
        self.lrc_head = build_head(resolved, feature_channels)
        self.lrc_criterion = build_criterion(resolved)
        self.lrc_batch_format = resolve_batch_format(batch_format)
        self._lrc_regions_checked = False

    def _require_lrc(self) -> None:
        if not hasattr(self, "lrc_head"):
            raise RuntimeError(
                f"{type(self).__name__} uses LRCMixin but init_lrc() was never called; "
                "call self.init_lrc(feature_channels=...) in __init__"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Records the LRC options beside the weights, so that a resume with other head
        sizes can name the option that differs."""
        if hasattr(self, "lrc_config"):
            checkpoint.setdefault(CHECKPOINT_KEY, {})["config"] = self.lrc_config.as_dict()
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming with another head size (``embedding_dim``, ``hidden_dim``, or another
        feature layer's channels) is a clear error, not a state_dict size mismatch."""
        if hasattr(self, "lrc_head"):
            config = self.lrc_config.as_dict()
            check_head_sizes(
                checkpoint.get("state_dict", {}),
                self.lrc_head,
                "lrc_head.",
                type(self).__name__,
                checkpoint.get(CHECKPOINT_KEY, {}).get("config"),
                {k: config[k] for k in HEAD_OPTIONS},
                "the features given to lrc_loss (init_lrc's feature_channels; the reference "
                "models: lrc.feature_level or lrc_feature_channels)",
            )
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)

    @property
    def lrc_current_weight(self) -> float:
        """lambda at the Trainer's current step (the schedule's value at step 0 without one)."""
        self._require_lrc()
        return self.lrc_config.weight_at(trainer_step(self))

    def lrc_inputs(self, batch: Any) -> LRCInputs:
        """``(view_1, view_2, superpixels_1, superpixels_2)`` of ``batch``, read with the
        ``batch_format`` given to :meth:`init_lrc`."""
        self._require_lrc()
        return self.lrc_batch_format.inputs(batch)

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
            features_v1, features_v2: (B, C, *spatial) features of the two views
                (C = ``feature_channels``; 2D or 3D).
            superpixels_v1, superpixels_v2: (B, *full_spatial) int region ids of the two
                views (-1 = ignore); brought to the features' size by the loss.
            log: log ``train/lrc_loss`` and ``train/lrc_weight``.

        Returns:
            Scalar tensor to add to the module's own loss.
        """
        self._require_lrc()
        if not self._lrc_regions_checked and getattr(self, "_trainer", None) is not None:
            self._lrc_regions_checked = True
            warn_if_too_coarse(
                self.lrc_criterion,
                tuple(features_v1.shape),
                superpixels_v1,
                superpixels_v2,
                f"{type(self).__name__}.lrc_loss",
            )
        raw = lrc_term(
            self.lrc_head,
            self.lrc_criterion,
            features_v1,
            features_v2,
            superpixels_v1,
            superpixels_v2,
        )
        weight = self.lrc_current_weight
        if log:
            log_lrc(self, raw, weight, features_v1.shape[0])
        return raw * weight
