"""felzenszwalb_3d: exact against a slow reference, and its properties on a real CT."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from lrc_lightning.superpixels import felzenszwalb, felzenszwalb_3d

from .conftest import DEMO_CT


def reference_3d(volume: np.ndarray, scale: float, min_size: int, connectivity: int) -> np.ndarray:
    """Felzenszwalb on the voxel graph in plain Python (no smoothing: sigma=0)."""
    d, h, w = volume.shape
    flat = volume.astype(np.float32).ravel()
    steps = [(0, 0, 1), (0, 1, 0), (1, 0, 0)] if connectivity == 6 else [
        s for s in itertools.product((-1, 0, 1), repeat=3) if s > (0, 0, 0)]  # fmt: skip
    edges, costs = [], []
    for z, y, x in itertools.product(range(d), range(h), range(w)):
        p = (z * h + y) * w + x
        for dz, dy, dx in steps:
            if 0 <= z + dz < d and 0 <= y + dy < h and 0 <= x + dx < w:
                q = ((z + dz) * h + y + dy) * w + x + dx
                edges.append((p, q))
                costs.append(np.float32(abs(flat[p] - flat[q])))
    order = np.argsort(np.array(costs, dtype=np.float32), kind="stable")
    parent, size = list(range(flat.size)), [1] * flat.size
    inner = [np.float32(0)] * flat.size

    def find(a: int) -> int:
        while parent[a] != a:
            a = parent[a]
        return a

    def union(a: int, b: int) -> int:
        if size[a] < size[b]:
            a, b = b, a
        parent[b] = a
        size[a] += size[b]
        return a

    k = scale / 255.0
    for i in order:
        a, b = find(edges[i][0]), find(edges[i][1])
        threshold = min(np.float32(inner[a] + k / size[a]), np.float32(inner[b] + k / size[b]))
        if a != b and costs[i] < threshold:
            inner[union(a, b)] = costs[i]
    for i in order:
        a, b = find(edges[i][0]), find(edges[i][1])
        if a != b and (size[a] < min_size or size[b] < min_size):
            union(a, b)
    ids: dict[int, int] = {}
    return np.array([ids.setdefault(find(p), len(ids)) for p in range(flat.size)],
                    dtype=np.int32).reshape(d, h, w)  # fmt: skip


@pytest.fixture(scope="module")
def ct() -> tuple[np.ndarray, tuple[float, float, float]]:
    """The shipped real CT, abdomen window, (z, y, x) float32 in [0, 1], and its spacing."""
    image = sitk.ReadImage(str(DEMO_CT / "example_ct_sm.nii.gz"))
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    volume = np.clip((arr + 160.0) / 400.0, 0.0, 1.0)
    return volume, tuple(reversed(image.GetSpacing()))


@pytest.mark.parametrize("connectivity", [6, 26])
def test_matches_the_slow_reference_on_real_ct_crops(ct, connectivity: int) -> None:
    volume, _ = ct
    crop = volume[10:14, 40:49, 40:50]  # real tissue boundaries
    assert crop.std() > 0.05
    for scale, min_size in ((30.0, 3), (300.0, 10)):
        got = felzenszwalb_3d(crop, scale=scale, sigma=0.0, min_size=min_size,
                              connectivity=connectivity)  # fmt: skip
        expected = reference_3d(crop, scale, min_size, connectivity)
        assert np.array_equal(got, expected), (scale, min_size)


@pytest.mark.parametrize("connectivity", [6, 26])
def test_supervoxels_are_connected_large_enough_and_deterministic(ct, connectivity: int) -> None:
    volume, spacing = ct
    part = volume[:, 20:80, 20:80]
    labels = felzenszwalb_3d(part, scale=200, sigma=0.8, min_size=40, spacing=spacing,
                             connectivity=connectivity)  # fmt: skip
    assert labels.dtype == np.int32 and labels.shape == part.shape
    counts = np.bincount(labels.ravel())
    assert labels.min() == 0 and (counts > 0).all()  # ids 0..K-1, none empty
    assert counts.min() >= 40 and len(counts) > 5
    structure = ndimage.generate_binary_structure(3, 1 if connectivity == 6 else 3)
    for region in range(len(counts)):
        _, pieces = ndimage.label(labels == region, structure=structure)
        assert pieces == 1, region
    assert np.array_equal(
        labels,
        felzenszwalb_3d(
            part, scale=200, sigma=0.8, min_size=40, spacing=spacing, connectivity=connectivity
        ),
    )
    # Supervoxels span slices; the per-slice 2D segmentation cannot.
    spans = [np.unique(np.nonzero(labels == r)[0]).size for r in range(len(counts))]
    assert max(spans) > 1


def test_background_spacing_and_errors(ct) -> None:
    volume, _ = ct
    part = volume[:, 20:80, 20:80]
    labels = felzenszwalb_3d(part, scale=200, min_size=40, background_threshold=0.1)
    assert (labels == -1).any() and labels.max() >= 0
    assert part[labels == -1].mean() < 0.1 < part[labels >= 0].mean()
    # Thick slices: the same sigma in mm smooths less across slices than in-plane voxels do.
    anisotropic = felzenszwalb_3d(part, scale=200, min_size=40, spacing=(5.0, 1.0, 1.0))
    assert not np.array_equal(anisotropic, felzenszwalb_3d(part, scale=200, min_size=40))
    # One slice: the same graph as 2D, the same 8- vs 4-neighbourhood aside.
    one = felzenszwalb_3d(part[:1], scale=200, sigma=0.0, min_size=40)
    assert one.shape == (1, 60, 60) and len(np.unique(one)) > 1
    assert felzenszwalb(part[0], scale=200, sigma=0.0, min_size=40).shape == (60, 60)
    with pytest.raises(ValueError, match="3D"):
        felzenszwalb_3d(part[0])
    with pytest.raises(TypeError, match="normalise"):
        felzenszwalb_3d((part * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        felzenszwalb_3d(np.where(part > 0.5, np.nan, part))
    with pytest.raises(ValueError, match="connectivity"):
        felzenszwalb_3d(part, connectivity=18)
    with pytest.raises(ValueError, match="spacing"):
        felzenszwalb_3d(part, spacing=(1.0, 0.0, 1.0))
