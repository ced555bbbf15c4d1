"""UNet2d and UNet3d: configurable U-Nets that expose their bottleneck and decoder features."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Norm", "UNet2d", "UNet3d"]

Norm = Literal["batch", "instance", "group", "none"]


_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_UP = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_MAX_POOL = {2: F.max_pool2d, 3: F.max_pool3d}


def _norm(kind: Norm, channels: int, dims: int = 2) -> nn.Module:
    if kind == "batch":
        return _BATCH_NORM[dims](channels)
    if kind == "instance":
        return _INSTANCE_NORM[dims](channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'instance', 'group' or 'none', got {kind!r}")


class ConvBlock(nn.Sequential):
    """Two (3x3 (x3) conv -> norm -> ReLU) layers."""

    def __init__(self, in_channels: int, out_channels: int, norm: Norm, dims: int = 2) -> None:
        bias = norm == "none"
        conv = _CONV[dims]
        super().__init__(
            conv(in_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels, dims),
            nn.ReLU(inplace=True),
            conv(out_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels, dims),
            nn.ReLU(inplace=True),
        )


class UNet2d(nn.Module):
    """A 2D U-Net backbone (no segmentation head).

    ``depth`` down-samplings; level ``i`` of the encoder has ``width * 2**i`` channels.
    The global branch (MoCo) pools :meth:`forward_features`' bottleneck; LRC uses one of
    its decoder feature maps, coarse to fine (``decoder_channels[-1] == width`` at the
    input resolution).

    Shapes:
        forward: (B, in_channels, H, W) -> (B, width, H, W), H and W divisible by 2**depth.
        forward_features: -> bottleneck (B, width * 2**depth, H / 2**depth, W / 2**depth),
        decoder features [(B, decoder_channels[i], H / 2**(depth-1-i), ...)].
    """

    #: 2 for slices, 3 for volumes (:class:`UNet3d`).
    spatial_dims = 2

    def __init__(
        self, in_channels: int = 1, width: int = 32, depth: int = 4, norm: Norm = "batch"
    ) -> None:
        super().__init__()
        dims = self.spatial_dims
        if in_channels < 1 or width < 1:
            raise ValueError(f"in_channels and width must be >= 1, got {in_channels}, {width}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        _norm(norm, 1)  # validates
        self.in_channels, self.width, self.depth, self.norm = in_channels, width, depth, norm
        widths = [width * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList(
            ConvBlock(c_in, c_out, norm, dims)
            for c_in, c_out in zip([in_channels, *widths[:-2]], widths[:-1], strict=True)
        )
        self.bottleneck = ConvBlock(widths[-2], widths[-1], norm, dims)
        self.upsamplers = nn.ModuleList(
            _UP[dims](widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.decoders = nn.ModuleList(
            ConvBlock(2 * widths[i], widths[i], norm, dims) for i in reversed(range(depth))
        )
        self.bottleneck_channels = widths[-1]
        self.decoder_channels = [widths[i] for i in reversed(range(depth))]
        self.out_channels = width

    def config(self) -> dict[str, int | str]:
        """The ``__init__`` arguments (written next to exported weights)."""
        return {
            "in_channels": self.in_channels,
            "width": self.width,
            "depth": self.depth,
            "norm": self.norm,
        }

    def _check_input(self, x: Tensor) -> None:
        multiple = 2**self.depth
        name, dims = type(self).__name__, self.spatial_dims
        layout = "H, W" if dims == 2 else "D, H, W"
        if x.ndim != dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{name} expects (B, {self.in_channels}, {layout}) input, got {tuple(x.shape)}"
            )
        if any(n % multiple for n in x.shape[2:]):
            raise ValueError(
                f"{name}(depth={self.depth}) needs {layout} divisible by {multiple}, got "
                f"{tuple(x.shape[2:])}; resize (LRCDataModule image_size / patch_size) or "
                "lower depth"
            )

    def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Bottleneck and the skip connections (fine to coarse)."""
        self._check_input(x)
        skips = []
        for block in self.encoders:
            x = block(x)
            skips.append(x)
            x = _MAX_POOL[self.spatial_dims](x, 2)
        return self.bottleneck(x), skips

    def decode(self, bottleneck: Tensor, skips: list[Tensor]) -> list[Tensor]:
        """Decoder features, coarse to fine."""
        x, features = bottleneck, []
        for up, block, skip in zip(self.upsamplers, self.decoders, reversed(skips), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
            features.append(x)
        return features

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        bottleneck, skips = self.encode(x)
        return bottleneck, self.decode(bottleneck, skips)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[1][-1]


class UNet3d(UNet2d):
    """The same U-Net on volumes: 3x3x3 convolutions, 2x2x2 pooling and up-sampling.

    Shapes:
        forward: (B, in_channels, D, H, W) -> (B, width, D, H, W), each of D, H, W divisible
        by 2**depth; features as :class:`UNet2d`'s with a depth axis.

    Example:
        >>> import torch
        >>> net = UNet3d(width=4, depth=2)
        >>> bottleneck, levels = net.forward_features(torch.zeros(1, 1, 8, 16, 16))
        >>> tuple(bottleneck.shape), [tuple(f.shape) for f in levels]
        ((1, 16, 2, 4, 4), [(1, 8, 4, 8, 8), (1, 4, 8, 16, 16)])
    """

    spatial_dims = 3
