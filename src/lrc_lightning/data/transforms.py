"""Paired-view augmentation: geometry moves image, label and super-pixels together.

Geometric transforms (random resized crop, flip, small rotation) are composed into one
affine map and applied with ``grid_sample``: bilinear for the image, nearest for label and
super-pixel maps (ids survive unchanged; pixels from outside the image get -1 in the
super-pixel map and 0 in the label). Intensity transforms (brightness, contrast, gamma,
noise, blur) touch the image only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GeometryAugment", "IntensityAugment", "apply_affine", "random_affine"]


@dataclass
class GeometryAugment:
    """Random resized crop (area fraction ``crop_scale``), flips and rotation (degrees)."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    horizontal_flip: float = 0.5
    vertical_flip: float = 0.0
    max_rotation: float = 10.0

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        return random_affine(self, generator)


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def random_affine(aug: GeometryAugment, generator: torch.Generator | None = None) -> Tensor:
    """A (2, 3) ``affine_grid`` matrix: output coordinates -> input coordinates."""
    area = _uniform(*aug.crop_scale, generator)
    log_ratio = _uniform(math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]), generator)
    ratio = math.exp(log_ratio)
    sx = min(1.0, math.sqrt(area * ratio))
    sy = min(1.0, math.sqrt(area / ratio))
    cx = _uniform(-(1 - sx), 1 - sx, generator)
    cy = _uniform(-(1 - sy), 1 - sy, generator)
    if float(torch.rand((), generator=generator)) < aug.horizontal_flip:
        sx = -sx
    if float(torch.rand((), generator=generator)) < aug.vertical_flip:
        sy = -sy
    angle = math.radians(_uniform(-aug.max_rotation, aug.max_rotation, generator))
    cos, sin = math.cos(angle), math.sin(angle)
    return torch.tensor([[cos * sx, -sin * sy, cx], [sin * sx, cos * sy, cy]], dtype=torch.float32)


def apply_affine(
    theta: Tensor, image: Tensor, maps: dict[str, Tensor], size: tuple[int, int] | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Warp a (C, H, W) image (bilinear) and (H, W) integer maps (nearest) alike.

    ``maps`` values come back as int64; pixels sampled from outside the input are -1 for
    keys starting with ``"superpixels"`` and 0 otherwise (background label).
    """
    c, h, w = image.shape
    out_h, out_w = size or (h, w)
    grid = F.affine_grid(theta.unsqueeze(0), [1, c, out_h, out_w], align_corners=False)
    warped = F.grid_sample(
        image.unsqueeze(0).float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )[0]
    out_maps = {}
    for key, m in maps.items():
        # +1 so that zero padding marks "outside"; float32 holds integers up to 2**24 exactly.
        shifted = (m.float() + 1).view(1, 1, h, w)
        sampled = F.grid_sample(
            shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False
        )[0, 0]
        ids = sampled.round().long() - 1
        if not key.startswith("superpixels"):
            ids = ids.clamp(min=0)
        out_maps[key] = ids
    return warped, out_maps


@dataclass
class IntensityAugment:
    """Brightness shift, contrast scale, gamma, Gaussian noise and blur (image only)."""

    brightness: float = 0.1
    contrast: float = 0.2
    gamma: tuple[float, float] = (0.8, 1.25)
    noise_std: float = 0.02
    blur_probability: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.0)

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = image.clamp(0, 1)
        lo, hi = self.gamma
        x = x ** math.exp(_uniform(math.log(lo), math.log(hi), generator))
        mean = x.mean()
        x = (x - mean) * _uniform(1 - self.contrast, 1 + self.contrast, generator) + mean
        x = x + _uniform(-self.brightness, self.brightness, generator)
        if float(torch.rand((), generator=generator)) < self.blur_probability:
            x = _gaussian_blur(x, _uniform(*self.blur_sigma, generator))
        if self.noise_std > 0:
            x = x + torch.randn(x.shape, generator=generator) * self.noise_std
        return x


def _gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = image.shape[0]
    img = image.unsqueeze(0)
    img = F.conv2d(
        F.pad(img, (radius, radius, 0, 0), mode="reflect"),
        k.view(1, 1, 1, -1).expand(c, 1, 1, -1),
        groups=c,
    )
    img = F.conv2d(
        F.pad(img, (0, 0, radius, radius), mode="reflect"),
        k.view(1, 1, -1, 1).expand(c, 1, -1, 1),
        groups=c,
    )
    return img[0]
