"""LRCCallback: LRC for a Trainer, with or without LRCMixin in the module."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from lrc_lightning.heads import DenseProjectionHead
from lrc_lightning.loss import LocalizedRegionContrastLoss
from lrc_lightning.mixin import (
    SUPERPIXEL_KEYS,
    VIEW_KEYS,
    LRCMixin,
    check_batch_has_superpixels,
    log_lrc,
    lrc_term,
)
from lrc_lightning.regions import DownsampleMode
from lrc_lightning.schedules import DEFAULT_LRC_WEIGHT, WeightSchedule, lrc_weight

__all__ = ["LRCCallback"]

#: Name under which the callback registers its projection head on a module without the mixin.
HEAD_ATTRIBUTE = "lrc_head"


class LRCCallback(pl.Callback):
    """Owns the LRC weight schedule; adds LRC to modules that do not use the mixin.

    **With an** :class:`~lrc_lightning.LRCMixin` **module** (``feature_layer=None``): sets
    ``module.lrc_current_weight`` from the schedule before every step, checks that batches
    carry super-pixel maps and keeps its state in checkpoints. The module adds the term.

    **With any other module** (``feature_layer="decoder"``, ``feature_channels=C``): a
    forward hook captures that submodule's output, and the module's ``training_step`` is
    wrapped (on the instance, at ``setup``) so that ``lambda * L_LRC`` is added to the loss
    it returns. Lightning hooks cannot change a returned loss; the wrapped step runs inside
    the strategy's forward (DDP's too), so the added term's gradients are synchronised like
    the rest. The projection head is registered on the module as ``lrc_head`` and must be
    in the optimizer (``self.parameters()`` includes it; a clear error says otherwise).

    Which captured output is which view, per step:
      1. two outputs of batch size B -> the first is view 1, the second view 2;
      2. one output of batch size 2B (views concatenated) -> its halves;
      3. one output of batch size B -> view 1; view 2 is forwarded by the callback
         (``module(batch["image_v2"])``), e.g. for a supervised module;
      4. none -> both views are forwarded by the callback.

    Args:
        weight, schedule, warmup_steps: lambda and its schedule.
        feature_layer: dotted submodule name (``"decoder"``, ``"net.up.3"``) for modules
            without the mixin.
        feature_channels: channels of that layer's output (sizes the head before the
            optimizer is built).
        view_keys, superpixel_keys: batch keys of the images and maps of the two views.
        Others: the head and :class:`LocalizedRegionContrastLoss` arguments.
    """

    def __init__(
        self,
        weight: float = DEFAULT_LRC_WEIGHT,
        schedule: WeightSchedule = "constant",
        warmup_steps: int = 0,
        feature_layer: str | None = None,
        feature_channels: int | None = None,
        embedding_dim: int = 128,
        hidden_dim: int | None = None,
        temperature: float = 0.1,
        num_regions: int = 16,
        samples_per_region: int | None = 16,
        min_pixels: int = 4,
        downsample: DownsampleMode = "nearest",
        negatives_from_same_view: bool = False,
        gather_distributed: bool = False,
        view_keys: tuple[str, str] = VIEW_KEYS,
        superpixel_keys: tuple[str, str] = SUPERPIXEL_KEYS,
    ) -> None:
        super().__init__()
        lrc_weight(0, weight, schedule, warmup_steps)  # validates
        if feature_layer is not None and feature_channels is None:
            raise ValueError("feature_layer needs feature_channels (the layer's output channels)")
        self.weight = float(weight)
        self.schedule: WeightSchedule = schedule
        self.warmup_steps = int(warmup_steps)
        self.feature_layer = feature_layer
        self.feature_channels = feature_channels
        self.embedding_dim = embedding_dim
        self.hidden_dim = hidden_dim
        self.view_keys = tuple(view_keys)
        self.superpixel_keys = tuple(superpixel_keys)
        self.criterion = LocalizedRegionContrastLoss(
            temperature=temperature,
            num_regions=num_regions,
            samples_per_region=samples_per_region,
            min_pixels=min_pixels,
            downsample=downsample,
            negatives_from_same_view=negatives_from_same_view,
            gather_distributed=gather_distributed,
        )
        self.current_weight = lrc_weight(0, weight, schedule, warmup_steps)
        self._mode: str | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._original_step: Callable[..., Any] | None = None
        self._captured: list[Tensor] = []
        self._capturing = False
        self._loaded_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ set-up / teardown
    @property
    def state_key(self) -> str:
        return self._generate_state_key(feature_layer=self.feature_layer)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(pl_module, LRCMixin):
            if self.feature_layer is not None:
                raise ValueError(
                    f"{type(pl_module).__name__} uses LRCMixin, which adds the LRC term itself; "
                    "do not also give LRCCallback a feature_layer"
                )
            pl_module._require_lrc()
            self._mode = "mixin"
            return
        if self.feature_layer is None:
            raise ValueError(
                f"{type(pl_module).__name__} does not use LRCMixin: give LRCCallback "
                "feature_layer='<submodule name>' and feature_channels=<its channels> so it "
                "can capture decoder features, or mix LRCMixin into the module"
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "LRCCallback(feature_layer=...) adds its term to the loss returned by "
                "training_step, which manual optimisation ignores; use LRCMixin instead"
            )
        try:
            layer = pl_module.get_submodule(self.feature_layer)
        except AttributeError as err:
            names = [n for n, _ in pl_module.named_modules() if n][:20]
            raise ValueError(
                f"{type(pl_module).__name__} has no submodule {self.feature_layer!r}; "
                f"some of its submodules: {names}"
            ) from err
        if not hasattr(pl_module, HEAD_ATTRIBUTE):
            assert self.feature_channels is not None
            head = DenseProjectionHead(self.feature_channels, self.hidden_dim, self.embedding_dim)
            pl_module.add_module(HEAD_ATTRIBUTE, head.to(pl_module.device))
        self._hook = layer.register_forward_hook(self._capture)
        self._mode = "hook"
        self._wrap_training_step(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._original_step is not None:
            # Drop the instance attribute: the class's training_step is visible again.
            pl_module.__dict__.pop("training_step", None)
            self._original_step = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._mode != "hook":
            return
        in_optimizer = {
            id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]
        }
        head: nn.Module = getattr(pl_module, HEAD_ATTRIBUTE)
        if not all(id(p) in in_optimizer for p in head.parameters()):
            raise RuntimeError(
                f"LRCCallback registered its projection head as `{HEAD_ATTRIBUTE}` on "
                f"{type(pl_module).__name__}, but configure_optimizers() did not include its "
                "parameters. Build the optimizer from self.parameters(), or add "
                f"self.{HEAD_ATTRIBUTE}.parameters() to a param group."
            )

    # ------------------------------------------------------------------ per step
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        check_batch_has_superpixels(batch, self.superpixel_keys)
        self.current_weight = lrc_weight(
            trainer.global_step, self.weight, self.schedule, self.warmup_steps
        )
        if self._mode == "mixin":
            pl_module.lrc_current_weight = self.current_weight  # type: ignore[attr-defined]

    def _capture(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not self._capturing:
            return
        if not isinstance(output, Tensor) or output.ndim != 4:
            raise TypeError(
                f"LRCCallback feature_layer {self.feature_layer!r} must output a (B, C, h, w) "
                f"tensor, got {type(output).__name__}"
                + (f" of shape {tuple(output.shape)}" if isinstance(output, Tensor) else "")
            )
        self._captured.append(output)

    def _wrap_training_step(self, pl_module: pl.LightningModule) -> None:
        original = pl_module.training_step
        self._original_step = original

        @functools.wraps(original)
        def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            return self._step_with_lrc(pl_module, original, batch, *args, **kwargs)

        pl_module.training_step = training_step  # type: ignore[method-assign]

    def _forward_view(self, pl_module: pl.LightningModule, images: Tensor) -> Tensor:
        self._capturing = True
        try:
            before = len(self._captured)
            pl_module(images)
        finally:
            self._capturing = False
        if len(self._captured) == before:
            raise RuntimeError(
                f"forwarding a view through {type(pl_module).__name__} never reached "
                f"feature_layer {self.feature_layer!r}"
            )
        return self._captured[before]

    def _view_features(
        self, pl_module: pl.LightningModule, batch: Mapping[str, Any]
    ) -> tuple[Tensor, Tensor]:
        b = batch[self.superpixel_keys[0]].shape[0]
        captured = self._captured
        if len(captured) >= 2 and captured[0].shape[0] == b and captured[1].shape[0] == b:
            return captured[0], captured[1]
        if len(captured) >= 1 and captured[0].shape[0] == 2 * b:
            first, second = captured[0].chunk(2)
            return first, second
        if len(captured) == 1 and captured[0].shape[0] == b:
            return captured[0], self._forward_view(pl_module, batch[self.view_keys[1]])
        if not captured:
            first = self._forward_view(pl_module, batch[self.view_keys[0]])
            return first, self._forward_view(pl_module, batch[self.view_keys[1]])
        shapes = [tuple(c.shape) for c in captured]
        raise RuntimeError(
            f"cannot tell the two views apart in the outputs of {self.feature_layer!r} "
            f"captured during training_step (batch size {b}): {shapes}"
        )

    def _step_with_lrc(
        self,
        pl_module: pl.LightningModule,
        original: Callable[..., Any],
        batch: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        check_batch_has_superpixels(batch, self.superpixel_keys)
        self._captured = []
        self._capturing = True
        try:
            output = original(batch, *args, **kwargs)
        finally:
            self._capturing = False
        if output is None:  # the module skipped this batch
            return output
        features_v1, features_v2 = self._view_features(pl_module, batch)
        self._captured = []
        raw = lrc_term(
            getattr(pl_module, HEAD_ATTRIBUTE),
            self.criterion,
            features_v1,
            features_v2,
            batch[self.superpixel_keys[0]],
            batch[self.superpixel_keys[1]],
        )
        log_lrc(pl_module, raw, self.current_weight, features_v1.shape[0])
        term = raw * self.current_weight
        if isinstance(output, Mapping):
            if "loss" not in output:
                raise KeyError("training_step returned a dict without a 'loss' key")
            return {**output, "loss": output["loss"] + term}
        return output + term

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "weight": self.weight,
            "schedule": self.schedule,
            "warmup_steps": self.warmup_steps,
            "current_weight": self.current_weight,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_state = dict(state_dict)
        mine = self.state_dict()
        changed = {
            k: (state_dict[k], mine[k])
            for k in ("weight", "schedule", "warmup_steps")
            if k in state_dict and state_dict[k] != mine[k]
        }
        if changed:
            warnings.warn(
                f"LRCCallback resumed with a different schedule than the checkpoint's "
                f"(checkpoint, now): {changed}; the new one is used",
                stacklevel=2,
            )
        self.current_weight = float(state_dict.get("current_weight", self.current_weight))
