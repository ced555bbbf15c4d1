"""Paired-view augmentation: geometry moves image, label and super-pixels together.

Geometric transforms (random resized crop, flip, small rotation) are composed into one
affine map and applied with ``grid_sample``: bilinear for the image, nearest for label and
super-pixel maps (ids survive unchanged; pixels from outside the image get -1 in the
super-pixel map and 0 in the label; padded or ignored pixels, -1, stay -1). Intensity
transforms (brightness, contrast, gamma, noise, blur) touch the image only.

A left-right flip mirrors anatomy: a flipped right kidney lies on the patient's left and
looks like a left kidney. Wherever labels travel with the image (fine-tuning, supervised
pre-training), the only flip drawn is the left-right one (:meth:`GeometryAugment.for_labels`),
and only when mirror-image label pairs are declared: a warp that reflects
(:func:`is_reflection`; rotations never do) then swaps them (:class:`MirrorLabels`), so
that every label stays on its side of the body. Everything also
runs batched, with one random draw per sample, on the device that holds the data
(:func:`random_affines`, :func:`warp_batch`, :meth:`IntensityAugment.batch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from lrc_lightning.data.warping import warp_ids_nearest

__all__ = [
    "GeometryAugment",
    "IntensityAugment",
    "MirrorLabels",
    "apply_affine",
    "is_reflection",
    "random_affine",
    "random_affines",
    "warp_batch",
]


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


    def for_labels(self, mirror_pairs: bool) -> GeometryAugment:
        """The augmentation of batches that carry labels: left-right flips (columns: the
        patient's left-right in LPS axial and coronal slices) only when mirror pairs can
        be swapped, and never an anterior-posterior flip, which would mirror the body
        while every organ stays on its side."""
        return replace(self, vertical_flip=0.0,
                       horizontal_flip=self.horizontal_flip if mirror_pairs else 0.0)  # fmt: skip


def is_reflection(theta: Tensor) -> Tensor:
    """(..., n, n + 1) ``affine_grid`` matrices (2D or 3D) -> (...) bool: the warp mirrors
    the image (an odd number of flips; its linear part has a negative determinant).

    Example:
        >>> import torch
        >>> flip = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> turn = torch.tensor([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # 180 degrees
        >>> is_reflection(torch.stack([flip, turn])).tolist()
        [True, False]
    """
    n = theta.shape[-2]
    return torch.linalg.det(theta[..., :n, :n].float()) < 0


@dataclass(frozen=True)
class MirrorLabels:
    """Label values that are mirror images of each other (right/left kidney, lung, adrenal,
    hippocampus), swapped where a warp reflects the image so that every label stays on its
    side of the body.

    Args:
        pairs: ``((right_value, left_value), ...)``; each value in at most one pair.

    Raises:
        ValueError: a value in two pairs, a value paired with itself, or outside 0..254.

    Example:
        >>> import torch
        >>> mirror = MirrorLabels(((2, 3),))
        >>> labels = torch.tensor([[0, 2, 3, -1], [0, 2, 3, -1]])
        >>> mirror.apply(labels, torch.tensor([True, False])).tolist()
        [[0, 3, 2, -1], [0, 2, 3, -1]]
    """

    pairs: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        seen: list[int] = []
        for pair in self.pairs:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"mirror label pairs are two different values, got {pair}")
            seen += [int(v) for v in pair]
        if len(set(seen)) != len(seen):
            raise ValueError(f"a label value appears in two mirror pairs: {self.pairs}")
        if any(not 0 <= v < 255 for v in seen):
            raise ValueError(f"mirror label values must lie in 0..254, got {self.pairs}")

    def table(self, device: torch.device | str | None = None) -> Tensor:
        """(256,) int64 lookup: value -> its mirror partner (itself when unpaired)."""
        lut = torch.arange(256, device=device)
        for a, b in self.pairs:
            lut[a], lut[b] = b, a
        return lut

    def apply(self, labels: Tensor, reflected: Tensor | bool) -> Tensor:
        """Swap the pairs in the (B, ...) ``labels`` of the samples where ``reflected``
        ((B,) bool, or one bool for all); -1 (ignored) stays -1."""
        if not self.pairs:
            return labels
        swapped = self.table(labels.device)[labels.clamp(min=0)]
        swapped = torch.where(labels < 0, labels, swapped)
        flag = torch.as_tensor(reflected, device=labels.device)
        flag = flag.view(*flag.shape, *([1] * (labels.ndim - flag.ndim)))
        return torch.where(flag, swapped, labels)


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


def random_affines(
    aug: GeometryAugment,
    count: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(count, 2, 3) matrices drawn as :func:`random_affine` draws one, all at once on
    ``device`` (for batches augmented where the data lives)."""
    u = torch.rand(count, 8, generator=generator, device=device)
    area = aug.crop_scale[0] + (aug.crop_scale[1] - aug.crop_scale[0]) * u[:, 0]
    lo, hi = math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])
    ratio = torch.exp(lo + (hi - lo) * u[:, 1])
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (2 * u[:, 2] - 1) * (1 - sx)
    cy = (2 * u[:, 3] - 1) * (1 - sy)
    sx = torch.where(u[:, 4] < aug.horizontal_flip, -sx, sx)
    sy = torch.where(u[:, 5] < aug.vertical_flip, -sy, sy)
    angle = torch.deg2rad((2 * u[:, 6] - 1) * aug.max_rotation)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rows = [torch.stack([cos * sx, -sin * sy, cx], 1), torch.stack([sin * sx, cos * sy, cy], 1)]
    return torch.stack(rows, 1)


def warp_batch(
    theta: Tensor, images: Tensor, maps: dict[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Warp (B, C, H, W) images (bilinear) and (B, H, W) integer maps (nearest) by (B, 2, 3)
    ``affine_grid`` matrices.

    ``maps`` come back as int64. A pixel sampled from outside the input is -1 in maps whose
    key starts with ``"superpixels"`` and 0 (background) in the others; a -1 inside the
    input (padding, ignored label) stays -1.
    """
    b, c, h, w = images.shape
    grid = F.affine_grid(theta.to(images.device, torch.float32), [b, c, h, w],
                         align_corners=False)  # fmt: skip
    warped = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)  # fmt: skip
    out_maps = {}
    for key, m in maps.items():
        # Gathered, not interpolated: ids of any size come back exactly.
        fill = -1 if key.startswith("superpixels") else 0
        out_maps[key] = warp_ids_nearest(m.long(), grid, fill=fill)
    return warped, out_maps


def apply_affine(
    theta: Tensor, image: Tensor, maps: dict[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`warp_batch` for one (C, H, W) image, (H, W) maps and a (2, 3) matrix."""
    warped, out_maps = warp_batch(
        theta.unsqueeze(0), image.unsqueeze(0), {k: m.unsqueeze(0) for k, m in maps.items()}
    )
    return warped[0], {k: m[0] for k, m in out_maps.items()}


@dataclass
class IntensityAugment:
    """Brightness shift, contrast scale, gamma, Gaussian noise and blur (image only), and
    optionally a multiplicative intensity ``scale`` drawn log-uniformly from its range.

    ``scale`` (default off) is for MR, whose intensities have no physical unit: after
    percentile normalisation the same tissue of two patients can differ twofold (an
    unusually bright structure moves the upper percentile), and a model fine-tuned on one
    patient must not depend on the absolute level.
    """

    brightness: float = 0.1
    contrast: float = 0.2
    gamma: tuple[float, float] = (0.8, 1.25)
    noise_std: float = 0.02
    blur_probability: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.0)
    scale: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        if len(self.scale) != 2:
            raise ValueError(f"intensity scale is a (low, high) range, got {self.scale}")
        self.scale = (float(self.scale[0]), float(self.scale[1]))
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"intensity scale must satisfy 0 < low <= high, got {self.scale}")

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One (C, H, W) image."""
        return self.batch(image.unsqueeze(0), generator)[0]

    def batch(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, C, H, W) images, each with its own random parameters, on their device."""
        b, device = images.shape[0], images.device
        u = torch.rand(b, 5, generator=generator, device=device).view(b, 5, 1, 1, 1)
        x = images.float().clamp(0, 1)
        lo, hi = math.log(self.gamma[0]), math.log(self.gamma[1])
        x = x ** torch.exp(lo + (hi - lo) * u[:, 0])
        if self.scale != (1.0, 1.0):
            # Drawn apart from u, so that the default keeps its random stream.
            v = torch.rand(b, 1, 1, 1, generator=generator, device=device)
            s_lo, s_hi = math.log(self.scale[0]), math.log(self.scale[1])
            x = x * torch.exp(s_lo + (s_hi - s_lo) * v)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (1 - self.contrast + 2 * self.contrast * u[:, 1]) + mean
        x = x + (2 * u[:, 2] - 1) * self.brightness
        if self.blur_probability > 0:
            low, high = self.blur_sigma
            sigma = (low + (high - low) * u[:, 3]).view(b)
            blurred = _gaussian_blur(x, sigma, radius=max(1, int(3 * high + 0.5)))
            x = torch.where(u[:, 4] < self.blur_probability, blurred, x)
        if self.noise_std > 0:
            noise = torch.randn(x.shape, generator=generator, device=device)
            x = x + noise * self.noise_std
        return x


def _gaussian_blur(images: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) images, sample i with ``sigma[i]`` (kernel
    radius fixed by the largest sigma allowed: no host sync)."""
    b, c, h, w = images.shape
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (x / sigma.view(b, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B * C, K)
    img = images.reshape(1, b * c, h, w)
    img = F.conv2d(F.pad(img, (radius, radius, 0, 0), mode="reflect"),
                   k.view(b * c, 1, 1, -1), groups=b * c)  # fmt: skip
    img = F.conv2d(F.pad(img, (0, 0, radius, radius), mode="reflect"),
                   k.view(b * c, 1, -1, 1), groups=b * c)  # fmt: skip
    return img.view(b, c, h, w)
