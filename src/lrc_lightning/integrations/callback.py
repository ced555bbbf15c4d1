"""LRCCallback: LRC for a Trainer, on a module that was not written for it.

The hooks live in :class:`LRCCallbackBase`, which imports no Lightning package;
:class:`LRCCallback` puts them on ``pytorch_lightning.Callback`` and
``lrc_lightning.lightning.LRCCallback`` on ``lightning.pytorch.Callback``, so that each
Trainer gets a callback of its own namespace.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from lrc_lightning.integrations.layers import (
    dense_candidates,
    find_feature_layers,
    first_tensor,
    format_layers,
)
from lrc_lightning.integrations.mixin import CHECKPOINT_KEY, LRCMixin
from lrc_lightning.objective.batches import BatchFormat, BatchFormatName, LRCInputs
from lrc_lightning.objective.batches import batch_format as resolve_batch_format
from lrc_lightning.objective.heads import DenseProjectionHead
from lrc_lightning.objective.term import (
    LRCConfig,
    build_criterion,
    build_head,
    check_head_sizes,
    log_lrc,
    lrc_term,
    trainer_step,
    warn_if_too_coarse,
)
from lrc_lightning.runtime.user_warnings import warn_user

__all__ = ["CHECKPOINT_KEY", "HEAD_ATTRIBUTE", "LRCCallback", "LRCCallbackBase"]

#: Name under which the callback registers its projection head on the module while fitting.
HEAD_ATTRIBUTE = "lrc_head"
_PREFIX = HEAD_ATTRIBUTE + "."


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts))]


def _same(x: Tensor, view: Tensor) -> bool:
    return x is view or (
        x.shape == view.shape and x.device == view.device and x.data_ptr() == view.data_ptr()
    )


def _equal(x: Tensor, view: Tensor) -> bool:
    """``x`` holds ``view``'s values (a copy: ``clone``, ``contiguous``, a cast)."""
    if x.shape != view.shape or x.device != view.device:
        return False
    if x.dtype != view.dtype:
        if not (x.is_floating_point() and view.is_floating_point()):
            return False
        view = view.to(x.dtype)
    return bool(torch.equal(x, view))


#: View tags of a captured output: view 1, view 2, both views concatenated in this order
#: (view 1 first), or in the reverse order. None: not a view (never guessed).
_V1, _V2, _V12, _V21 = 0, 1, 2, 3


def _view_tag(x: Tensor, views: tuple[Tensor, Tensor]) -> int | None:
    """Which view ``x`` is: the same tensor, else the same values (one comparison on the
    device, made only when the tensor is not a view itself), else None."""
    v1, v2 = views
    if _same(x, v1):
        return _V1
    if _same(x, v2):
        return _V2
    if _equal(x, v1):
        return _V1
    if _equal(x, v2):
        return _V2
    b = v1.shape[0]
    if x.ndim == v1.ndim and x.shape[0] == 2 * b and x.shape[1:] == v1.shape[1:]:
        first, second = x[:b], x[b:]
        if _equal(first, v1) and _equal(second, v2):
            return _V12
        if _equal(first, v2) and _equal(second, v1):
            return _V21
    return None


