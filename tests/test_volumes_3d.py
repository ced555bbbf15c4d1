"""LRC on volumes: 3D views keep supervoxels aligned, the data module serves 3D patches from
real volumes, UNet3d pre-trains with MoCo + LRC and fine-tunes with sliding windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from lrc_lightning import LocalizedRegionContrastLoss, LRCCallback, LRCDataModule
from lrc_lightning.data import DataError, PreprocessConfig
from lrc_lightning.data.patches import (
    VolumeAugment,
    random_affine_3d,
    relabel_patch,
    warp_volume,
)
from lrc_lightning.data.preprocess import supervoxels_of_volume
from lrc_lightning.data.warping import warp_ids_nearest
from lrc_lightning.evaluation.image_logging import SuperpixelViewLogger
from lrc_lightning.models import FineTuneSegmentation, MoCoV2LRC, UNet3d
from lrc_lightning.models.segmentation import sliding_window_logits

from .conftest import DEMO_CT, DEMO_MR
from .helpers import MetricHistory, trainer

PATCH = (8, 16, 16)


def test_supervoxels_stay_aligned_with_3d_views() -> None:
    torch.manual_seed(0)
    d, h, w = 12, 20, 20
    z, y, x = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    ids = (z * h + y) * w + x  # one id per voxel: its position can be read back from it
    # Trilinear warping of a linear ramp is exact; the ones channel marks voxels whose
    # eight trilinear neighbours all lie inside the input.
    image = torch.stack([z, y, x, torch.ones_like(z)]).float().unsqueeze(0)
    aug = VolumeAugment(crop_scale=(0.3, 0.9), flip=(0.5, 0.5, 0.5), max_rotation=15)
    for _ in range(10):
        theta = random_affine_3d(aug, (d, h, w)).unsqueeze(0)
        warped, maps = warp_volume(theta, image, {"superpixels": ids[None], "label": ids[None] % 3},
                                   (d, h, w))  # fmt: skip
        sp, (rz, ry, rx, inside) = maps["superpixels"][0], warped[0]
        interior = (sp >= 0) & (inside > 1 - 1e-5)
        assert interior.float().mean() > 0.3
        # The nearest-neighbour id sits within half a voxel of the trilinear position.
        for read, ramp in ((sp // (h * w), rz), (sp // w % h, ry), (sp % w, rx)):
            assert (read[interior].float() - ramp[interior]).abs().max() <= 0.5 + 1e-4
        assert torch.equal(maps["label"][0][interior], sp[interior] % 3)
        assert (sp[inside == 0] == -1).all()  # outside the volume: -1, never a real id


def _data(tmp_path: Path, **kwargs) -> LRCDataModule:
    return LRCDataModule(str(DEMO_MR), cache_dir=str(tmp_path / "cache"), image_size=32,
                         spatial_dims=3, patch_size=PATCH, batch_size=2, test_cases=1,
                         val_cases=1, seed=0, **kwargs)  # fmt: skip


def test_data_module_serves_3d_paired_patches_with_cached_supervoxels(tmp_path) -> None:
    data = _data(tmp_path)
    data.prepare_data()
    data.setup("fit")
    volume = data.volumes(data.split.pool)[0]
    assert volume.meta["regions_per_slice"]["min"] == int(volume.superpixels.max()) + 1
    # Supervoxels span slices: some id occurs on more than one slice.
    sv = np.asarray(volume.superpixels)
    spans = [np.unique(np.nonzero(sv == r)[0]).size for r in range(0, int(sv.max()) + 1, 7)]
    assert max(spans) > 1
    batch = next(iter(data.train_dataloader()))
    assert batch["image_v1"].shape == (2, 1, *PATCH) and batch["superpixels_v2"].shape == (
        2,
        *PATCH,
    )
    ids = [[set(batch[f"superpixels_{v}"][i].unique().tolist()) for v in ("v1", "v2")]
           for i in range(2)]  # fmt: skip
    shared = [(a & b) - {-1} for a, b in ids]
    assert all(len(s) >= 2 for s in shared)  # the views overlap in several supervoxels
    assert data.example_input().shape == (2, 1, *PATCH)
    # A 2D cache of the same data is another entry (keys differ), and 2D keys are unchanged.
    flat = LRCDataModule(str(DEMO_MR), cache_dir=str(tmp_path / "cache"), image_size=32)
    case = data.cases()[0]
    assert flat.cache.key(case) != data.cache.key(case)
    with pytest.raises(ValueError, match="device_batches"):
        _data(tmp_path, device_batches=True)


def test_unet3d_moco_lrc_pretrains_and_the_callback_takes_3d_layers(tmp_path) -> None:
    pl.seed_everything(0)
    model = MoCoV2LRC(UNet3d(width=4, depth=2), queue_size=16)
    history = MetricHistory("train/lrc_loss_step")
    views = SuperpixelViewLogger(every_n_steps=1)  # logs the patches' middle slices
    trainer(max_steps=3, callbacks=[history, views]).fit(model, _data(tmp_path))
    assert len(history.history["train/lrc_loss_step"]) == 3
    assert all(v > 0 for v in history.history["train/lrc_loss_step"])

    class Reconstruction(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = UNet3d(width=4, depth=2)
            self.out = torch.nn.Conv3d(4, 1, 1)

        def forward(self, x):
            return self.out(self.net(x))

        def training_step(self, batch, batch_idx):
            return (self(batch["image_v1"]) - batch["image_v1"]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    cb, history = LRCCallback(feature_layer="net.decoders.1"), MetricHistory("train/lrc_loss_step")
    trainer(max_steps=2, callbacks=[cb, history]).fit(Reconstruction(), _data(tmp_path))
    assert cb.head.in_channels == 4 and len(history.history["train/lrc_loss_step"]) == 2


def test_3d_fine_tuning_and_sliding_window_evaluation(tmp_path) -> None:
    conv = torch.nn.Conv3d(1, 3, 3, padding=1)
    x = torch.randn(1, 1, 11, 19, 21)
    # A sliding window over overlapping patches equals the whole forward away from the
    # patch borders' zero padding; with 1x1x1 convolutions, everywhere.
    point = torch.nn.Conv3d(1, 3, 1)
    assert torch.allclose(sliding_window_logits(point, x, PATCH), point(x), atol=1e-6)
    assert sliding_window_logits(conv, x, PATCH).shape == (1, 3, 11, 19, 21)
    data = _data(tmp_path, mode="finetune", labelled_cases=1)
    model = FineTuneSegmentation(UNet3d(width=4, depth=2), num_classes=5, eval_patch_size=PATCH)
    fit = trainer(max_steps=2, num_sanity_val_steps=0)
    fit.fit(model, data)
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (2, 1, *PATCH) and batch["label"].shape == (2, *PATCH)
    assert (batch["label"] > 0).any()  # centred on organs half of the time
    (result,) = fit.validate(model, data, verbose=False)
    assert set(result) >= {"val/dice_mean", "val/dice_class_1"}
    volume = data.volumes(data.split.val)[0]
    assert (
        model.predict_volume(
            torch.from_numpy(np.asarray(volume.image, dtype=np.float32)).unsqueeze(1)
        ).shape
        == volume.image.shape
    )
    with pytest.raises(ValueError, match="eval_patch_size"):
        FineTuneSegmentation(UNet3d(width=4, depth=2), num_classes=5)


def test_slice_spacing_resamples_through_the_slices(tmp_path) -> None:
    """CHAOS T2 has 7.7 mm slices: slice_spacing=3.85 doubles them (labels nearest)."""
    plain, finer = _data(tmp_path), _data(tmp_path, slice_spacing=3.85)
    for data in (plain, finer):
        data.prepare_data()
        data.setup("fit")
    case = plain.split.pool[0]
    before, after = plain.volumes([case])[0], finer.volumes([case])[0]
    assert after.image.shape[0] == round(before.image.shape[0] * before.meta["spacing"][0] / 3.85)
    assert after.meta["spacing"][0] == pytest.approx(3.85, rel=0.02)
    assert after.image.shape[1:] == before.image.shape[1:]
    assert set(np.unique(after.label)) <= set(np.unique(before.label))
    assert int(after.superpixels.max()) >= 1
    with pytest.raises(ValueError, match="slice_spacing"):
        _data(tmp_path, slice_spacing=0.0)


def test_parallel_supervoxel_precompute_matches_serial_and_errors_name_the_file(tmp_path) -> None:
    serial, parallel = _data(tmp_path / "a"), _data(tmp_path / "b", precompute_workers=2)
    for data in (serial, parallel):
        data.prepare_data()
        data.setup("fit")
    for a, b in zip(serial.volumes(serial.cases()), parallel.volumes(parallel.cases()),
                    strict=True):  # fmt: skip
        assert np.array_equal(a.superpixels, b.superpixels)
    # 2**29 voxels (refused before anything is allocated: the size is checked first).
    huge = np.broadcast_to(np.float32(0.5), (512, 1024, 1024))
    with pytest.raises(DataError, match=r"big\.nii\.gz: supervoxels: .*too many voxels"):
        supervoxels_of_volume(huge, [1.0, 1.0, 1.0], PreprocessConfig(), "big.nii.gz")


# ------------------------------------------------------------ ids, warps and proportions
def test_full_ct_with_fine_supervoxels_trains_on_small_patches(tmp_path) -> None:
    """The shipped CT with scale 20 / min size 10 holds more supervoxels (numbered over the
    volume) than an 8x16x16 patch has voxels (2048): patches carry their own numbering, so
    the loss's bound holds and MoCo + LRC trains on the real batches."""
    data = LRCDataModule(str(DEMO_CT), cache_dir=str(tmp_path / "cache"), spatial_dims=3,
                         patch_size=PATCH, batch_size=2, superpixel_scale=20,
                         superpixel_min_size=10, test_cases=0, val_cases=0, seed=0)  # fmt: skip
    data.prepare_data()
    data.setup("fit")
    volume = data.volumes(data.split.pool)[0]
    bound = int(np.prod(PATCH))
    assert int(volume.superpixels.max()) >= bound  # the volume's ids alone would not fit
    torch.manual_seed(0)
    loss_fn = LocalizedRegionContrastLoss(num_regions=8, samples_per_region=4, min_pixels=1)
    for _, batch in zip(range(4), data.train_dataloader(), strict=False):
        for view in ("v1", "v2"):
            ids = batch[f"superpixels_{view}"]
            assert ids.min() >= -1 and ids.max() < bound
        shared = set(batch["superpixels_v1"][0].unique().tolist())
        shared &= set(batch["superpixels_v2"][0].unique().tolist())
        assert len(shared - {-1}) >= 2  # the two views still name the same supervoxels
        features = torch.randn(2, 8, *PATCH)
        assert torch.isfinite(loss_fn(features, features.flip(-1), batch["superpixels_v1"],
                                      batch["superpixels_v2"]))  # fmt: skip
    pl.seed_everything(0)
    history = MetricHistory("train/lrc_loss_step")
    model = MoCoV2LRC(UNet3d(width=4, depth=2), queue_size=16)
    trainer(max_steps=2, callbacks=[history]).fit(model, data)
    assert len(history.history["train/lrc_loss_step"]) == 2
    assert all(v > 0 for v in history.history["train/lrc_loss_step"])
    # The volume's own numbering in a patch: refused with the bound and what to do, by the
    # loss and (on the first batch, wherever the maps are) by the model's LRC term.
    raw = torch.from_numpy(np.asarray(volume.superpixels[-8:, -16:, -16:], dtype=np.int64))
    assert int(raw.max()) >= bound
    image = torch.from_numpy(np.asarray(volume.image[-8:, -16:, -16:], dtype=np.float32))
    item = {"image_v1": image[None], "image_v2": image[None], "superpixels_v1": raw,
            "superpixels_v2": raw}  # fmt: skip
    loader = DataLoader([item, item], batch_size=2)
    batch = next(iter(loader))
    with pytest.raises(ValueError, match=r"superpixels_v1: super-pixel id \d+ is not below 2048"):
        loss_fn(features, features, batch["superpixels_v1"], batch["superpixels_v2"])
    with pytest.raises(ValueError, match=r"MoCoV2LRC\.lrc_loss: superpixels_v1: .*relabel_patch"):
        trainer(max_steps=1).fit(MoCoV2LRC(UNet3d(width=4, depth=2), queue_size=16), loader)


