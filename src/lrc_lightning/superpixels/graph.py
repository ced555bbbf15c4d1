"""Felzenszwalb super-pixels, fast.

:func:`felzenszwalb` reproduces ``skimage.segmentation.felzenszwalb`` on 2D single-channel
images (same smoothing, same 8-connected edge costs, same greedy merge rule and the same
small-segment post-processing) but replaces its two slow parts:

* ``np.argsort`` of ~4*H*W float64 edge costs is replaced by a stable LSD radix sort of
  the costs rounded to float32 (non-negative IEEE floats sort like unsigned integers); the
  merge test itself still uses the float64 costs;
* the union-find loops run in numba with path halving and union by size, and edge
  endpoints are decoded from the edge index (4 per pixel) instead of being materialised
  as an (E, 2) array.

Ties (costs equal in float32) keep edge order here, while skimage uses numpy's unstable
quicksort on float64; the two results can therefore differ on a handful of pixels where
near-equal costs compete. ``tests/test_superpixels.py`` checks adjusted Rand index >= 0.99 against
skimage on real CT and MR slices.

Ids are ``int32`` (never ``uint8``: more than 255 regions are common on 512x512 CT).

:func:`felzenszwalb_3d` runs the same algorithm on the 3D voxel grid (supervoxels: one
region may span slices), 6- or 26-connected, with smoothing scaled by the voxel spacing.
Edges are encoded in one int32 (voxel and direction) and their costs sorted as float32
bit patterns (see its docstring for the memory).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numba
import numpy as np

from lrc_lightning.runtime.processes import die_with_parent

__all__ = [
    "IGNORE_INDEX",
    "check_slice_size",
    "felzenszwalb",
    "felzenszwalb_3d",
    "felzenszwalb_volume",
    "grid_regions",
    "suppress_background",
]

#: Id of pixels that belong to no region (suppressed background); never sampled by the loss.
IGNORE_INDEX = -1

#: Peak memory of :func:`felzenszwalb` per pixel: float64 copy and smoothed image, 4 edge
#: keys and their radix-sort buffers, union-find arrays (measured: 96 bytes on 3000x3000).
BYTES_PER_PIXEL_2D = 100


@functools.cache
def _memory_limit() -> int | None:
    """Bytes this process may use at most: physical memory, or a smaller cgroup limit
    (read once: felzenszwalb checks every slice)."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                limits.append(int(fh.read().strip()))
        except (OSError, ValueError):  # absent, or "max"
            pass
    return min(limits) if limits else None


def check_slice_size(shape: tuple[int, ...]) -> None:
    """Raise before any allocation if :func:`felzenszwalb` cannot segment an (H, W) slice
    here: more pixels than int32 edge indices address (4 edges per pixel), or more memory
    (:data:`BYTES_PER_PIXEL_2D` per pixel) than the machine (or its cgroup) has, which
    would end in an out-of-memory kill instead of an error.

    Raises:
        ValueError: the slice is too large; the message gives its size and the memory.
    """
    pixels = int(shape[0]) * int(shape[1])
    if 4 * pixels >= 2**31:
        raise ValueError(
            f"a {shape[0]}x{shape[1]} slice has too many pixels ({pixels}; at most "
            f"{2**29 - 1} for int32 edge indices); crop or downsample it (image_size=...)"
        )
    need, limit = BYTES_PER_PIXEL_2D * pixels, _memory_limit()
    if limit is not None and need > limit:
        raise ValueError(
            f"a {shape[0]}x{shape[1]} slice needs about {need / 2**30:.1f} GiB for "
            f"super-pixels, more than the {limit / 2**30:.1f} GiB of memory here; crop or "
            "downsample it (image_size=...)"
        )