class LRCCallbackBase:
    """Adds LRC to a LightningModule that was not written for it.

    A forward hook captures the output of ``feature_layer`` while the module's own
    ``training_step`` runs, and the step (wrapped on the instance, at ``setup``) returns its
    loss plus ``lambda * L_LRC``. The wrapped step runs inside the strategy's forward (DDP's
    too), so the term's gradients are synchronised like the rest. lambda follows
    ``config.weight_at(trainer.global_step)``.

    Which output is which view: each view is recognised by its input tensor (the callback
    watches the layers that enclose ``feature_layer``), so the order of calls does not
    matter. When the step runs view 2 only through a momentum or target copy of the network
    (lightly's documented MoCo example: the key view goes through ``backbone_momentum``
    only), give that copy's layer as ``target_layer``: its output is view 2's features and
    no extra forward is made (the LRC gradient then reaches the online network through
    view 1, as the momentum branch gets none). A step that runs both views through both
    branches (solo-learn's MoCoV2Plus and BYOL, lightly's BYOL) already gives the online
    layer both views' outputs, which are used first; ``target_layer`` is then not needed.
    A copy of a view (``clone``, a cast) and the two views concatenated
    (``torch.cat([x1, x2])``, either order) are recognised by their values. Outputs of any
    other input (a view normalised in the step, say) are never paired by call order or
    size: a view without a matched output is forwarded once more through the module by the
    callback, with a warning the first time (:attr:`extra_forwards` counts).

    The projection head is registered on the module as ``lrc_head`` while fitting, so the
    optimizer (``self.parameters()``) and DDP see it. It is kept out of the module's
    checkpoint ``state_dict`` (in the checkpoint's ``"lrc_lightning"`` entry instead), so a
    checkpoint loads into the unmodified module; resuming puts it back. After ``fit`` the
    head is removed from the module (the callback keeps it: ``trainer.save_checkpoint``
    after ``fit`` still writes it). A module whose optimizer takes parameter groups from a
    ``learnable_params`` property (solo-learn's methods) gets the head there too, as the
    group ``"lrc_head"``, while fitting. Resuming such a checkpoint needs the callback (its
    optimizer state holds the head; with LRCDataModule, a Trainer without the callback gets
    an error that says so). A fit that raises leaves the module as after ``fit``
    (``on_exception``): no hook, wrapped method or head stays for the next fit.

    The module's own loss is checked once, at the first step: not finite on a tuple batch
    whose targets are all -1 (unlabelled), it is an error naming the cause (a classifier
    loss that averages over no target, as solo-learn's online classifier does).

    The channels of ``feature_layer`` are read from one dry forward (no gradients, eval
    mode) of the module's ``example_input_array`` or of the data module's
    ``example_input()``, which also lets a wrong layer name be answered with the dense
    layers and their shapes. Without either, the head infers them at the first step (not
    possible under DDP: give ``feature_channels``). A warning says, once, when fewer than 2
    regions per image reach the loss.

    Args:
        config: the LRC options (:class:`~lrc_lightning.LRCConfig`).
        feature_layer: dotted submodule name (``"decoder"``, ``"backbone.6"``).
        feature_channels: that layer's output channels (inferred when possible).
        target_layer: the same layer in a momentum or target branch that the step already
            runs on view 2 (``"backbone_momentum.6"``).
        batch_format: where the views and maps are in a batch: ``"dict"``, ``"lightly"``,
            ``"solo-learn"``, a :class:`~lrc_lightning.objective.batches.KeyPathBatch` or a callable
            (:mod:`lrc_lightning.objective.batches`). The module's step gets the batch it expects.
        **options: :class:`~lrc_lightning.LRCConfig` fields that override ``config``.

    With an :class:`~lrc_lightning.LRCMixin` module the callback is not needed (the mixin
    adds the term and follows lambda's schedule itself); given one anyway, it only mirrors
    ``current_weight`` and must get no layer and no options.

    Example:
        >>> import pytorch_lightning as pl
        >>> lrc = LRCCallback(feature_layer="backbone.decoders.2", weight=0.3)
        >>> trainer = pl.Trainer(callbacks=[lrc], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        config: LRCConfig | None = None,
        feature_layer: str | None = None,
        feature_channels: int | None = None,
        target_layer: str | None = None,
        batch_format: BatchFormatName | BatchFormat = "dict",
        **options: Any,
    ) -> None:
        super().__init__()
        self._configured = config is not None or bool(options)
        self.config = (config if config is not None else LRCConfig()).replace(**options)
        if target_layer is not None and feature_layer is None:
            raise ValueError("target_layer needs feature_layer (the online branch's layer)")
        self.feature_layer = feature_layer
        self.feature_channels = feature_channels
        self.target_layer = target_layer
        self.batch_format = resolve_batch_format(batch_format)
        self.criterion = build_criterion(self.config)
        self.head: DenseProjectionHead | None = None
        self.current_weight = self.config.weight_at(0)
        #: Views forwarded again by the callback because the step did not run them.
        self.extra_forwards = 0
        self._mode: str | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._wrapped: list[str] = []
        self._online: list[tuple[int | None, Tensor]] = []
        self._target: list[tuple[int | None, Tensor]] = []
        self._views: tuple[Tensor, Tensor] | None = None
        self._view_stack: list[int | None] = []
        self._capturing = False
        self._regions_checked = False
        self._loss_checked = False
        self._warned_extra: set[str] = set()
        #: The module's class while a subclass adds the head to its learnable_params.
        self._original_class: type | None = None

    # ------------------------------------------------------------------ set-up / teardown
    @property
    def adds_head_to_optimizer(self) -> bool:
        """This callback registered its head on the module for a fit (not an LRCMixin
        module's): that fit's optimizer, and its checkpoints' optimizer state, hold the
        head's parameters, so resuming them needs the callback."""
        return self._mode == "hook" and self.head is not None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(feature_layer=self.feature_layer)  # type: ignore[attr-defined]

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if getattr(getattr(trainer, "datamodule", None), "superpixels_in_batch", True) is False:
            raise ValueError(
                "LRCCallback needs the super-pixel maps, but the data module was made with "
                "superpixels_in_batch=False (for the baseline run without LRC); drop that "
                "option (or the callback)"
            )
        if isinstance(pl_module, LRCMixin):
            self._setup_mixin(pl_module)
            return
        if self.feature_layer is None:
            raise ValueError(
                f"{type(pl_module).__name__} does not use LRCMixin: give LRCCallback "
                "feature_layer='<submodule name>' so it can capture dense features "
                "(lrc_lightning.find_feature_layers(module, example_input) lists them), or "
                "mix LRCMixin into the module"
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "LRCCallback(feature_layer=...) adds its term to the loss returned by "
                "training_step, which manual optimisation ignores; use LRCMixin instead"
            )
        example = _example_input(trainer, pl_module)
        layers = _dry_run(pl_module, example)
        layer = self._resolve(pl_module, self.feature_layer, layers, example)
        target = (
            self._resolve(pl_module, self.target_layer, layers, example)
            if self.target_layer is not None
            else None
        )
        channels = self._channels(pl_module, layers, trainer)
        if self.head is None:
            self.head = build_head(self.config, channels)
        existing = getattr(pl_module, HEAD_ATTRIBUTE, None)
        if existing is not None and existing is not self.head:
            raise ValueError(
                f"{type(pl_module).__name__} already has an attribute `{HEAD_ATTRIBUTE}`; "
                "LRCCallback needs that name for its projection head"
            )
        pl_module.add_module(HEAD_ATTRIBUTE, self.head.to(pl_module.device))
        self._extend_learnable_params(pl_module)
        self._install_hooks(pl_module, layer, target)
        self._wrap(pl_module, "training_step", self._step_with_lrc)
        self._wrap(pl_module, "on_save_checkpoint", self._save_head)
        self._wrap(pl_module, "on_load_checkpoint", self._load_head)
        self._mode = "hook"

    def _extend_learnable_params(self, pl_module: Any) -> None:
        """solo-learn builds its optimizer from ``self.learnable_params`` (a property that
        lists parameter groups), not ``self.parameters()``: the head is added there as its
        own group, on a subclass of the module's class set on this instance for the fit
        (a property cannot be overridden per instance); teardown restores the class."""
        cls = type(pl_module)
        prop = getattr(cls, "learnable_params", None)
        if not isinstance(prop, property) or prop.fget is None:
            return
        head, own = self.head, prop.fget
        assert head is not None

        def learnable_params(module: Any) -> list[Any]:
            groups = list(own(module))
            return [*groups, {"name": HEAD_ATTRIBUTE, "params": list(head.parameters())}]

        namespace = {"learnable_params": property(learnable_params),
                     "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                     "__doc__": cls.__doc__}  # fmt: skip
        pl_module.__class__ = type(cls.__name__, (cls,), namespace)
        self._original_class = cls

    def _setup_mixin(self, pl_module: Any) -> None:
        if self.feature_layer is not None or self._configured:
            raise ValueError(
                f"{type(pl_module).__name__} uses LRCMixin, which adds the LRC term itself "
                "with the options of its init_lrc(); give LRCCallback no feature_layer and "
                "no LRC options for it (or drop the callback: the mixin needs none)"
            )
        pl_module._require_lrc()
        self._mode = "mixin"

    def _resolve(
        self, pl_module: nn.Module, name: str, layers: list[Any] | None, example: Any
    ) -> nn.Module:
        try:
            return pl_module.get_submodule(name)
        except AttributeError:
            pass
        cls = type(pl_module).__name__
        if layers is not None:
            shape = tuple(example.shape) if isinstance(example, Tensor) else "the example"
            listing = format_layers(dense_candidates(layers))
            raise ValueError(
                f"{cls} has no submodule {name!r}. Its dense outputs, finest first, for an "
                f"input of {shape}:\n{listing}"
            )
        names = [n for n, _ in pl_module.named_modules() if n]
        raise ValueError(
            f"{cls} has no submodule {name!r}. Its {len(names)} submodules: {names[:60]}"
            + (" ..." if len(names) > 60 else "")
            + ". Set example_input_array on the module (or use LRCDataModule) and this "
            "error lists the dense ones with their output shapes, finest first."
        )

    def _channels(self, pl_module: nn.Module, layers: list[Any] | None, trainer: Any) -> int | None:
        assert self.feature_layer is not None
        seen = [layer for layer in layers or [] if layer.name == self.feature_layer]
        if seen:
            shape = seen[0].shape
            if len(shape) not in (4, 5):
                raise TypeError(
                    f"feature_layer {self.feature_layer!r} outputs shape {shape}; LRC needs "
                    "dense (B, C, h, w) or (B, C, d, h, w) features. Dense candidates, "
                    f"finest first:\n{format_layers(dense_candidates(layers or []))}"
                )
            _refuse_single_pixel(self.feature_layer, shape, layers or [])
            if self.feature_channels is not None and self.feature_channels != shape[1]:
                raise ValueError(
                    f"feature_channels={self.feature_channels}, but feature_layer "
                    f"{self.feature_layer!r} outputs shape {shape} ({shape[1]} channels); "
                    "leave feature_channels out to infer it"
                )
            return int(shape[1])
        if self.feature_channels is None and getattr(trainer, "world_size", 1) > 1:
            raise ValueError(
                f"LRCCallback cannot infer the channels of {self.feature_layer!r} of "
                f"{type(pl_module).__name__} before DDP wraps it: give feature_channels=..., "
                "set example_input_array on the module, or use LRCDataModule"
            )
        return self.feature_channels  # None: the head infers them at the first step

    def _install_hooks(
        self, pl_module: nn.Module, layer: nn.Module, target: nn.Module | None
    ) -> None:
        online = self._capture_into(self._online, self.feature_layer or "")
        self._handles.append(layer.register_forward_hook(online))
        watched = set(_ancestors(self.feature_layer or ""))
        if target is not None:
            captured = self._capture_into(self._target, self.target_layer or "")
            self._handles.append(target.register_forward_hook(captured))
            watched |= set(_ancestors(self.target_layer or ""))
        for name in sorted(watched):
            module = pl_module.get_submodule(name) if name else pl_module
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._leave))

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._restore(pl_module)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """A fit that raised (in the module's step, a hook, or the callback's own checks)
        leaves the module as ``teardown`` does: Lightning calls no callback ``teardown``
        then, and a second ``fit`` in the same process (a notebook) would find the hooks, the
        wrapped step and the head of this one."""
        if pl_module is not None:
            self._restore(pl_module)

    def _restore(self, pl_module: Any) -> None:
        """Remove what setup installed (each part on its own, so that a setup that raised
        half-way is undone too): the module is the user's module again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for name in self._wrapped:
            # Drop the instance attribute: the class's method is visible again.
            pl_module.__dict__.pop(name, None)
        self._wrapped = []
        if self._original_class is not None:
            pl_module.__class__ = self._original_class
            self._original_class = None
        if self.head is not None and getattr(pl_module, HEAD_ATTRIBUTE, None) is self.head:
            # After fit the module is the user's module again (its checkpoints load into it);
            # the callback keeps the head for the next fit.
            delattr(pl_module, HEAD_ATTRIBUTE)
        self._capturing = False
        self._clear()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._mode != "hook":
            return
        in_optimizer = {
            id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]
        }
        assert self.head is not None
        if not all(id(p) in in_optimizer for p in self.head.parameters()):
            raise RuntimeError(
                f"LRCCallback registered its projection head as `{HEAD_ATTRIBUTE}` on "
                f"{type(pl_module).__name__}, but configure_optimizers() did not include its "
                "parameters. Build the optimizer from self.parameters(), or add "
                f"self.{HEAD_ATTRIBUTE}.parameters() to a param group."
            )

    # ------------------------------------------------------------------ per step
    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._mode == "mixin":
            self.current_weight = pl_module.lrc_current_weight
        else:
            self.current_weight = self.config.weight_at(trainer.global_step)

    def _capture_into(
        self, store: list[tuple[int | None, Tensor]], name: str
    ) -> Callable[..., None]:
        def capture(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self._capturing:
                return
            tensor = first_tensor(output)
            if tensor is None or tensor.ndim not in (4, 5):
                raise TypeError(
                    f"LRCCallback's layer {name!r} ({type(module).__name__}) must output "
                    "dense (B, C, h, w) or (B, C, d, h, w) features, got "
                    + (
                        f"shape {tuple(tensor.shape)}"
                        if tensor is not None
                        else type(output).__name__
                    )
                )
            store.append((self._view_stack[-1] if self._view_stack else None, tensor))

        return capture

    def _enter(self, module: nn.Module, args: Any) -> None:
        """Which view runs through this ancestor of the feature layer: the view it was
        called with (the same tensor or a copy of it), else the view of the enclosing call
        (None: not a view, e.g. a normalised one; such outputs are never paired)."""
        if not self._capturing or self._views is None:
            return
        x = first_tensor(args)
        inherited = self._view_stack[-1] if self._view_stack else None
        tag = _view_tag(x, self._views) if x is not None else None
        self._view_stack.append(tag if tag is not None else inherited)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._capturing and self._view_stack:
            self._view_stack.pop()

    def _wrap(self, pl_module: Any, name: str, replacement: Callable[..., Any]) -> None:
        original = getattr(pl_module, name)

        @functools.wraps(original)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            return replacement(pl_module, original, *args, **kwargs)

        setattr(pl_module, name, wrapped)
        self._wrapped.append(name)

    def _forward_view(self, pl_module: Any, images: Tensor, which: int, reason: str) -> Tensor:
        """View ``which`` (1 or 2) forwarded through the module by the callback: an extra
        forward, counted in :attr:`extra_forwards`, warned once per reason."""
        self.extra_forwards += 1
        if reason not in self._warned_extra:
            self._warned_extra.add(reason)
            if reason == "unmatched":
                why = (
                    f"the outputs of feature_layer {self.feature_layer!r} captured during "
                    f"{type(pl_module).__name__}.training_step came from inputs that are "
                    "neither view (the step normalises or otherwise changes the views before "
                    "the network?), so which view each belongs to is unknown and the callback "
                    "does not guess"
                )
                hint = (
                    " To avoid it, call the network on the batch's view tensors (copies are "
                    "recognised), put the transform inside the module's forward, or use "
                    "LRCMixin and pass the features of both views to lrc_loss."
                )
            else:
                why = (
                    f"a view did not reach feature_layer {self.feature_layer!r} in "
                    f"{type(pl_module).__name__}.training_step"
                )
                hint = (
                    f" If the step runs the other view through a momentum or target branch, "
                    f"give target_layer='<that branch's copy of {self.feature_layer}>' to "
                    "reuse it."
                    if self.target_layer is None
                    else ""
                )
            warn_user(
                f"LRCCallback: {why}; the callback forwards view {which} through the module "
                f"(its forward) once more each step (an extra forward).{hint}",
            )
        before = len(self._online)
        self._capturing = True
        try:
            pl_module(images)
        finally:
            self._capturing = False
            self._view_stack.clear()
        if len(self._online) == before:
            raise RuntimeError(
                f"forwarding a view through {type(pl_module).__name__} never reached "
                f"feature_layer {self.feature_layer!r}"
            )
        return self._online[before][1]

    @staticmethod
    def _by_view(store: list[tuple[int | None, Tensor]], b: int) -> dict[int, Tensor]:
        """The captured outputs of each view (the first one of each), read from their tags;
        untagged outputs are left out."""
        found: dict[int, Tensor] = {}
        for tag, t in store:
            if tag in (_V1, _V2) and t.shape[0] == b:
                found.setdefault(tag, t)
            elif tag in (_V12, _V21) and t.shape[0] == 2 * b:
                first, second = t.split(b)
                found.setdefault(_V1, first if tag == _V12 else second)
                found.setdefault(_V2, second if tag == _V12 else first)
        return found

    def _view_features(self, pl_module: Any, inputs: LRCInputs) -> tuple[Tensor, Tensor]:
        """The two views' features, matched by input tensor (or its values), never by call
        order: a view without a matched output is forwarded by the callback."""
        b = inputs.superpixels_1.shape[0]
        online = self._by_view(self._online, b)
        target = self._by_view(self._target, b)
        if _V1 in online and _V2 in online:
            return online[_V1], online[_V2]
        if _V1 in online and _V2 in target:
            return online[_V1], target[_V2]
        if _V2 in online and _V1 in target:
            return target[_V1], online[_V2]
        # Outputs that no view explains (a normalised view, say) are not used: pairing them
        # by order or size could pair f(view 2) with view 1's super-pixels.
        reason = "unmatched" if any(tag is None for tag, _ in self._online) else "missing"
        if not online and _V2 in target:
            return self._forward_view(pl_module, inputs.view_1, 1, reason), target[_V2]
        if not online and _V1 in target:
            return target[_V1], self._forward_view(pl_module, inputs.view_2, 2, reason)
        first = online.get(_V1)
        if first is None:
            first = self._forward_view(pl_module, inputs.view_1, 1, reason)
        second = online.get(_V2)
        if second is None:
            second = self._forward_view(pl_module, inputs.view_2, 2, reason)
        return first, second

    def _clear(self) -> None:
        # In place: the forward hooks hold these lists.
        self._online.clear()
        self._target.clear()
        self._view_stack.clear()
        self._views = None

    def _step_with_lrc(
        self, pl_module: Any, original: Callable[..., Any], batch: Any, *args: Any, **kwargs: Any
    ) -> Any:
        inputs = self.batch_format.inputs(batch)
        self._clear()
        self._views = (inputs.view_1, inputs.view_2)
        self._capturing = True
        try:
            output = original(self.batch_format.module_batch(batch), *args, **kwargs)
        finally:
            self._capturing = False
            self._view_stack.clear()
        if output is None:  # the module skipped this batch
            return output
        if not self._loss_checked:
            self._loss_checked = True
            self._refuse_nan_from_unlabelled_targets(pl_module, output, batch)
        try:
            features_v1, features_v2 = self._view_features(pl_module, inputs)
        finally:
            self._clear()
        assert self.head is not None
        if self.head.in_channels is not None and features_v1.shape[1] != self.head.in_channels:
            raise ValueError(
                f"feature_layer {self.feature_layer!r} outputs shape "
                f"{tuple(features_v1.shape)} ({features_v1.shape[1]} channels), but the LRC "
                f"head was built for {self.head.in_channels} (feature_channels); leave "
                "feature_channels out to infer it"
            )
        if not self._regions_checked:
            self._regions_checked = True
            _refuse_single_pixel(self.feature_layer, tuple(features_v1.shape), None)
            warn_if_too_coarse(
                self.criterion,
                tuple(features_v1.shape),
                inputs.superpixels_1,
                inputs.superpixels_2,
                f"feature_layer {self.feature_layer!r}",
            )
        raw = lrc_term(
            self.head,
            self.criterion,
            features_v1,
            features_v2,
            inputs.superpixels_1,
            inputs.superpixels_2,
        )
        weight = self.config.weight_at(trainer_step(pl_module))
        log_lrc(pl_module, raw, weight, features_v1.shape[0])
        term = raw * weight
        if isinstance(output, Mapping):
            if "loss" not in output:
                raise KeyError("training_step returned a dict without a 'loss' key")
            return {**output, "loss": output["loss"] + term}
        return output + term

    def _refuse_nan_from_unlabelled_targets(self, pl_module: Any, output: Any, batch: Any) -> None:
        """The module's own loss is not finite at the first step of a batch whose targets are
        all -1 (LRCDataModule's tuple batches are unlabelled): a classifier loss that ignores
        -1 averages over nothing (solo-learn's online classifier). Checked once (one
        synchronisation), before the LRC term is added, so the cause is named, not a NaN
        that training carries on with.

        Raises:
            ValueError: naming the module, the targets and the fix.
        """
        targets = self.batch_format.targets(batch)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if targets is None or not isinstance(loss, Tensor) or bool(torch.isfinite(loss).all()):
            return
        if targets.numel() == 0 or not bool((targets == -1).all()):
            return
        raise ValueError(
            f"{type(pl_module).__name__}.training_step returned a non-finite loss "
            f"({float(loss.detach().float().mean())}) at its first step, on a "
            f"{self.batch_format.name!r} batch whose targets are all -1 (LRCDataModule's "
            "pre-training batches are unlabelled). A classifier loss such as solo-learn's "
            "online classifier, F.cross_entropy(logits, targets, ignore_index=-1), averages "
            "over no target then and gives NaN. Skip the classifier loss on unlabelled "
            "batches (the recipe: docs/guides/other-frameworks.md, 'Targets'), or give "
            "batches with real targets."
        )

    # ------------------------------------------------------------------ checkpoints
    def _save_head(
        self, pl_module: Any, original: Callable[..., Any], checkpoint: dict[str, Any]
    ) -> Any:
        """The head's weights go to their own checkpoint entry: the module's ``state_dict``
        stays the user's module's (``Module.load_from_checkpoint`` loads it unchanged)."""
        result = original(checkpoint)
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            head = {k[len(_PREFIX) :]: state.pop(k) for k in list(state) if k.startswith(_PREFIX)}
            checkpoint[CHECKPOINT_KEY] = self._head_record(head)
        return result

    def _head_record(self, head: dict[str, Any]) -> dict[str, Any]:
        """Checkpoint entry that holds the head's state, outside the module's state_dict,
        and what chose its sizes (named when a resume differs)."""
        return {"head": head, "feature_layer": self.feature_layer,
                "config": self.config.as_dict()}  # fmt: skip

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """``trainer.save_checkpoint(path)`` after ``fit``: the head is off the module then
        (teardown removed it), so the callback writes the trained head it kept; resuming from
        that file goes on with it instead of a fresh head."""
        if self._mode != "hook" or self.head is None:
            return
        if getattr(pl_module, HEAD_ATTRIBUTE, None) is self.head:
            return  # fitting: the wrapped on_save_checkpoint moves it out of the state_dict
        if any(is_lazy(p) for p in self.head.parameters()):
            return  # channels never inferred (no step ran): nothing trained to keep
        checkpoint[CHECKPOINT_KEY] = self._head_record(
            {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        )

    def _load_head(
        self, pl_module: Any, original: Callable[..., Any], checkpoint: dict[str, Any]
    ) -> Any:
        """Resuming: put the head's weights back before Lightning loads the state strictly."""
        state = checkpoint.get("state_dict")
        if isinstance(state, dict) and not any(k.startswith(_PREFIX) for k in state):
            saved = checkpoint.get(CHECKPOINT_KEY, {}).get("head")
            if saved is None:
                warn_user(
                    "the checkpoint holds no LRC head (it was not trained with LRCCallback); "
                    "the head starts from its initialisation",
                )
                assert self.head is not None
                saved = self.head.state_dict()
            else:
                self._check_resumed_head(pl_module, saved, checkpoint.get(CHECKPOINT_KEY, {}))
            state.update({_PREFIX + k: v for k, v in saved.items()})
        return original(checkpoint)

    def _check_resumed_head(
        self, pl_module: Any, saved: dict[str, Any], record: dict[str, Any]
    ) -> None:
        """Another head size or feature layer than the checkpoint's: an error naming the
        option when the sizes differ, a warning when only the layer does."""
        assert self.head is not None
        config = self.config.as_dict()
        saved_options = dict(record.get("config") or {})
        if "feature_layer" in record:
            saved_options["feature_layer"] = record["feature_layer"]
        options = {"feature_layer": self.feature_layer, "embedding_dim": config["embedding_dim"],
                   "hidden_dim": config["hidden_dim"]}  # fmt: skip
        check_head_sizes(
            saved,
            self.head,
            "",
            f"LRCCallback on {type(pl_module).__name__}",
            saved_options if record.get("config") is not None else None,
            options,
            "feature_layer (or feature_channels)",
        )
        layer = record.get("feature_layer")
        if layer is not None and layer != self.feature_layer:
            warn_user(
                f"LRCCallback resumes a head trained on feature_layer {layer!r} with "
                f"feature_layer {self.feature_layer!r} (same channels): the head goes on "
                "from weights fitted to the other layer's features",
            )

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.as_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config", {})
        mine = self.config.as_dict()
        changed = {k: (saved[k], mine[k]) for k in saved if k in mine and saved[k] != mine[k]}
        if changed:
            warn_user(
                f"LRCCallback resumed with other LRC options than the checkpoint's "
                f"(checkpoint, now): {changed}; the new ones are used",
            )


def _refuse_single_pixel(
    name: str | None, shape: tuple[int, ...], layers: list[Any] | None
) -> None:
    """A feature layer with one pixel per image (a pooled or 1x1 output) leaves LRC nothing
    to contrast: refused before training, not a term that is silently 0.

    Raises:
        ValueError: naming the layer, its shape and, when known, the finer candidates.
    """
    if len(shape) not in (4, 5) or any(n > 1 for n in shape[2:]):
        return
    listing = (
        f" Dense candidates, finest first:\n{format_layers(dense_candidates(layers))}"
        if layers
        else ""
    )
    raise ValueError(
        f"feature_layer {name!r} outputs shape {shape}: one feature pixel per image, so no "
        "super-pixel region can be contrasted with another (the LRC term would be 0). "
        f"Give a finer layer (a decoder level, or an encoder stage before pooling).{listing}"
    )


def _dry_run(pl_module: nn.Module, example: Any) -> list[Any] | None:
    """Every layer's output shape for ``example``; None without an example, or when the
    module's ``forward`` cannot take it (some modules have none: then the head infers its
    channels at the first step and errors list module names only)."""
    if example is None:
        return None
    try:
        return find_feature_layers(pl_module, example)
    except (NotImplementedError, TypeError, RuntimeError, ValueError):
        return None


def _example_input(trainer: Any, pl_module: Any) -> Any:
    """An input for one dry forward: the module's ``example_input_array``, else the data
    module's ``example_input()`` (LRCDataModule has one), else None."""
    example = getattr(pl_module, "example_input_array", None)
    if example is not None:
        return example
    datamodule = getattr(trainer, "datamodule", None)
    make = getattr(datamodule, "example_input", None)
    return make() if callable(make) else None


class LRCCallback(LRCCallbackBase, pl.Callback):
    __doc__ = LRCCallbackBase.__doc__
