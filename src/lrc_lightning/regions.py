"""Super-pixel maps at feature resolution, region selection and region embeddings.

All functions are batched tensor code (no Python loop over images or regions) and never
build a one-hot (B, K, H, W) tensor: pixels are routed to regions with gathers, scatters
and one sort over (B, h*w).

Shapes: B images, D channels, (H, W) map resolution, (h, w) feature resolution, N region
slots per image, M samples per region.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "DownsampleMode",
    "average_samples",
    "downsample_superpixels",
    "gather_pixels",
    "pool_regions",
    "region_embeddings",
    "region_slots",
    "sample_region_pixels",
    "select_regions",
]

DownsampleMode = Literal["nearest", "majority"]


def _check_maps(maps: Tensor, name: str) -> None:
    if maps.ndim != 3:
        raise ValueError(f"{name} must be (B, H, W), got shape {tuple(maps.shape)}")
    if maps.is_floating_point() or maps.is_complex() or maps.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of region ids, got {maps.dtype}")


def downsample_superpixels(
    maps: Tensor, size: tuple[int, int], mode: DownsampleMode = "nearest"
) -> Tensor:
    """Bring (B, H, W) id maps to (B, h, w) without mixing ids.

    * ``"nearest"``: the id at each feature pixel's centre (any H/h ratio).
    * ``"majority"``: the most frequent id in each (H/h x W/w) block, ignoring -1 unless the
      whole block is -1; needs integer factors. Ties go to the first id in raster order.

    Returns:
        (B, h, w) int64 map.
    """
    _check_maps(maps, "superpixels")
    b, big_h, big_w = maps.shape
    h, w = size
    maps = maps.long()
    if (big_h, big_w) == (h, w):
        return maps
    if mode == "nearest":
        rows = (
            ((torch.arange(h, device=maps.device) + 0.5) * (big_h / h)).long().clamp_(max=big_h - 1)
        )
        cols = (
            ((torch.arange(w, device=maps.device) + 0.5) * (big_w / w)).long().clamp_(max=big_w - 1)
        )
        return maps[:, rows][:, :, cols]
    if mode != "majority":
        raise ValueError(f"mode must be 'nearest' or 'majority', got {mode!r}")
    if big_h % h or big_w % w:
        raise ValueError(
            f"majority down-sampling needs integer factors, got {big_h}x{big_w} -> {h}x{w}"
        )
    fh, fw = big_h // h, big_w // w
    blocks = maps.view(b, h, fh, w, fw).permute(0, 1, 3, 2, 4).reshape(b, h, w, fh * fw)
    # votes[..., i] = how many pixels of the block share pixel i's id (-1 gets no votes).
    votes = (blocks.unsqueeze(-1) == blocks.unsqueeze(-2)).sum(-1)
    votes = votes.masked_fill(blocks < 0, 0)
    winner = votes.argmax(-1, keepdim=True)
    return blocks.gather(-1, winner).squeeze(-1)


def _region_counts(maps: Tensor, num_ids: int) -> Tensor:
    """(B, h, w) ids -> (B, num_ids) pixel counts; -1 is not counted."""
    flat = maps.flatten(1)
    valid = flat >= 0
    counts = torch.zeros(flat.shape[0], num_ids, dtype=torch.long, device=maps.device)
    return counts.scatter_add_(1, flat.clamp(min=0), valid.long())


def select_regions(
    maps_v1: Tensor,
    maps_v2: Tensor,
    num_regions: int,
    min_pixels: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw up to ``num_regions`` ids per image present in both views.

    A region qualifies when it covers at least ``min_pixels`` pixels in each view's map.
    Qualifying ids are drawn uniformly without replacement.

    Args:
        maps_v1, maps_v2: (B, h, w) integer maps at feature resolution (-1 = ignore).

    Returns:
        ids: (B, N) int64 region ids (arbitrary where invalid).
        valid: (B, N) bool.
    """
    _check_maps(maps_v1, "superpixels_v1")
    _check_maps(maps_v2, "superpixels_v2")
    if maps_v1.shape[0] != maps_v2.shape[0]:
        raise ValueError(
            f"the two views have different batch sizes: {maps_v1.shape[0]} and {maps_v2.shape[0]}"
        )
    num_ids = int(torch.maximum(maps_v1.max(), maps_v2.max()).clamp(min=0).item()) + 1
    counts_v1 = _region_counts(maps_v1, num_ids)
    counts_v2 = _region_counts(maps_v2, num_ids)
    eligible = (counts_v1 >= min_pixels) & (counts_v2 >= min_pixels)
    scores = torch.rand(eligible.shape, device=eligible.device, generator=generator)
    scores = scores + eligible.to(scores.dtype) * 2.0  # eligible ids always rank first
    k = min(num_regions, num_ids)
    ids = scores.topk(k, dim=1).indices
    valid = eligible.gather(1, ids)
    if k < num_regions:
        pad = num_regions - k
        ids = torch.cat([ids, ids.new_zeros(ids.shape[0], pad)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(valid.shape[0], pad)], dim=1)
    return ids, valid


