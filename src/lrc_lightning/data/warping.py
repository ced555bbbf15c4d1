"""Exact nearest-neighbour warping of integer maps (super-pixel ids, labels), 2D and 3D.

``grid_sample`` only takes floating-point input: ids warped through it as float32 lose every
integer above 2**24 (16,777,217 comes back as 16,777,216), so two supervoxels merge without
an error. Here the nearest source pixel of each grid position is computed the way
``grid_sample(mode="nearest", align_corners=False)`` chooses it, and the ids are gathered
from the integer map itself: every id comes back exactly, whatever its size or dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["warp_ids_nearest"]


def warp_ids_nearest(maps: Tensor, grid: Tensor, fill: int = -1) -> Tensor:
    """Sample integer maps at ``grid_sample`` grid positions, nearest neighbour, exactly.

    The same source pixel as ``F.grid_sample(maps.float()[:, None], grid, mode="nearest",
    padding_mode="zeros", align_corners=False)`` would pick, but gathered with integer
    indexing, so ids are never rounded.

    Args:
        maps: (N, H, W) or (N, D, H, W) integer maps.
        grid: (N, h, w, 2) or (N, d, h, w, 3) normalised sampling positions, last dim (x, y)
            or (x, y, z), as made by ``F.affine_grid(..., align_corners=False)``.
        fill: the value of positions outside the map.

    Returns:
        (N, h, w) or (N, d, h, w) maps of the input's dtype.

    Raises:
        TypeError: floating-point maps.
        ValueError: grid and maps that do not match.
    """
    if maps.is_floating_point() or maps.is_complex():
        raise TypeError(f"maps must be an integer tensor, got {maps.dtype}")
    n, spatial = maps.shape[0], tuple(maps.shape[1:])
    dims = len(spatial)
    if grid.ndim != dims + 2 or grid.shape[0] != n or grid.shape[-1] != dims:
        raise ValueError(
            f"a grid for {tuple(maps.shape)} maps must be (N={n}, *out, {dims}), "
            f"got {tuple(grid.shape)}"
        )
    grid = grid.to(maps.device, torch.float32)
    out = tuple(grid.shape[1:-1])
    flat = torch.zeros(grid.shape[:-1], dtype=torch.long, device=maps.device)
    inside = torch.ones(grid.shape[:-1], dtype=torch.bool, device=maps.device)
    stride = 1
    for axis in reversed(range(dims)):  # the grid's last dim runs x, y, z: axes reversed
        size = spatial[axis]
        # grid_sample's unnormalisation (align_corners=False) and rounding (half to even),
        # in the same float32 arithmetic, so that the same pixel is chosen.
        coord = ((grid[..., dims - 1 - axis] + 1) * size - 1) / 2
        index = torch.round(coord)
        inside &= (index >= 0) & (index <= size - 1)
        flat += index.clamp(0, size - 1).long() * stride
        stride *= size
    ids = maps.reshape(n, -1).gather(1, flat.reshape(n, -1)).reshape(n, *out)
    return torch.where(inside, ids, torch.full_like(ids, fill))
