"""How the reference models read any backbone: a global vector and one dense feature map.

A backbone with ``encode``/``decode`` (as :class:`UNet2d`) gives its pooled bottleneck to
the global branch and one decoder level to LRC; one with ``global_and_dense`` (as
:class:`lrc_lightning.monai.MonaiBackbone`) gives both from one forward; any other
``nn.Module`` mapping (B, C_in, H, W) to (B, C, h, w) gives its pooled output and its
output (for a segmentation network that is its *logits*: wrap MONAI networks in
``MonaiBackbone`` instead).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor, nn

__all__ = ["backbone_features", "dense_channels", "describe_backbone", "global_channels"]


def _is_unet_like(backbone: nn.Module) -> bool:
    return hasattr(backbone, "encode") and hasattr(backbone, "decode")


def backbone_features(
    backbone: nn.Module, x: Tensor, dense_level: int | None
) -> tuple[Tensor, Tensor | None]:
    """(B, C) global features and, unless ``dense_level`` is None, (B, C', h, w) features.

    The decoder only runs when dense features are asked for.
    """
    read_both = getattr(backbone, "global_and_dense", None)
    if callable(read_both):
        return read_both(x, dense_level)
    if _is_unet_like(backbone):
        bottleneck, skips = backbone.encode(x)  # type: ignore[operator]
        dense = None
        if dense_level is not None:
            dense = backbone.decode(bottleneck, skips)[dense_level]  # type: ignore[operator]
        return bottleneck.mean(dim=tuple(range(2, bottleneck.ndim))), dense
    out = backbone(x)
    if not isinstance(out, Tensor) or out.ndim not in (4, 5):
        raise TypeError(
            f"{type(backbone).__name__} must return a (B, C, h, w) or (B, C, d, h, w) tensor "
            "(or define encode/decode like UNet2d)"
            + (f", got shape {tuple(out.shape)}" if isinstance(out, Tensor) else "")
        )
    return out.mean(dim=tuple(range(2, out.ndim))), (out if dense_level is not None else None)


#: The model argument that sets each kind of channels explicitly.
_ARGUMENT = {"global": "global_channels", "dense": "lrc_feature_channels"}


def _channels(backbone: nn.Module, attribute: str, given: int | None, what: str) -> int:
    if given is not None:
        if type(backbone).__module__.startswith("monai."):
            warnings.warn(
                f"{type(backbone).__name__} is used as it is: its segmentation output feeds "
                f"the {what} branch. Wrap it in lrc_lightning.monai.MonaiBackbone to use its "
                "bottleneck and a decoder level instead.",
                stacklevel=3,
            )
        return given
    value = getattr(backbone, attribute, None)
    if value is None:
        name = type(backbone).__name__
        raise ValueError(
            f"cannot tell the {what} channels of {name}. For a MONAI network, wrap it: "
            f"backbone=lrc_lightning.monai.MonaiBackbone({name}(...)) (its bottleneck feeds "
            "the global branch, a decoder level LRC, not the segmentation output). Else give "
            f"the model {_ARGUMENT[what]}=<channels>, or give the backbone an `{attribute}` "
            "attribute."
        )
    return int(value)


def _has_levels(backbone: nn.Module) -> bool:
    return _is_unet_like(backbone) or callable(getattr(backbone, "global_and_dense", None))


def global_channels(backbone: nn.Module, given: int | None = None) -> int:
    attribute = "bottleneck_channels" if _has_levels(backbone) else "out_channels"
    return _channels(backbone, attribute, given, "global")


def dense_channels(backbone: nn.Module, level: int, given: int | None = None) -> int:
    if given is not None:
        return given
    levels = getattr(backbone, "decoder_channels", None)
    if levels is not None:
        try:
            return int(levels[level])
        except IndexError:
            raise ValueError(
                f"feature_level {level} is out of range for {type(backbone).__name__} with "
                f"{len(levels)} decoder levels"
            ) from None
    return _channels(backbone, "out_channels", None, "dense")


def describe_backbone(backbone: nn.Module) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` for backbones that expose ``config()``."""
    config = getattr(backbone, "config", None)
    if not callable(config):
        return None
    cls = type(backbone)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": config()}
