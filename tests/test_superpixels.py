"""Fast Felzenszwalb against skimage on real slices, and its helpers."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.segmentation import felzenszwalb as sk_felzenszwalb
from sklearn.metrics import adjusted_rand_score

from lrc_lightning.superpixels.graph import (
    IGNORE_INDEX,
    _gaussian_weights,
    _smooth_rows_cols,
    felzenszwalb,
    felzenszwalb_volume,
    suppress_background,
)

from .conftest import shared_path


@pytest.mark.parametrize("params", [(100, 0.8, 50), (30, 0.5, 20), (300, 1.2, 100)])
def test_same_segmentation_as_skimage_on_mr(mr_slices: np.ndarray, params) -> None:
    scale, sigma, min_size = params
    for image in mr_slices:
        ours = felzenszwalb(image, scale, sigma, min_size)
        ref = sk_felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size)
        assert ours.dtype == np.int32
        assert adjusted_rand_score(ref.ravel(), ours.ravel()) >= 0.99
        assert set(np.unique(ours)) == set(range(int(ours.max()) + 1))


def test_same_segmentation_as_skimage_on_dicom_ct() -> None:
    import SimpleITK as sitk

    folder = shared_path("totalseg-example", "example_ct_dicom")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    hu = sitk.GetArrayFromImage(reader.Execute()).astype(np.float32)
    for z in (3, 12):
        image = np.clip((hu[z] + 175) / 425, 0, 1)
        ours = felzenszwalb(image)
        ref = sk_felzenszwalb(image, scale=100, sigma=0.8, min_size=50)
        assert ours.shape == (512, 512)
        assert ours.max() + 1 > 100  # more than a uint8 could hold once in a while
        assert adjusted_rand_score(ref.ravel(), ours.ravel()) >= 0.99


def test_smoothing_is_bitwise_scipy() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(0)
    image = rng.random((37, 23))
    for sigma in (0.5, 0.8, 2.0, 7.0):
        ours = _smooth_rows_cols(image, _gaussian_weights(sigma))
        assert np.array_equal(ours, ndimage.gaussian_filter(image, sigma, mode="reflect"))


def test_spec_default_region_count_on_chaos_case_1(mr_volume: np.ndarray) -> None:
    # LRC_SPEC: scale=100, sigma=0.8, min_size=50 gives ~50-150 regions per abdominal slice.
    counts = [int(felzenszwalb(s).max()) + 1 for s in mr_volume[8:30:4]]
    assert all(20 <= c <= 200 for c in counts), counts


def test_constant_image_is_one_region() -> None:
    assert np.all(felzenszwalb(np.full((32, 40), 0.3, np.float32)) == 0)


def test_background_suppression() -> None:
    image = np.zeros((40, 40), np.float32)
    image[10:30, 10:30] = 0.8
    image[12:18, 12:18] = 0.4
    labels = felzenszwalb(image, scale=10, sigma=0.0, min_size=5, background_threshold=0.1)
    assert np.all(labels[0:5, 0:5] == IGNORE_INDEX)
    inside = labels[10:30, 10:30]
    assert inside.min() == 0 and len(np.unique(inside)) == 2
    # ids stay contiguous after suppression
    assert set(np.unique(labels[labels >= 0])) == set(range(int(labels.max()) + 1))
    assert np.array_equal(suppress_background(labels, image, 0.1), labels)


def test_volume_helper_matches_per_slice_and_runs_in_processes(mr_volume: np.ndarray) -> None:
    vol = mr_volume[10:14]
    ticks: list[int] = []
    par = felzenszwalb_volume(vol, processes=2, progress=ticks.append, scale=50)
    seq = felzenszwalb_volume(vol, processes=1, scale=50)
    assert np.array_equal(par, seq) and len(ticks) == 4
    assert np.array_equal(seq[2], felzenszwalb(vol[2], scale=50))
    along_w = felzenszwalb_volume(vol, axis=2, scale=50)
    assert np.array_equal(
        along_w[:, :, 5], felzenszwalb(np.ascontiguousarray(vol[:, :, 5]), scale=50)
    )


@pytest.mark.parametrize(
    "image, error, match",
    [
        (np.zeros((4, 4, 4), np.float32), ValueError, "2D"),
        (np.zeros((1, 8), np.float32), ValueError, "2x2"),
        (np.zeros((8, 8), np.int16), TypeError, "float"),
        (np.full((8, 8), np.nan, np.float32), ValueError, "NaN"),
    ],
)
def test_bad_images(image, error, match) -> None:
    with pytest.raises(error, match=match):
        felzenszwalb(image)


def test_bad_parameters() -> None:
    image = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match="scale"):
        felzenszwalb(image, scale=0)
    with pytest.raises(ValueError, match="sigma"):
        felzenszwalb(image, sigma=-1)
    with pytest.raises(ValueError, match="3D"):
        felzenszwalb_volume(image)
