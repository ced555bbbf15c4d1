"""UNet2d: a configurable 2D U-Net that exposes its bottleneck and decoder features."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Norm", "UNet2d"]

Norm = Literal["batch", "instance", "group", "none"]


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'instance', 'group' or 'none', got {kind!r}")


class ConvBlock(nn.Sequential):
    """Two (3x3 conv -> norm -> ReLU) layers."""

    def __init__(self, in_channels: int, out_channels: int, norm: Norm) -> None:
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
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

    def __init__(
        self, in_channels: int = 1, width: int = 32, depth: int = 4, norm: Norm = "batch"
    ) -> None:
        super().__init__()
        if in_channels < 1 or width < 1:
            raise ValueError(f"in_channels and width must be >= 1, got {in_channels}, {width}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        _norm(norm, 1)  # validates
        self.in_channels, self.width, self.depth, self.norm = in_channels, width, depth, norm
        widths = [width * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList(
            ConvBlock(c_in, c_out, norm)
            for c_in, c_out in zip([in_channels, *widths[:-2]], widths[:-1], strict=True)
        )
        self.bottleneck = ConvBlock(widths[-2], widths[-1], norm)
        self.upsamplers = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            for i in reversed(range(depth))
        )
        self.decoders = nn.ModuleList(
            ConvBlock(2 * widths[i], widths[i], norm) for i in reversed(range(depth))
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
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet2d expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}"
            )
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(
                f"UNet2d(depth={self.depth}) needs H and W divisible by {multiple}, "
                f"got {tuple(x.shape[-2:])}; resize (LRCDataModule image_size) or lower depth"
            )

    def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Bottleneck and the skip connections (fine to coarse)."""
        self._check_input(x)
        skips = []
        for block in self.encoders:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
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