def region_slots(maps: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
    """(B, h, w) ids -> (B, h*w) slot index in 0..N-1, or N for pixels of no drawn region."""
    b, n = ids.shape
    num_ids = int(max(int(maps.max().item()), int(ids.max().item()), 0)) + 1
    lut = torch.full((b, num_ids), n, dtype=torch.long, device=maps.device)
    slot_index = torch.arange(n, device=maps.device).expand(b, n)
    # Invalid slots keep pointing to "no slot": scatter them to a throw-away column.
    target = torch.where(valid, ids, torch.full_like(ids, num_ids))
    lut = torch.cat([lut, lut.new_full((b, 1), n)], dim=1).scatter_(1, target, slot_index)[
        :, :num_ids
    ]
    flat = maps.flatten(1)
    slots = lut.gather(1, flat.clamp(min=0))
    return slots.masked_fill(flat < 0, n)


def sample_region_pixels(
    maps: Tensor,
    ids: Tensor,
    valid: Tensor,
    samples_per_region: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw M pixel positions inside each drawn region.

    Without replacement; a region smaller than M contributes every pixel, cyclically.
    Positions of invalid slots are arbitrary (their embeddings are masked later).

    Args:
        maps: (B, h, w) int64 ids (-1 = ignore); ids, valid: (B, N).

    Returns:
        (B, N * M) flat pixel indices into h * w, slot-major.
    """
    b, h, w = maps.shape
    n, m, hw = ids.shape[1], samples_per_region, h * w
    slots = region_slots(maps, ids, valid)  # (B, hw), N = unassigned
    counts = torch.zeros(b, n + 1, dtype=torch.long, device=maps.device)
    counts.scatter_add_(1, slots, torch.ones_like(slots))
    # Group pixels by slot, in random order inside each group: sort by slot + U[0, 1).
    jitter = torch.rand(b, hw, device=maps.device, generator=generator)
    order = (slots.to(jitter.dtype) + jitter).argsort(dim=1)
    starts = counts.cumsum(1) - counts  # first position of each slot in `order`
    draws = torch.arange(m, device=maps.device)
    pos = starts[:, :n, None] + draws % counts[:, :n, None].clamp(min=1)
    return order.gather(1, pos.clamp(max=hw - 1).flatten(1))


def gather_pixels(features: Tensor, pixels: Tensor) -> Tensor:
    """(B, C, h, w) features at (B, P) flat pixel indices -> (B, C, P)."""
    b, c = features.shape[:2]
    return features.flatten(2).gather(2, pixels.unsqueeze(1).expand(b, c, pixels.shape[1]))


def average_samples(samples: Tensor, valid: Tensor) -> Tensor:
    """(B, D, N * M) sampled pixel embeddings -> (B, N, D) region embeddings.

    Each sample is L2-normalised, the M samples of a region are averaged and the mean is
    normalised again; invalid slots become zeros.
    """
    b, d, _ = samples.shape
    n = valid.shape[1]
    unit = torch.nn.functional.normalize(samples, dim=1)
    pooled = torch.nn.functional.normalize(unit.view(b, d, n, -1).mean(-1).transpose(1, 2), dim=-1)
    return pooled * valid.unsqueeze(-1).to(pooled.dtype)


def pool_regions(embeddings: Tensor, maps: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
    """Masked average pooling of (B, D, h, w) unit embeddings over each drawn region ->
    (B, N, D), normalised; invalid slots become zeros."""
    b, d, h, w = embeddings.shape
    n, hw = ids.shape[1], h * w
    slots = region_slots(maps, ids, valid)
    counts = torch.zeros(b, n + 1, dtype=torch.long, device=maps.device)
    counts.scatter_add_(1, slots, torch.ones_like(slots))
    sums = embeddings.new_zeros(b, n + 1, d)
    flat = embeddings.flatten(2)
    sums.scatter_add_(1, slots.unsqueeze(-1).expand(b, hw, d), flat.transpose(1, 2))
    pooled = sums[:, :n] / counts[:, :n].clamp(min=1).unsqueeze(-1).to(sums.dtype)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled * valid.unsqueeze(-1).to(pooled.dtype)


def region_embeddings(
    embeddings: Tensor,
    maps: Tensor,
    ids: Tensor,
    valid: Tensor,
    samples_per_region: int | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One L2-normalised embedding per drawn region.

    * ``samples_per_region=M``: M pixel positions are drawn inside the region
      (:func:`sample_region_pixels`) and their normalised embeddings averaged
      (:func:`average_samples`). [ours: the paper's "contrastive sampling"; how the samples
      are reduced is not stated there.]
    * ``samples_per_region=None``: masked average pooling over the whole region
      (DetCon-style), an ablation.

    Args:
        embeddings: (B, D, h, w) dense embeddings.
        maps: (B, h, w) int64 ids at the same resolution (-1 = ignore).
        ids, valid: (B, N) from :func:`select_regions`.

    Returns:
        (B, N, D) region embeddings (zeros where ``valid`` is False).
    """
    b, _, h, w = embeddings.shape
    if maps.shape != (b, h, w):
        raise ValueError(
            f"superpixels {tuple(maps.shape)} do not match embeddings {tuple(embeddings.shape)}"
        )
    if samples_per_region is None:
        unit = torch.nn.functional.normalize(embeddings, dim=1)
        return pool_regions(unit, maps, ids, valid)
    pixels = sample_region_pixels(maps, ids, valid, samples_per_region, generator)
    return average_samples(gather_pixels(embeddings, pixels), valid)
