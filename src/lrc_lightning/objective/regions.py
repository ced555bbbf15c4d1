"""Super-pixel maps at feature resolution, region selection and region embeddings.

All functions are batched tensor code (no Python loop over images or regions), never
build a one-hot (B, K, H, W) tensor, never wait for the device (no ``.item()``, no
data-dependent shape) and keep every shape fixed: pixels are routed to regions with sorts,
binary searches, 1-D gathers and 1-D scatters, which have deterministic CUDA kernels under
``torch.use_deterministic_algorithms(True)`` (``Trainer(deterministic=True)``).

Shapes: B images, D channels, (H, W) map resolution, (h, w) feature resolution, N region
slots per image, M samples per region. Volumes work the same way: (B, H, W) stands for
(B, *spatial) with 2 or 3 spatial dims ((B, D, H, W) supervoxel maps, (B, C, d, h, w)
features), through the same code: pixels are addressed by their flat index.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "DownsampleMode",
    "average_samples",
    "check_region_ids",
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
    if maps.ndim not in (3, 4):
        raise ValueError(f"{name} must be (B, H, W) or (B, D, H, W), got shape {tuple(maps.shape)}")
    if maps.is_floating_point() or maps.is_complex() or maps.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of region ids, got {maps.dtype}")


def _run_bounds(sorted_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For values sorted along the last dim: whether each position starts a run of equal
    values, and each position's run start and end (inclusive) indices. Fixed shapes."""
    length = sorted_values.shape[-1]
    position = torch.arange(length, device=sorted_values.device).expand_as(sorted_values)
    starts = torch.ones_like(sorted_values, dtype=torch.bool)
    starts[..., 1:] = sorted_values[..., 1:] != sorted_values[..., :-1]
    run_start = torch.where(starts, position, 0).cummax(-1).values
    ends = torch.ones_like(starts)
    ends[..., :-1] = starts[..., 1:]
    # Reverse cumulative minimum: the nearest run end at or after each position.
    ends_at = torch.where(ends, position, length).flip(-1).cummin(-1).values.flip(-1)
    return starts, run_start, ends_at