@numba.njit(cache=True, nogil=True)
def _radix_pass(
    src_keys: np.ndarray,
    src_order: np.ndarray,
    dst_keys: np.ndarray,
    dst_order: np.ndarray,
    counts: np.ndarray,
    shift: np.uint32,
) -> None:  # pragma: no cover - compiled
    """One stable counting-sort pass on the digit ``(key >> shift) & (len(counts) - 1)``."""
    n_buckets = counts.shape[0]
    offsets = np.empty(n_buckets, dtype=np.int64)
    total = 0
    for b in range(n_buckets):
        offsets[b] = total
        total += counts[b]
    mask = np.uint32(n_buckets - 1)
    for i in range(src_keys.shape[0]):
        k = src_keys[i]
        b = (k >> shift) & mask
        dst = offsets[b]
        offsets[b] = dst + 1
        dst_keys[dst] = k
        dst_order[dst] = src_order[i]


@numba.njit(cache=True, nogil=True)
def _radix_argsort_u32(keys: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """Stable argsort of uint32 keys (int32 result).

    Zero keys (flat regions: CT air, padding) go first in index order without sorting; the
    rest take an LSD radix sort: two 15-bit passes when every key is below 2**30 (always
    the case for costs of images in [0, 1]; 1.0f is 0x3F800000), else three 11-bit passes.
    Passes whose digit is the same for every key are skipped.
    """
    n = keys.shape[0]
    order = np.empty(n, dtype=np.int32)
    n_zero = 0
    max_key = np.uint32(0)
    for i in range(n):
        k = keys[i]
        if k == 0:
            order[n_zero] = i
            n_zero += 1
        elif k > max_key:
            max_key = k
    m = n - n_zero
    keys_a = np.empty(m, dtype=np.uint32)
    order_a = np.empty(m, dtype=np.int32)
    j = 0
    for i in range(n):
        if keys[i] != 0:
            keys_a[j] = keys[i]
            order_a[j] = i
            j += 1
    order[n_zero:] = _radix_sort_pairs(keys_a, order_a, max_key)[1]
    return order


@numba.njit(cache=True, nogil=True)
def _radix_sort_pairs(
    keys: np.ndarray, values: np.ndarray, max_key: np.uint32
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Stable LSD radix sort of uint32 ``keys`` carrying ``values``: two 15-bit passes when
    every key is below 2**30, else three 11-bit passes; a pass whose digit is the same for
    every key is skipped. Sorts into one more pair of buffers; returns the sorted pair."""
    m = keys.shape[0]
    bits = 15 if max_key < np.uint32(1 << 30) else 11
    n_passes = 2 if bits == 15 else 3
    mask = np.uint32((1 << bits) - 1)
    hist = np.zeros((n_passes, 1 << bits), dtype=np.int64)
    for i in range(m):
        k = keys[i]
        for p in range(n_passes):
            hist[p, (k >> np.uint32(p * bits)) & mask] += 1
    keys_b = np.empty_like(keys)
    values_b = np.empty_like(values)
    in_a = True
    for p in range(n_passes):
        if hist[p].max() == m:  # constant digit: the pass would not change the order
            continue
        shift = np.uint32(p * bits)
        if in_a:
            _radix_pass(keys, values, keys_b, values_b, hist[p], shift)
        else:
            _radix_pass(keys_b, values_b, keys, values, hist[p], shift)
        in_a = not in_a
    return (keys, values) if in_a else (keys_b, values_b)


@numba.njit(cache=True, nogil=True, inline="always")
def _find_root(forest: np.ndarray, n: int) -> int:  # pragma: no cover - compiled
    # Path halving: each visited node is re-pointed to its grandparent.
    while forest[n] != n:
        grandparent = forest[forest[n]]
        forest[n] = grandparent
        n = grandparent
    return n


@numba.njit(cache=True, nogil=True, inline="always")
def _union(forest: np.ndarray, size: np.ndarray, r0: int, r1: int) -> int:  # pragma: no cover
    # Union by size. skimage keeps the smallest pixel index as root instead; the merge rule
    # only reads each component's size and inner cost, never the root's identity, and the
    # final ids are assigned by first appearance, so the segmentation is the same.
    if size[r0] < size[r1]:
        r0, r1 = r1, r0
    forest[r1] = r0
    size[r0] += size[r1]
    return r0


def _gaussian_weights(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Normalised 1D Gaussian taps, as ``scipy.ndimage.gaussian_filter`` builds them."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (float(sigma) * float(sigma)) * x.astype(np.float64) ** 2)
    return phi / phi.sum()


@numba.njit(cache=True, nogil=True)
def _reflect(i: int, n: int) -> int:  # pragma: no cover - compiled
    # scipy's "reflect" (half-sample symmetric): d c b a | a b c d | d c b a
    period = 2 * n
    i = i % period
    if i < 0:
        i += period
    return i if i < n else period - 1 - i


@numba.njit(cache=True, nogil=True)
def _smooth_rows_cols(image: np.ndarray, weights: np.ndarray) -> np.ndarray:  # pragma: no cover
    """Separable symmetric correlation along axis 0 then axis 1 (reflect boundary).

    The arithmetic follows scipy.ndimage's symmetric-kernel loop term by term (centre tap,
    then pairs from the outermost inwards) so the result matches it bit for bit.
    """
    height, width = image.shape
    radius = weights.shape[0] // 2
    centre = weights[radius]
    tmp = np.empty((height, width), dtype=np.float64)
    for r in range(height):
        row = tmp[r]
        for c in range(width):
            row[c] = image[r, c] * centre
        for j in range(radius, 0, -1):
            lo = image[_reflect(r - j, height)]
            hi = image[_reflect(r + j, height)]
            w = weights[radius - j]
            for c in range(width):
                row[c] += (hi[c] + lo[c]) * w
    out = np.empty((height, width), dtype=np.float64)
    line = np.empty(width + 2 * radius, dtype=np.float64)
    for r in range(height):
        for c in range(-radius, width + radius):
            line[c + radius] = tmp[r, _reflect(c, width)]
        row = out[r]
        for c in range(width):
            row[c] = line[c + radius] * centre
        for j in range(radius, 0, -1):
            w = weights[radius - j]
            for c in range(width):
                row[c] += (line[c + radius + j] + line[c + radius - j]) * w
    return out


@numba.njit(cache=True, nogil=True)
def _edge_steps(width: int) -> np.ndarray:  # pragma: no cover - compiled
    # 8-connected graph, 4 edges per pixel p (edge index e = 4 p + d): d=0 down, 1 right,
    # 2 down-right, 3 down-left (skimage's "up-right" edge, seen from its other end).
    return np.array([width, 1, width + 1, width - 1], dtype=np.int64)


@numba.njit(cache=True, nogil=True)
def _edge_keys(
    flat: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, int]:  # pragma: no cover
    """Sort keys of all edges and the number of edges inside the image.

    Key = |intensity difference| rounded to float32, as its bit pattern. Rounding is
    monotone, so the order is exact except among costs equal in float32 (they keep edge
    order: the sort is stable); non-negative IEEE floats order like their bit patterns
    read as unsigned integers. Edges that leave the image get the largest key so that they
    sort last and are never visited.
    """
    step = _edge_steps(width)
    keys = np.full(4 * height * width, np.uint32(0xFFFFFFFF), dtype=np.uint32)
    n_edges = 0
    for r in range(height):
        for c in range(width):
            p = r * width + c
            v = flat[p]
            if r < height - 1:
                keys[4 * p] = np.float32(abs(v - flat[p + step[0]])).view(np.uint32)
                if c < width - 1:
                    keys[4 * p + 2] = np.float32(abs(v - flat[p + step[2]])).view(np.uint32)
                    n_edges += 1
                if c > 0:
                    keys[4 * p + 3] = np.float32(abs(v - flat[p + step[3]])).view(np.uint32)
                    n_edges += 1
                n_edges += 1
            if c < width - 1:
                keys[4 * p + 1] = np.float32(abs(v - flat[p + step[1]])).view(np.uint32)
                n_edges += 1
    return keys, n_edges


@numba.njit(cache=True, nogil=True)
def _merge_regions(
    flat: np.ndarray, width: int, order: np.ndarray, n_edges: int, scale: float, min_size: int
) -> np.ndarray:  # pragma: no cover - compiled
    """Greedy merging over edges in increasing cost, then small-segment removal."""
    n_pix = flat.shape[0]
    step = _edge_steps(width)
    forest = np.arange(n_pix, dtype=np.int32)
    size = np.ones(n_pix, dtype=np.int32)
    inner = np.zeros(n_pix, dtype=np.float64)
    for i in range(n_edges):
        e = order[i]
        a = e >> 2
        b = a + step[e & 3]
        s0 = _find_root(forest, a)
        s1 = _find_root(forest, b)
        if s0 == s1:
            continue
        # The merge test uses the exact float64 cost (skimage: sqrt(d * d) == |d|) and,
        # as skimage, thresholds rounded to C float (float32).
        t0 = np.float32(inner[s0] + scale / size[s0])
        t1 = np.float32(inner[s1] + scale / size[s1])
        cost = abs(flat[a] - flat[b])
        if cost < min(t0, t1):
            inner[_union(forest, size, s0, s1)] = cost
    _merge_small(forest, size, order, n_edges, step, 2, min_size)
    return _first_appearance_ids(forest, size)


@numba.njit(cache=True, nogil=True)
def _first_appearance_ids(forest: np.ndarray, size: np.ndarray) -> np.ndarray:  # pragma: no cover
    """Ids 0..K-1 in order of each region's first pixel in raster order (as skimage).

    Consumes ``size``: a root's size (>= 1) is overwritten by -(id + 1) once it has an id,
    so no further per-pixel array is needed.
    """
    labels = np.empty(forest.shape[0], dtype=np.int32)
    next_id = 0
    for p in range(forest.shape[0]):
        root = _find_root(forest, p)
        if size[root] > 0:
            size[root] = -(next_id + 1)
            next_id += 1
        labels[p] = -size[root] - 1
    return labels


@numba.njit(cache=True, nogil=True)
def _merge_small(
    forest: np.ndarray,
    size: np.ndarray,
    order: np.ndarray,
    n_edges: int,
    step: np.ndarray,
    shift: int,
    min_size: int,
) -> None:  # pragma: no cover - compiled
    """Post-processing: merge segments smaller than ``min_size`` along the cheapest of the
    first ``n_edges`` edges of ``order`` (``(pixel << shift) | direction``) first. Stops as
    soon as no small segment is left: the remaining edges could not merge anything."""
    direction_mask = (1 << shift) - 1
    n_small = 0
    for p in range(forest.shape[0]):
        if forest[p] == p and size[p] < min_size:
            n_small += 1
    i = 0
    while n_small > 0 and i < n_edges:
        e = order[i]
        i += 1
        a = e >> shift
        s0 = _find_root(forest, a)
        s1 = _find_root(forest, a + step[e & direction_mask])
        if s0 == s1:
            continue
        small0 = size[s0] < min_size
        small1 = size[s1] < min_size
        if small0 or small1:
            new = _union(forest, size, s0, s1)
            n_small -= int(small0) + int(small1) - int(size[new] < min_size)


def _segment_graph(smoothed: np.ndarray, scale: float, min_size: int) -> np.ndarray:
    height, width = smoothed.shape
    flat = smoothed.ravel()
    keys, n_edges = _edge_keys(flat, height, width)
    order = _radix_argsort_u32(keys)
    return _merge_regions(flat, width, order, n_edges, scale, min_size).reshape(height, width)


def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"{name} must be a 2D array (H, W), got shape {image.shape}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"{name} must be at least 2x2, got shape {image.shape}")
    check_slice_size(image.shape)  # before the checks below allocate per pixel
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(
            f"{name} must be a float image normalised to [0, 1] (got dtype {image.dtype}); "
            "normalise it first (lrc_lightning.data.intensity)"
        )
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{name} contains NaN or inf values")
    return image


def felzenszwalb(
    image: np.ndarray,
    scale: float = 100.0,
    sigma: float = 0.8,
    min_size: int = 50,
    background_threshold: float | None = None,
) -> np.ndarray:
    """Felzenszwalb-Huttenlocher graph segmentation of one 2D slice.

    Args:
        image: (H, W) float image, normalised to [0, 1].
        scale: higher means fewer, larger regions (skimage's ``scale``).
        sigma: Gaussian pre-smoothing width in pixels.
        min_size: regions smaller than this (pixels) are merged into a neighbour.
        background_threshold: if set, regions whose mean intensity is below it get id
            :data:`IGNORE_INDEX` (-1) and the rest are renumbered 0..K-1 (see
            :func:`suppress_background`).

    Returns:
        (H, W) int32 map with ids 0..K-1 (and -1 for suppressed background).

    Raises:
        ValueError: not a finite 2D image, a bad parameter, or a slice too large to
            segment here (:func:`check_slice_size`).
    """
    image = _check_image(image)
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    image64 = np.ascontiguousarray(image, dtype=np.float64)
    # skimage smooths with scipy.ndimage.gaussian_filter (reflect, truncate=4); ours is the
    # same arithmetic, compiled (scipy's generic filter loop costs ~2x the whole segmentation).
    smoothed = _smooth_rows_cols(image64, _gaussian_weights(sigma)) if sigma > 0 else image64
    labels = _segment_graph(smoothed, float(scale) / 255.0, int(min_size))
    if background_threshold is not None:
        labels = suppress_background(labels, image, background_threshold)
    return labels


def suppress_background(labels: np.ndarray, image: np.ndarray, threshold: float) -> np.ndarray:
    """Set regions whose mean intensity is below ``threshold`` to -1, renumber the rest.

    Args:
        labels: (H, W) int map with ids 0..K-1 (may already contain -1).
        image: (H, W) float image the map was computed on.
        threshold: mean-intensity threshold, in the image's (normalised) units.

    Returns:
        (H, W) int32 map with ids 0..K'-1 in order of first appearance, -1 elsewhere.
    """
    labels = np.asarray(labels)
    if labels.shape != np.shape(image):
        raise ValueError(f"labels {labels.shape} and image {np.shape(image)} differ in shape")
    out = np.full(labels.shape, IGNORE_INDEX, dtype=np.int32)
    valid = labels >= 0
    if not valid.any():
        return out
    ids = labels[valid]
    n = int(ids.max()) + 1
    sums = np.bincount(ids, weights=np.asarray(image, dtype=np.float64)[valid], minlength=n)
    counts = np.bincount(ids, minlength=n)
    keep = (counts > 0) & (sums >= threshold * counts)
    new_ids = np.full(n, IGNORE_INDEX, dtype=np.int32)
    new_ids[keep] = np.arange(int(keep.sum()), dtype=np.int32)
    out[valid] = new_ids[ids]
    return out


def _volume_worker(args: tuple[np.ndarray, dict[str, Any]]) -> np.ndarray:
    slice_, kwargs = args
    return felzenszwalb(slice_, **kwargs)


def felzenszwalb_volume(
    volume: np.ndarray,
    axis: int = 0,
    processes: int | None = 1,
    progress: Callable[[int], None] | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """Super-pixels for every 2D slice of a 3D volume, slices in parallel processes.

    Args:
        volume: (D, H, W) float volume normalised to [0, 1] (slices taken along ``axis``).
        axis: slicing axis.
        processes: worker processes; ``None`` = all cores, 1 = in this process.
        progress: called with the number of slices finished after each slice (e.g.
            ``tqdm.update``).
        **kwargs: forwarded to :func:`felzenszwalb`.

    Returns:
        int32 array of the volume's shape; ids restart at 0 in every slice.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D, got shape {volume.shape}")
    moved = np.moveaxis(volume, axis, 0)
    out = np.empty(moved.shape, dtype=np.int32)
    n_proc = os.cpu_count() or 1 if processes is None else processes
    if n_proc <= 1 or moved.shape[0] == 1:
        for i, sl in enumerate(moved):
            out[i] = felzenszwalb(sl, **kwargs)
            if progress is not None:
                progress(1)
    else:
        with ProcessPoolExecutor(max_workers=n_proc, initializer=die_with_parent,
                                 initargs=(os.getpid(),)) as pool:  # fmt: skip
            jobs = ((np.ascontiguousarray(sl), kwargs) for sl in moved)
            for i, labels in enumerate(pool.map(_volume_worker, jobs)):
                out[i] = labels
                if progress is not None:
                    progress(1)
    return np.moveaxis(out, 0, axis)


# ---------------------------------------------------------------------- 3D supervoxels
def _neighbour_offsets(connectivity: int) -> np.ndarray:
    """(K, 3) forward neighbour steps (dz, dy, dx): each undirected edge once."""
    if connectivity == 6:
        return np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.int64)
    if connectivity == 26:
        steps = [
            (dz, dy, dx)
            for dz in (-1, 0, 1)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if (dz, dy, dx) > (0, 0, 0)
        ]
        return np.array(steps, dtype=np.int64)
    raise ValueError(f"connectivity must be 6 or 26, got {connectivity}")


@numba.njit(cache=True, nogil=True, inline="always")
def _edge_key3(flat: np.ndarray, p: int, q: int) -> np.uint32:  # pragma: no cover - compiled
    # Non-negative float32 costs order like their bit patterns read as unsigned integers.
    return np.float32(abs(flat[p] - flat[q])).view(np.uint32)


@numba.njit(cache=True, nogil=True)
def _edges3(
    flat: np.ndarray, shape: np.ndarray, offsets: np.ndarray, shift: int
) -> tuple[np.ndarray, np.uint32]:  # pragma: no cover - compiled
    """Every edge inside the volume as ``(voxel << shift) | direction``, in index order,
    and the largest key."""
    depth, height, width = shape[0], shape[1], shape[2]
    k = offsets.shape[0]
    count = 0
    for z in range(depth):
        for y in range(height):
            for x in range(width):
                for d in range(k):
                    zz, yy, xx = z + offsets[d, 0], y + offsets[d, 1], x + offsets[d, 2]
                    if 0 <= zz < depth and 0 <= yy < height and 0 <= xx < width:
                        count += 1
    edges = np.empty(count, dtype=np.int32)
    step = np.empty(k, dtype=np.int64)
    for d in range(k):
        step[d] = (offsets[d, 0] * height + offsets[d, 1]) * width + offsets[d, 2]
    i = 0
    max_key = np.uint32(0)
    for z in range(depth):
        for y in range(height):
            for x in range(width):
                p = (z * height + y) * width + x
                for d in range(k):
                    zz, yy, xx = z + offsets[d, 0], y + offsets[d, 1], x + offsets[d, 2]
                    if 0 <= zz < depth and 0 <= yy < height and 0 <= xx < width:
                        edges[i] = (p << shift) | d
                        key = _edge_key3(flat, p, p + step[d])
                        if key > max_key:
                            max_key = key
                        i += 1
    return edges, max_key


@numba.njit(cache=True, nogil=True)
def _sort_edges3(
    flat: np.ndarray, edges: np.ndarray, step: np.ndarray, shift: int, max_key: np.uint32
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Stable LSD radix sort of ``edges`` by cost: (sorted edges, their uint32 keys).

    The keys are computed once, in edge-index order (memory-friendly: neighbours are close),
    then ping-pong between two (key, edge) buffers: four int32-sized arrays at the peak."""
    n = edges.shape[0]
    direction_mask = (1 << shift) - 1
    keys = np.empty(n, dtype=np.uint32)
    for i in range(n):
        e = edges[i]
        p = e >> shift
        keys[i] = _edge_key3(flat, p, p + step[e & direction_mask])
    sorted_keys, sorted_edges = _radix_sort_pairs(keys, edges, max_key)
    return sorted_edges, sorted_keys


@numba.njit(cache=True, nogil=True)
def _merge3(
    n_vox: int,
    order: np.ndarray,
    costs: np.ndarray,
    step: np.ndarray,
    shift: int,
    scale: float,
    min_size: int,
) -> np.ndarray:  # pragma: no cover - compiled
    """Greedy merging in increasing cost (``costs``: the sorted keys read as float32), then
    small-segment removal (as in 2D)."""
    direction_mask = (1 << shift) - 1
    forest = np.arange(n_vox, dtype=np.int32)
    size = np.ones(n_vox, dtype=np.int32)
    # Each root's merge threshold, internal difference + scale / size rounded to float32,
    # kept up to date at every union: one read per endpoint instead of two.
    threshold = np.full(n_vox, np.float32(scale), dtype=np.float32)
    # Edges refused by the merge test are moved, in order, to the front of ``order``: only
    # they can join two regions later (an edge inside one region stays inside), so the
    # small-segment pass reads them alone (in place: the write index never passes the read).
    refused = 0
    for i in range(order.shape[0]):
        e = order[i]
        a = e >> shift
        b = a + step[e & direction_mask]
        s0 = _find_root(forest, a)
        s1 = _find_root(forest, b)
        if s0 == s1:
            continue
        cost = costs[i]
        if cost < min(threshold[s0], threshold[s1]):
            root = _union(forest, size, s0, s1)
            threshold[root] = np.float32(np.float64(cost) + scale / size[root])
        else:
            order[refused] = e
            refused += 1
    _merge_small(forest, size, order, refused, step, shift, min_size)
    return _first_appearance_ids(forest, size)


def felzenszwalb_3d(
    volume: np.ndarray,
    scale: float = 100.0,
    sigma: float = 0.8,
    min_size: int = 50,
    spacing: tuple[float, float, float] | None = None,
    connectivity: int = 6,
    background_threshold: float | None = None,
) -> np.ndarray:
    """Felzenszwalb-Huttenlocher segmentation of a volume into supervoxels.

    The 2D algorithm of :func:`felzenszwalb` on the 3D grid: edges join 6- or 26-connected
    voxels, cost = ``|intensity difference|`` after Gaussian smoothing, merged greedily in
    increasing cost while the cost stays below both regions' internal difference +
    ``scale`` / size; regions below ``min_size`` voxels are then merged along their cheapest
    edges. Regions are connected and may span slices.

    Args:
        volume: (D, H, W) float volume normalised to [0, 1] (as LRCDataModule stores it:
            LPS (z, y, x)).
        scale: higher means fewer, larger supervoxels (as in 2D, divided by 255).
        sigma: Gaussian smoothing width in voxels of the finest axis; with ``spacing`` each
            axis gets ``sigma * min(spacing) / spacing[axis]`` voxels, i.e. the same width in
            millimetres (thick slices are smoothed less across slices).
        min_size: the smallest supervoxel, in voxels.
        spacing: (z, y, x) voxel spacing in mm; None treats voxels as cubes.
        connectivity: 6 (faces) or 26 (faces, edges, corners; 13 edges per voxel instead
            of 3: about 4x the time and memory).
        background_threshold: regions whose mean intensity is below it get -1
            (:func:`suppress_background`).

    Returns:
        (D, H, W) int32 ids 0..K-1 in order of first voxel in raster order (-1: suppressed).

    Raises:
        ValueError: not a 3D finite float volume, a bad parameter, or too many voxels for
            int32 edge indices.

    Memory: the float32 volume and its smoothed copy, four 4-byte arrays of edges while
    sorting (3 edges per voxel with 6-connectivity, 13 with 26) and three per-voxel arrays
    of the union-find: about 60 bytes per voxel with 6-connectivity
    (``benchmarks/supervoxels.py`` measures it).
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D (D, H, W), got shape {volume.shape}")
    if not np.issubdtype(volume.dtype, np.floating):
        raise TypeError(
            f"volume must be float, normalised to [0, 1] (got dtype {volume.dtype}); "
            "normalise it first (lrc_lightning.data.intensity)"
        )
    offsets = _neighbour_offsets(connectivity)
    shift = 2 if connectivity == 6 else 4
    if (volume.size << shift) >= 2**31:
        raise ValueError(
            f"{volume.shape} has too many voxels for int32 edge indices with "
            f"{connectivity}-connectivity; crop or resample the volume"
        )
    if not np.all(np.isfinite(volume)):
        raise ValueError("volume contains NaN or inf values")
    if scale <= 0 or sigma < 0 or min_size < 0:
        raise ValueError(
            f"need scale > 0, sigma >= 0, min_size >= 0; got {scale}, {sigma}, {min_size}"
        )
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise ValueError(f"spacing must be three positive numbers (z, y, x), got {spacing}")
    data = np.ascontiguousarray(volume, dtype=np.float32)
    if sigma > 0:
        from scipy.ndimage import gaussian_filter

        finest = min(spacing) if spacing is not None else 1.0
        sigmas = [sigma * finest / s for s in spacing] if spacing is not None else sigma
        data = gaussian_filter(data, sigma=sigmas, mode="reflect", truncate=4.0)
    flat = data.ravel()
    shape = np.array(data.shape, dtype=np.int64)
    edges, max_key = _edges3(flat, shape, offsets, shift)
    _, h, w = data.shape
    step = ((offsets[:, 0] * h + offsets[:, 1]) * w + offsets[:, 2]).astype(np.int64)
    order, keys = _sort_edges3(flat, edges, step, shift, max_key)
    del edges
    costs = keys.view(np.float32)  # the keys are the float32 costs' bit patterns
    labels = _merge3(flat.shape[0], order, costs, step, shift, float(scale) / 255.0, int(min_size))
    labels = labels.reshape(data.shape)
    if background_threshold is not None:
        labels = suppress_background(labels, volume, background_threshold)
    return labels


def grid_regions(
    image: np.ndarray, cell: int, background_threshold: float | None = None
) -> np.ndarray:
    """Square (cubic in 3D) regions of side ``cell`` on a fixed grid, in place of
    Felzenszwalb's: the ablation that asks whether LRC needs regions that follow anatomy
    or only regions that are local (same id = same place of the original image).

    Args:
        image: (H, W) slice or (D, H, W) volume (only its shape is used, and its
            intensities with ``background_threshold``).
        cell: side of a region in pixels (voxels); the last row and column of cells may be
            smaller.
        background_threshold: as :func:`felzenszwalb`: cells darker on average get id -1.

    Returns:
        int32 map of ``image``'s shape, ids 0..K-1 row-major (-1: suppressed).

    Raises:
        ValueError: ``cell`` < 1 or an image that is not 2D or 3D.

    Example:
        >>> import numpy as np
        >>> grid_regions(np.zeros((3, 5)), cell=2).tolist()
        [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]]
    """
    if cell < 1:
        raise ValueError(f"grid cell must be >= 1 pixel, got {cell}")
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"grid_regions takes a 2D or 3D image, got shape {image.shape}")
    counts = [-(-n // cell) for n in image.shape]
    ids = np.zeros(image.shape, dtype=np.int32)
    stride = 1
    for axis in reversed(range(image.ndim)):
        index = (np.arange(image.shape[axis]) // cell).astype(np.int32)
        shape = [1] * image.ndim
        shape[axis] = -1
        ids += index.reshape(shape) * stride
        stride *= counts[axis]
    if background_threshold is not None:
        ids = suppress_background(ids, image, background_threshold)
    return ids