def test_relabel_patch_renames_supervoxels_one_to_one() -> None:
    ids = np.array([[[70000, 70000, -1], [5, 123456, 5]], [[-1, 9, 70000], [123456, 9, 5]]])
    out = relabel_patch(ids)
    assert out.tolist() == [[[2, 2, -1], [0, 3, 0]], [[-1, 1, 2], [3, 1, 0]]]
    assert relabel_patch(np.full((2, 2, 2), -1)).tolist() == np.full((2, 2, 2), -1).tolist()


def test_integer_maps_warp_exactly_above_two_to_the_24() -> None:
    """float32 holds integers up to 2**24 only: ids above it must not go through grid_sample."""
    torch.manual_seed(0)
    d, h, w = 6, 12, 12
    base = 2**24 + 1  # odd: float32 rounds it (and every other id of this map) to even
    ids = base + torch.arange(d * h * w).view(1, d, h, w)
    aug = VolumeAugment(crop_scale=(0.5, 0.9), flip=(0.5, 0.5, 0.5), max_rotation=15)
    for _ in range(5):
        theta = random_affine_3d(aug, (d, h, w)).unsqueeze(0)
        _, maps = warp_volume(theta, torch.zeros(1, 1, d, h, w), {"superpixels": ids}, (d, h, w))
        out = maps["superpixels"][0]
        inside = out >= 0
        assert inside.float().mean() > 0.3
        assert set(out[inside].unique().tolist()) <= set(ids.flatten().tolist())
        # The same voxels as grid_sample's nearest rule picks on small (exact) ids.
        grid = F.affine_grid(theta, [1, 1, d, h, w], align_corners=False)
        small = (ids - base + 1).float().unsqueeze(1)
        expected = F.grid_sample(small, grid, mode="nearest", align_corners=False)[:, 0]
        assert torch.equal(torch.where(inside, out - base + 1, 0), expected[0].long())
    # The helper is generic: 2D maps and grids too, with any fill outside.
    flat = base + torch.arange(64).view(1, 8, 8)
    theta2 = torch.tensor([[[0.0, -0.9, 0.2], [0.9, 0.0, 0.1]]])
    grid2 = F.affine_grid(theta2, [1, 1, 8, 8], align_corners=False)
    out2 = warp_ids_nearest(flat, grid2, fill=0)
    expected2 = F.grid_sample((flat - base + 1).float()[:, None], grid2, mode="nearest",
                              align_corners=False)[:, 0].long()  # fmt: skip
    assert torch.equal(torch.where(out2 > 0, out2 - base + 1, 0), expected2)