def downsample_superpixels(
    maps: Tensor, size: tuple[int, ...], mode: DownsampleMode = "nearest"
) -> Tensor:
    """Bring (B, *spatial) id maps to (B, *size) without mixing ids (2D or 3D).

    * ``"nearest"``: the id at each feature pixel's centre (any ratio).
    * ``"majority"``: the most frequent id in each block (H/h x W/w, or D/d x H/h x W/w),
      ignoring -1 unless the whole block is -1; needs integer factors. Ties go to the first
      id in raster order. One sort per block: memory linear in the map size.

    Returns:
        (B, *size) int64 map.
    """
    _check_maps(maps, "superpixels")
    b, big = maps.shape[0], tuple(maps.shape[1:])
    size = tuple(int(s) for s in size)
    if len(size) != len(big):
        raise ValueError(f"cannot bring a {len(big)}D map {big} to the {len(size)}D size {size}")
    maps = maps.long()
    if big == size:
        return maps
    if mode == "nearest":
        for axis, (n_big, n) in enumerate(zip(big, size, strict=True), start=1):
            index = ((torch.arange(n, device=maps.device) + 0.5) * (n_big / n)).long()
            maps = maps.index_select(axis, index.clamp_(max=n_big - 1))
        return maps
    if mode != "majority":
        raise ValueError(f"mode must be 'nearest' or 'majority', got {mode!r}")
    if any(n_big % n for n_big, n in zip(big, size, strict=True)):
        raise ValueError(
            "majority down-sampling needs integer factors, got "
            + "x".join(map(str, big))
            + " -> "
            + "x".join(map(str, size))
        )
    factors = [n_big // n for n_big, n in zip(big, size, strict=True)]
    area = 1
    for f in factors:
        area *= f
    # (B, n0, f0, n1, f1, ...) -> (B, n0, n1, ..., f0 * f1 * ...): one block per row.
    split = [d for pair in zip(size, factors, strict=True) for d in pair]
    dims = len(size)
    order = [0, *range(1, 2 * dims, 2), *range(2, 2 * dims + 1, 2)]
    blocks = maps.view(b, *split).permute(*order).reshape(b, *size, area)
    # Stable sort: equal ids keep raster order, so a run's first element is its first pixel.
    values, raster = blocks.sort(dim=-1, stable=True)
    _, run_start, run_end = _run_bounds(values)
    votes = run_end - run_start + 1
    first_pixel = raster.gather(-1, run_start)
    # Most votes first; among equal votes the id seen first in raster order; -1 last.
    score = torch.where(values >= 0, votes * (area + 1) + (area - first_pixel), -1)
    return values.gather(-1, score.argmax(-1, keepdim=True)).squeeze(-1)


def _draw(eligible: Tensor, values: Tensor | None, num_regions: int,
          generator: torch.Generator | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Up to ``num_regions`` eligible candidates per row, uniformly without replacement:
    (ids, valid); a candidate's id is its column, or ``values`` at its column."""
    scores = torch.rand(eligible.shape, device=eligible.device, generator=generator)
    scores = scores + eligible.to(scores.dtype) * 2.0  # eligible ids always rank first
    k = min(num_regions, eligible.shape[1])
    picked = scores.topk(k, dim=1).indices
    ids = picked if values is None else values.gather(1, picked)
    valid = eligible.gather(1, picked)
    if k < num_regions:
        pad = num_regions - k
        ids = torch.cat([ids, ids.new_zeros(ids.shape[0], pad)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(valid.shape[0], pad)], dim=1)
    return ids, valid


def select_regions(
    maps_v1: Tensor,
    maps_v2: Tensor,
    num_regions: int,
    min_pixels: int = 1,
    generator: torch.Generator | None = None,
    num_ids: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw up to ``num_regions`` ids per image present in both views.

    A region qualifies when it covers at least ``min_pixels`` pixels in each view's map.
    Qualifying ids are drawn uniformly without replacement. No host sync, fixed shapes:

    * ``num_ids`` given (an upper bound on the ids, known without looking at the data: the
      loss passes the pixel count of the full-resolution maps, which per-image Felzenszwalb
      ids never reach): pixels are counted per id with one 1-D scatter, linear in the map
      size. An id at or above the bound is refused as :func:`check_region_ids` says: a
      ValueError for maps in host memory; on an accelerator (not read back: no host sync)
      it is never counted, so never drawn and never merged with another id, on every
      device alike.
    * ``num_ids=None``: the ids of both views are sorted together and each run of equal ids
      is counted per view with prefix sums (any ids, O(n log n)).

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
    if num_ids is not None:
        check_region_ids(maps_v1, num_ids, "superpixels_v1")
        check_region_ids(maps_v2, num_ids, "superpixels_v2")
        counts_v1 = _id_counts(maps_v1, num_ids)
        counts_v2 = _id_counts(maps_v2, num_ids)
        eligible = (counts_v1 >= min_pixels) & (counts_v2 >= min_pixels)
        return _draw(eligible, None, num_regions, generator)
    b, p1 = maps_v1.shape[0], maps_v1[0].numel()
    both = torch.cat([maps_v1.reshape(b, -1), maps_v2.reshape(b, -1)], dim=1).long()
    values, origin = both.sort(dim=1, stable=True)
    starts, _, run_end = _run_bounds(values)
    in_v1 = (origin < p1).long().cumsum(1)  # pixels of view 1 up to each position
    position = torch.arange(values.shape[1], device=values.device)
    before = position - 1
    v1_before = torch.where(before >= 0, in_v1.gather(1, before.clamp(min=0).expand(b, -1)), 0)
    count_v1 = in_v1.gather(1, run_end) - v1_before
    count_v2 = (run_end - position + 1) - count_v1
    # One candidate per distinct id: the first position of its run.
    eligible = starts & (values >= 0) & (count_v1 >= min_pixels) & (count_v2 >= min_pixels)
    return _draw(eligible, values, num_regions, generator)


def _id_counts(maps: Tensor, num_ids: int) -> Tensor:
    """(B, h, w) ids -> (B, num_ids) pixel counts of the ids 0..num_ids-1; a 1-D scatter
    (deterministic on CUDA under ``torch.use_deterministic_algorithms``).

    Negative ids are not counted; ids at or above ``num_ids`` go to an extra column that is
    dropped: never counted as another id, never an index out of range (on any device)."""
    b = maps.shape[0]
    flat = maps.reshape(b, -1).long()
    width = num_ids + 1  # column num_ids collects the ids beyond the bound
    index = torch.where(flat < num_ids, flat, num_ids).clamp(min=0)
    offsets = torch.arange(b, device=maps.device).unsqueeze(1) * width
    counts = torch.zeros(b * width, dtype=torch.long, device=maps.device)
    counts.scatter_add_(0, (index + offsets).flatten(), (flat >= 0).long().flatten())
    return counts.view(b, width)[:, :num_ids]


def check_region_ids(
    maps: Tensor, num_ids: int, name: str = "superpixels", read_device: bool = False
) -> None:
    """Refuse ids at or above ``num_ids`` with a ValueError.

    The bound of :class:`~lrc_lightning.LocalizedRegionContrastLoss`: ids are -1 (any
    negative id: ignored) or 0..P-1, P the pixels (voxels) of one full-resolution map.
    Super-pixels numbered per image (or per 3D patch,
    :func:`lrc_lightning.data.patches.relabel_patch`) always fit.

    Maps in host memory are always read (there is no device to wait for). Maps on an
    accelerator are read only with ``read_device=True`` (one host sync: the library does it
    once, on the first batch, in :func:`lrc_lightning.objective.term.warn_if_too_coarse`); otherwise
    the counting leaves their out-of-bound ids out (:func:`select_regions`) on every device
    alike, instead of a device-side assert (fatal to a CUDA context, absent on ROCm). Not
    read while ``torch.compile`` traces (a data-dependent branch).

    Raises:
        ValueError: an id at or above ``num_ids``, naming the map, the id and what to do.
    """
    if maps.numel() == 0 or torch.compiler.is_compiling():
        return
    if maps.device.type == "cpu" and type(maps) is Tensor:
        # Host memory: numpy reads it in place, no device op (and no sync) involved.
        largest = int(maps.detach().numpy().max())
    elif read_device:
        largest = int(maps.max())
    else:
        return
    if largest >= num_ids:
        raise ValueError(
            f"{name}: super-pixel id {largest} is not below {num_ids}, the bound on ids (the "
            f"pixel count of one full-resolution map: ids must be -1 or 0..{num_ids - 1}). "
            "Number super-pixels per image, or per 3D patch "
            "(lrc_lightning.data.patches.relabel_patch), not over a whole volume or dataset."
        )


def region_slots(maps: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
    """(B, h, w) ids -> (B, h*w) slot index in 0..N-1, or N for pixels of no drawn region.

    A binary search of each pixel's id among the image's valid drawn ids (no host sync).
    """
    n = ids.shape[1]
    sentinel = torch.iinfo(torch.long).max
    keyed, order = torch.where(valid, ids, sentinel).sort(dim=1)
    flat = maps.flatten(1).long().contiguous()
    pos = torch.searchsorted(keyed, flat).clamp_(max=n - 1)
    found = (keyed.gather(1, pos) == flat) & (flat >= 0)
    return torch.where(found, order.gather(1, pos), n)


def _slot_counts(slots: Tensor, n: int) -> Tensor:
    """(B, P) slot indices in 0..n -> (B, n + 1) counts (a 1-D scatter: deterministic)."""
    b = slots.shape[0]
    offsets = torch.arange(b, device=slots.device).unsqueeze(1) * (n + 1)
    counts = torch.zeros(b * (n + 1), dtype=torch.long, device=slots.device)
    counts.scatter_add_(0, (slots + offsets).flatten(), torch.ones_like(slots).flatten())
    return counts.view(b, n + 1)


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
        maps: (B, h, w) (or (B, d, h, w)) int64 ids (-1 = ignore); ids, valid: (B, N).

    Returns:
        (B, N * M) flat pixel indices into h * w (d * h * w), slot-major.
    """
    b = maps.shape[0]
    n, m, hw = ids.shape[1], samples_per_region, maps[0].numel()
    slots = region_slots(maps, ids, valid)  # (B, hw), N = unassigned
    counts = _slot_counts(slots, n)
    # Group pixels by slot, in random order inside each group: sort by slot + U[0, 1).
    jitter = torch.rand(b, hw, device=maps.device, generator=generator)
    order = (slots.to(jitter.dtype) + jitter).argsort(dim=1)
    starts = counts.cumsum(1) - counts  # first position of each slot in `order`
    draws = torch.arange(m, device=maps.device)
    pos = starts[:, :n, None] + draws % counts[:, :n, None].clamp(min=1)
    return order.gather(1, pos.clamp(max=hw - 1).flatten(1))


def gather_pixels(features: Tensor, pixels: Tensor) -> Tensor:
    """(B, C, *spatial) features at (B, P) flat pixel indices -> (B, C, P).

    A gather from the flattened features (no copy of the map); being 1-D, it has a
    deterministic CUDA backward under ``torch.use_deterministic_algorithms``.
    """
    b, c = features.shape[:2]
    hw = features[0, 0].numel()
    base = (torch.arange(b, device=pixels.device) * (c * hw)).view(b, 1, 1)
    channel = (torch.arange(c, device=pixels.device) * hw).view(1, c, 1)
    index = base + channel + pixels.unsqueeze(1)  # (B, C, P) into the flat features
    return features.reshape(-1).gather(0, index.flatten()).view(b, c, pixels.shape[1])


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
    """Masked average pooling of (B, D, *spatial) unit embeddings over each drawn region ->
    (B, N, D), normalised; invalid slots become zeros. Sums by ``index_add`` over rows
    (deterministic on CUDA under ``torch.use_deterministic_algorithms``)."""
    b, d = embeddings.shape[:2]
    n = ids.shape[1]
    slots = region_slots(maps, ids, valid)
    counts = _slot_counts(slots, n)
    offsets = torch.arange(b, device=maps.device).unsqueeze(1) * (n + 1)
    rows = embeddings.flatten(2).transpose(1, 2).reshape(-1, d)  # (B * hw, D)
    sums = embeddings.new_zeros(b * (n + 1), d).index_add_(0, (slots + offsets).flatten(), rows)
    sums = sums.view(b, n + 1, d)
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
        embeddings: (B, D, *spatial) dense embeddings (2D or 3D).
        maps: (B, *spatial) int64 ids at the same resolution (-1 = ignore).
        ids, valid: (B, N) from :func:`select_regions`.

    Returns:
        (B, N, D) region embeddings (zeros where ``valid`` is False).
    """
    if maps.shape != (embeddings.shape[0], *embeddings.shape[2:]):
        raise ValueError(
            f"superpixels {tuple(maps.shape)} do not match embeddings {tuple(embeddings.shape)}"
        )
    if samples_per_region is None:
        unit = torch.nn.functional.normalize(embeddings, dim=1)
        return pool_regions(unit, maps, ids, valid)
    pixels = sample_region_pixels(maps, ids, valid, samples_per_region, generator)
    return average_samples(gather_pixels(embeddings, pixels), valid)
