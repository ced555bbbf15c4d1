"""The LRC term below both entry points: one declaration of its options, one lambda.

:class:`LRCConfig` is the only place the LRC options are declared; its defaults are read
from the signatures of the parts they configure (:class:`LocalizedRegionContrastLoss`,
:class:`DenseProjectionHead`, :data:`DEFAULT_LRC_WEIGHT`), so a value has one home.
:class:`LRCMixin` and :class:`LRCCallback` both build their head and loss here
(:func:`build_head`, :func:`build_criterion`), compute lambda with
:meth:`LRCConfig.weight_at` from the Trainer's step (no callback needed to drive it), and
run :func:`lrc_term`. Nothing here imports Lightning.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lrc_lightning.objective.heads import DenseProjectionHead
from lrc_lightning.objective.loss import LocalizedRegionContrastLoss
from lrc_lightning.objective.regions import (
    DownsampleMode,
    check_region_ids,
    downsample_superpixels,
    select_regions,
)
from lrc_lightning.objective.schedules import DEFAULT_LRC_WEIGHT, WeightSchedule, lrc_weight
from lrc_lightning.runtime.user_warnings import warn_user

__all__ = [
    "LRCConfig",
    "build_criterion",
    "build_head",
    "check_head_sizes",
    "count_valid_regions",
    "log_lrc",
    "lrc_term",
    "warn_if_too_coarse",
]


def _defaults(owner: Any) -> dict[str, Any]:
    """The defaults of ``owner``'s signature: each value's one home."""
    return {name: p.default for name, p in inspect.signature(owner).parameters.items()}


_LOSS = _defaults(LocalizedRegionContrastLoss)
_HEAD = _defaults(DenseProjectionHead)
_SCHEDULE = _defaults(lrc_weight)


#: LRCConfig fields that are LocalizedRegionContrastLoss arguments.
_LOSS_FIELDS = (
    "temperature",
    "num_regions",
    "samples_per_region",
    "min_pixels",
    "downsample",
    "negatives_from_same_view",
    "gather_distributed",
)


@dataclass
class LRCConfig:
    """Every LRC option, once: lambda and its schedule, the loss, the projection head.

    Given to :meth:`LRCMixin.init_lrc <lrc_lightning.LRCMixin.init_lrc>`,
    :class:`~lrc_lightning.LRCCallback` and the reference models (LightningCLI:
    ``model.init_args.lrc`` or the callback's ``init_args.config``).

    Args:
        weight, schedule, warmup_steps: lambda and its schedule
            (:func:`lrc_lightning.objective.schedules.lrc_weight`), read from the Trainer's
            ``global_step`` at every step.
        temperature, num_regions, samples_per_region, min_pixels, downsample: see
            :class:`~lrc_lightning.LocalizedRegionContrastLoss`.
        negatives_from_same_view, gather_distributed: see
            :class:`~lrc_lightning.LocalizedRegionContrastLoss`.
        embedding_dim, hidden_dim: projection head sizes (hidden defaults to its input).
        feature_level: decoder level of the reference models' backbone (-1: the finest).

    Raises:
        ValueError: an invalid value (checked here, at construction).

    Example:
        >>> config = LRCConfig(weight=1.0, schedule="linear", warmup_steps=10)
        >>> config.weight_at(5), config.weight_at(50)
        (0.5, 1.0)
    """

    weight: float = DEFAULT_LRC_WEIGHT
    schedule: WeightSchedule = _SCHEDULE["schedule"]
    warmup_steps: int = _SCHEDULE["warmup_steps"]
    temperature: float = _LOSS["temperature"]
    num_regions: int = _LOSS["num_regions"]
    samples_per_region: int | None = _LOSS["samples_per_region"]
    min_pixels: int = _LOSS["min_pixels"]
    downsample: DownsampleMode = _LOSS["downsample"]
    negatives_from_same_view: bool = _LOSS["negatives_from_same_view"]
    gather_distributed: bool = _LOSS["gather_distributed"]
    embedding_dim: int = _HEAD["out_channels"]
    hidden_dim: int | None = _HEAD["hidden_channels"]
    feature_level: int = -1

    def __post_init__(self) -> None:
        self.weight_at(0)  # validates the schedule
        build_criterion(self)  # validates the loss options
        for name in ("embedding_dim", "hidden_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    def weight_at(self, step: int) -> float:
        """lambda at optimizer step ``step`` (the schedule's one home)."""
        return lrc_weight(step, self.weight, self.schedule, self.warmup_steps)

    def loss_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`LocalizedRegionContrastLoss`."""
        return {name: getattr(self, name) for name in _LOSS_FIELDS}

    def replace(self, **options: Any) -> LRCConfig:
        """A copy with ``options`` changed; unknown names are a TypeError listing the valid
        ones (``init_lrc(..., weight=1.0)`` and ``LRCCallback(..., weight=1.0)`` use it)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown LRC option(s) {unknown}; the options are {sorted(names)}")
        return dataclasses.replace(self, **options)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Lightning saves hyper-parameters in checkpoints and reloads them with
# torch.load(weights_only=True): the config must be an allowed global to resume. Checkpoints
# written before the chapter folders name it by its old module path (see _moved.py).
torch.serialization.add_safe_globals([LRCConfig, (LRCConfig, "lrc_lightning.term.LRCConfig")])


def build_head(config: LRCConfig, feature_channels: int | None) -> DenseProjectionHead:
    """The projection head; ``feature_channels=None`` infers them from the first input."""
    return DenseProjectionHead(feature_channels, config.hidden_dim, config.embedding_dim)


def _head_sizes(state: Mapping[str, Any], prefix: str = "") -> dict[str, int] | None:
    """The sizes of a :class:`DenseProjectionHead` read from its state (None: lazy)."""
    first, last = state.get(prefix + "layers.0.weight"), state.get(prefix + "layers.3.weight")
    if not isinstance(first, Tensor) or not isinstance(last, Tensor):
        return None
    if nn.parameter.is_lazy(first):
        return None
    return {
        "feature channels": int(first.shape[1]),
        "hidden_dim": int(first.shape[0]),
        "embedding_dim": int(last.shape[0]),
    }


#: The options that set the head's sizes (what a resumed run must keep).
HEAD_OPTIONS = ("embedding_dim", "hidden_dim", "feature_level")


def check_head_sizes(
    saved_state: Mapping[str, Any],
    head: nn.Module,
    prefix: str,
    source: str,
    saved_options: Mapping[str, Any] | None,
    options: Mapping[str, Any],
    channels_from: str,
) -> None:
    """Resuming: a clear error when the checkpoint's LRC head has other sizes than ``head``
    (instead of load_state_dict's size mismatch).

    Args:
        saved_state: the checkpoint's state holding the head's weights under ``prefix``.
        head: the head of this run.
        source: what is being resumed, for the message.
        saved_options, options: the options that choose the head (the checkpoint's, when
            it recorded them, and this run's): the differing ones are named.
        channels_from: which option(s) choose the feature channels.

    Raises:
        ValueError: the sizes differ; names each size and option that differs, and what
            to do.
    """
    saved, now = _head_sizes(saved_state, prefix), _head_sizes(head.state_dict())
    if saved is None or now is None or saved == now:
        return
    sizes = [f"{k} {saved[k]} in the checkpoint, {now[k]} now" for k in saved if saved[k] != now[k]]
    named = [
        f"{k}={saved_options[k]!r} in the checkpoint, {options[k]!r} now"
        for k in options
        if saved_options is not None and k in saved_options and saved_options[k] != options[k]
    ]
    channels = (
        f" The feature channels come from {channels_from}."
        if saved["feature channels"] != now["feature channels"]
        else ""
    )
    raise ValueError(
        f"cannot resume {source} from this checkpoint: its LRC projection head has other "
        f"sizes ({'; '.join(sizes)})"
        + (f", from the LRC option(s) {'; '.join(named)}" if named else "")
        + f".{channels} Resume with the checkpoint's options, or start a new run (without "
        "ckpt_path) from the weights you need: the head is then trained anew."
    )


def build_criterion(config: LRCConfig) -> LocalizedRegionContrastLoss:
    return LocalizedRegionContrastLoss(**config.loss_options())


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


@torch.no_grad()
def count_valid_regions(
    criterion: LocalizedRegionContrastLoss,
    feature_shape: tuple[int, ...],
    superpixels_v1: Tensor,
    superpixels_v2: Tensor,
) -> Tensor:
    """(B,) regions per image that the loss can use at the features' resolution."""
    size = tuple(feature_shape[2:])
    maps_v1 = downsample_superpixels(superpixels_v1, size, criterion.downsample)
    maps_v2 = downsample_superpixels(superpixels_v2, size, criterion.downsample)
    # Its own generator: checking must not move the global RNG that the loss samples from.
    generator = torch.Generator(device=maps_v1.device).manual_seed(0)
    _, valid = select_regions(
        maps_v1, maps_v2, criterion.num_regions, criterion.min_pixels, generator
    )
    return valid.sum(dim=1)


def warn_if_too_coarse(
    criterion: LocalizedRegionContrastLoss,
    feature_shape: tuple[int, ...],
    superpixels_v1: Tensor,
    superpixels_v2: Tensor,
    source: str,
) -> float:
    """Warn when fewer than 2 regions per image reach the loss (then InfoNCE has no
    negative of the same image and, with one region or none, the term is 0). Returns the
    mean count. Host syncs: call it once, not every step.

    Also refuses ids beyond the loss's bound (ValueError), reading the maps wherever they
    are: the loss itself reads only maps in host memory (see
    :func:`~lrc_lightning.objective.regions.check_region_ids`).
    """
    bound = max(superpixels_v1[0].numel(), superpixels_v2[0].numel())
    check_region_ids(superpixels_v1, bound, f"{source}: superpixels_v1", read_device=True)
    check_region_ids(superpixels_v2, bound, f"{source}: superpixels_v2", read_device=True)
    counts = count_valid_regions(criterion, feature_shape, superpixels_v1, superpixels_v2)
    mean = float(counts.float().mean())
    if mean < 2:
        warn_user(
            f"LRC: the features of {source} have spatial size {tuple(feature_shape[2:])}; "
            f"only {mean:.1f} super-pixel region(s) per image cover >= "
            f"{criterion.min_pixels} feature pixels in both views, so the LRC term is "
            "(nearly) 0. Use a finer (decoder) layer, larger images, or larger super-pixels "
            "(superpixel_scale / superpixel_min_size), or lower min_pixels.",
        )
    return mean


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


def trainer_step(module: Any) -> int:
    """The Trainer's optimizer step (0 without a Trainer): lambda's clock."""
    trainer = getattr(module, "_trainer", None)
    return int(trainer.global_step) if trainer is not None else 0