def _voxel_steps(size: tuple[int, int, int], aug: VolumeAugment) -> tuple[Tensor, Tensor]:
    """Where each output voxel reads in the input, in input voxels: one (y, x) step between
    neighbours along x and along y, over voxels whose trilinear neighbours are all inside."""
    d, h, w = size
    _, y, x = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack([y, x, torch.ones_like(y)]).float().unsqueeze(0)
    theta = random_affine_3d(aug, size).unsqueeze(0)
    ry, rx, inside = warp_volume(theta, image, {}, size)[0][0]
    keep_x = (inside[:, :, 1:] > 1 - 1e-5) & (inside[:, :, :-1] > 1 - 1e-5)
    keep_y = (inside[:, 1:] > 1 - 1e-5) & (inside[:, :-1] > 1 - 1e-5)
    along_x = torch.stack([ry.diff(dim=2)[keep_x], rx.diff(dim=2)[keep_x]], -1)
    along_y = torch.stack([ry.diff(dim=1)[keep_y], rx.diff(dim=1)[keep_y]], -1)
    return along_x, along_y


def test_rotations_keep_proportions_on_non_square_patches() -> None:
    """A rotation of a 32x64 (y, x) plane maps one output voxel step to one input voxel step
    (a rotation in voxel units), instead of stretching by the aspect ratio."""
    torch.manual_seed(0)
    size = (2, 32, 64)
    turns = VolumeAugment(crop_scale=(1.0, 1.0), flip=(0, 0, 0), quarter_turns=False,
                          max_rotation=90)  # fmt: skip
    for _ in range(6):
        along_x, along_y = _voxel_steps(size, turns)
        assert len(along_x) > 100 and len(along_y) > 100
        for steps in (along_x, along_y):
            torch.testing.assert_close(steps.norm(dim=-1), torch.ones(len(steps)), atol=1e-3,
                                       rtol=0)  # fmt: skip
        # Orthogonal steps: right angles survive, so do all distances.
        assert (along_x.mean(0) @ along_y.mean(0)).abs() < 1e-3
    # Quarter turns: a 32x32 plane turns by 90 degrees (x then reads along y); a 32x64 plane
    # only by half turns, which keep it whole (no voxel from outside the patch). Every turn
    # moves by one voxel per voxel.
    quarter = VolumeAugment(crop_scale=(1.0, 1.0), flip=(0, 0, 0), max_rotation=0)
    ids = torch.arange(2 * 32 * 64).view(1, *size)
    for plane, expected in (((2, 32, 32), {(0, 1), (1, 0), (0, -1), (-1, 0)}),
                            (size, {(0, 1), (0, -1)})):  # fmt: skip
        directions = set()
        for _ in range(16):
            along_x, along_y = _voxel_steps(plane, quarter)
            for steps in (along_x, along_y):
                torch.testing.assert_close(steps.norm(dim=-1), torch.ones(len(steps)),
                                           atol=1e-3, rtol=0)  # fmt: skip
            directions.add(tuple(along_x.mean(0).round().long().tolist()))
        assert directions == expected
    for _ in range(8):
        theta = random_affine_3d(quarter, size).unsqueeze(0)
        out = warp_volume(theta, torch.zeros(1, 1, *size), {"superpixels": ids}, size)[1]
        assert (out["superpixels"] >= 0).all()
