"""LRC with MONAI: dictionary transforms in CacheDataset / PersistentDataset on the real demo
volumes, MONAI networks as backbones of the reference models, MONAI's Dice conventions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

monai = pytest.importorskip("monai")

from monai.data import CacheDataset, DataLoader, PersistentDataset  # noqa: E402
from monai.metrics import DiceMetric  # noqa: E402
from monai.networks.nets import BasicUNet, SwinUNETR, UNet  # noqa: E402
from monai.transforms import (  # noqa: E402
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    RandSpatialCropd,
    Resized,
    ScaleIntensityRangePercentilesd,
    SqueezeDimd,
)

from lrc_lightning.data.transforms import GeometryAugment, IntensityAugment  # noqa: E402
from lrc_lightning.frameworks.monai import MonaiBackbone, PairedViewsd, Superpixelsd  # noqa: E402
from lrc_lightning.models import FineTuneSegmentation, MoCoV2LRC  # noqa: E402
from lrc_lightning.models.metrics import dice_per_organ  # noqa: E402
from lrc_lightning.superpixels import felzenszwalb  # noqa: E402

from .conftest import DEMO_MR  # noqa: E402

FILES = [{"image": str(p)} for p in sorted((DEMO_MR / "imagesTr").glob("*.nii.gz"))[:2]]


def _volume_steps() -> list:
    return [
        LoadImaged(keys="image", image_only=True),
        EnsureChannelFirstd(keys="image"),
        ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True),
        Resized(keys="image", spatial_size=(64, 64, -1)),
        Superpixelsd(keys="image", scale=20, min_size=8),
    ]


def _slice_steps() -> list:
    return [
        RandSpatialCropd(keys=["image", "superpixels"], roi_size=(-1, -1, 1), random_size=False),
        SqueezeDimd(keys=["image", "superpixels"], dim=-1),
    ]


def test_cache_dataset_pipeline_gives_plain_paired_views_for_moco_lrc() -> None:
    # MONAI's DataLoader (no workers) reseeds the transforms from torch's global generator,
    # so the draw would depend on the tests that ran before: fix it here.
    torch.manual_seed(0)
    transform = Compose([*_volume_steps(), *_slice_steps(), PairedViewsd()]).set_random_state(0)
    dataset = CacheDataset(FILES, transform, progress=False)
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert set(batch) == {"image_v1", "image_v2", "superpixels_v1", "superpixels_v2"}
    for key in batch:
        assert type(batch[key]) is torch.Tensor  # no MetaTensor reaches MoCo's queue
    assert batch["image_v1"].shape == (2, 1, 64, 64) and batch["superpixels_v1"].dtype == torch.long
    maps = batch["superpixels_v1"]
    assert (maps == -1).any() and (maps >= 0).any()  # outside the crop: -1, never id 0
    model = MoCoV2LRC(MonaiBackbone(BasicUNet(2, 1, 2, features=(8, 8, 16, 32, 64, 8))),
                      queue_size=16)  # fmt: skip
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.requires_grad


def test_paired_views_move_image_and_map_together_and_follow_the_random_state() -> None:
    volume = Compose(_volume_steps())(FILES[0])
    image = volume["image"][..., 20].as_tensor()
    maps = volume["superpixels"][0, ..., 20]
    assert torch.equal(maps, torch.from_numpy(felzenszwalb(image[0].numpy(), scale=20,
                                                            min_size=8)).long())  # fmt: skip
    flip = GeometryAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), horizontal_flip=1.0,
                           max_rotation=0.0)  # fmt: skip
    still = IntensityAugment(0.0, 0.0, (1.0, 1.0), 0.0, 0.0)
    out = PairedViewsd(geometry=flip, intensity=still)({"image": image, "superpixels": maps})
    assert torch.equal(out["superpixels_v1"], maps.flip(-1))
    assert torch.allclose(out["image_v1"], image.flip(-1), atol=1e-5)
    views = [PairedViewsd().set_random_state(7)({"image": image, "superpixels": maps})
             for _ in range(2)]  # fmt: skip
    assert torch.equal(views[0]["superpixels_v2"], views[1]["superpixels_v2"])
    with pytest.raises(ValueError, match=r"channel-first \(C, H, W\) or \(C, H, W, D\)"):
        Superpixelsd(keys="image")({"image": image[0]})
    with pytest.raises(ValueError, match="one image key"):
        Superpixelsd(keys=["image", "label"])
    with pytest.raises(ValueError, match=r"\(1, H, W\).*RandSpatialCropd"):
        PairedViewsd()({"image": volume["image"], "superpixels": volume["superpixels"]})


def test_persistent_dataset_caches_the_super_pixels(tmp_path) -> None:
    dataset = PersistentDataset(FILES[:1], Compose(_volume_steps()), cache_dir=tmp_path)
    first = dataset[0]["superpixels"]
    assert any(tmp_path.iterdir())  # written to disk
    again = PersistentDataset(FILES[:1], Compose(_volume_steps()), cache_dir=tmp_path)[0]
    assert torch.equal(first, again["superpixels"]) and first.shape == (1, 64, 64, 37)


@pytest.mark.parametrize(
    "network",
    [
        lambda: BasicUNet(2, 1, 3, features=(8, 8, 16, 32, 64, 8)),
        lambda: UNet(2, 1, 3, channels=(8, 16, 32), strides=(2, 2)),
        lambda: SwinUNETR(spatial_dims=2, in_channels=1, out_channels=3, feature_size=12),
    ],
    ids=["BasicUNet", "UNet", "SwinUNETR"],
)
def test_monai_networks_feed_a_decoder_level_to_lrc_not_the_segmentation_output(network) -> None:
    torch.manual_seed(0)
    backbone = MonaiBackbone(network())
    model = MoCoV2LRC(backbone, queue_size=16)
    assert model.lrc_head.in_channels == backbone.decoder_channels[-1]
    images = torch.rand(2, 1, 64, 64)
    maps = torch.arange(16).repeat_interleave(4).view(8, 8).repeat_interleave(8, 0)[:, :64]
    maps = maps.repeat(1, 8)[:64, :64].expand(2, 64, 64).contiguous()
    batch = {"image_v1": images, "image_v2": images.flip(-1),
             "superpixels_v1": maps, "superpixels_v2": maps.flip(-1)}  # fmt: skip
    model.training_step(batch, 0).backward()
    output_layer = {"BasicUNet": "final_conv", "UNet": "model.2", "SwinUNETR": "out"}
    name = output_layer[type(backbone.network).__name__]
    grads = [p.grad for p in backbone.network.get_submodule(name).parameters()]
    assert all(g is None or not g.any() for g in grads)  # the logits take no part
    decoder = backbone.network.get_submodule(backbone.decoder_layers[-1])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())
    segmenter = FineTuneSegmentation(MonaiBackbone(network()), num_classes=3)
    assert segmenter(images).shape == (2, 3, 64, 64)


def test_monai_errors_name_the_arguments() -> None:
    with pytest.raises(ValueError, match=r"MonaiBackbone\(BasicUNet.*global_channels"):
        MoCoV2LRC(BasicUNet(2, 1, 2, features=(8, 8, 16, 32, 64, 8)), queue_size=16)
    with pytest.warns(UserWarning, match="segmentation output feeds the global branch"):
        MoCoV2LRC(BasicUNet(2, 1, 2, features=(8, 8, 16, 32, 64, 8)), global_channels=2,
                  lrc_feature_channels=2, queue_size=16)  # fmt: skip
    odd = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.raises(
        ValueError, match=r"(?s)bottleneck_layer=.*decoder_layers=.*\(2, 4, 64, 64\)"
    ):
        MonaiBackbone(odd)
    with pytest.raises(ValueError, match=r"no layer\(s\) \['up'\]"):
        MonaiBackbone(odd, bottleneck_layer="1", decoder_layers=["up"])


@pytest.mark.parametrize(("ours", "ignore_empty"), [("ignore", True), ("one", False)])
def test_dice_matches_monai_dice_metric_including_empty_organs(ours, ignore_empty) -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (6, 8, 8), generator=g)
    prediction = torch.randint(0, 3, (6, 8, 8), generator=g)
    target[0][target[0] == 2] = 0  # organ 2 absent, predicted
    target[1][target[1] == 1] = 0
    prediction[1][prediction[1] == 1] = 0  # organ 1 absent from both
    one_hot = lambda x: torch.nn.functional.one_hot(x, 3).permute(0, 3, 1, 2)  # noqa: E731
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=ignore_empty)
    expected = metric(one_hot(prediction), one_hot(target))
    got = dice_per_organ(prediction, target, 3, empty_organ=ours)
    assert torch.allclose(got, expected.to(got.dtype), equal_nan=True)
    default = dice_per_organ(prediction, target, 3)
    assert default[0, 1] == 0 and default[1, 0].isnan()  # ours differs on empty organs
    assert not torch.allclose(default, expected.to(got.dtype), equal_nan=True)


def test_monai_3d_network_pretrains_on_ct_volumes_with_the_callback(tmp_path) -> None:
    """The issue's done-when: a MONAI 3D network in the user's own module, LRC from the
    callback, on CT volumes with supervoxels."""
    import copy

    import pytorch_lightning as pl

    from lrc_lightning import LRCCallback, LRCDataModule
    from lrc_lightning.objective.term import lrc_term

    from .conftest import DEMO_CT
    from .helpers import MetricHistory, trainer

    class Denoise3d(pl.LightningModule):  # the user's module, unaware of LRC
        def __init__(self) -> None:
            super().__init__()
            self.net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=1,
                                 features=(4, 4, 8, 16, 32, 4))  # fmt: skip

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x = batch["image_v1"]
            return (self(x + 0.05 * torch.randn_like(x)) - x).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    data = LRCDataModule([str(DEMO_CT / "example_ct_sm.nii.gz")], cache_dir=str(tmp_path),
                         modality="ct", image_size=64, spatial_dims=3, patch_size=(16, 32, 32),
                         batch_size=2, superpixel_scale=50, superpixel_min_size=20)  # fmt: skip
    cb = LRCCallback(feature_layer="net.upcat_1")
    history = MetricHistory("train/lrc_loss_step")
    with pytest.warns(UserWarning, match=r"neither view.*does not guess.*forwards view 1"):
        trainer(max_steps=2, callbacks=[cb, history]).fit(Denoise3d(), data)
    # The step runs the network on a noisy view 1 only: that output is no view's, so the
    # callback forwards both views itself at each step instead of taking it for view 1.
    assert cb.head.in_channels == 4 and cb.extra_forwards == 4
    assert len(history.history["train/lrc_loss_step"]) == 2

    # The term of one step is that of the two clean views' features, not of the noisy one.
    batch = next(iter(data.train_dataloader()))
    torch.manual_seed(0)
    model = Denoise3d()
    plain = copy.deepcopy(model)
    cb.setup(trainer(max_steps=1, callbacks=[cb]), model, "fit")
    torch.manual_seed(3)
    out = model.training_step(batch, 0)
    torch.manual_seed(3)
    added = out - plain.training_step(batch, 0)
    features: list[torch.Tensor] = []
    handle = model.net.upcat_1.register_forward_hook(lambda m, i, o: features.append(o))
    x1, x2 = batch["image_v1"], batch["image_v2"]
    model(x1), model(x2), model(x1 + 0.05 * torch.randn_like(x1))
    handle.remove()
    s1, s2 = batch["superpixels_v1"], batch["superpixels_v2"]
    terms = []
    for f1 in (features[0], features[2]):  # view 1 clean (right), view 1 noisy (the guess)
        torch.manual_seed(3)
        torch.randn_like(x1)  # the step's noise, drawn before the term's sampling
        terms.append(cb.config.weight * lrc_term(model.lrc_head, cb.criterion, f1, features[1],
                                                 s1, s2).item())  # fmt: skip
    assert added.item() == pytest.approx(terms[0], rel=1e-5, abs=1e-6)
    # The noise is small (0.05): the guess is close, but 50x farther than the tolerance.
    assert abs(added.item() - terms[1]) > 5e-5 * abs(terms[0])
    cb.teardown(None, model, "fit")
    backbone = MonaiBackbone(BasicUNet(spatial_dims=3, in_channels=1, out_channels=2,
                                       features=(4, 4, 8, 16, 32, 4)),
                             spatial_dims=3, example_size=32)  # fmt: skip
    assert backbone.decoder_layers[-1] == "upcat_1" and backbone.decoder_channels[-1] == 4


def test_a_3d_monai_backbone_gets_a_3d_segmentation_head() -> None:
    # MonaiBackbone(spatial_dims=3) once gave FineTuneSegmentation a Conv2d head (5D input
    # error); with or without the hidden layer the head now follows the backbone's dims.
    network = BasicUNet(spatial_dims=3, in_channels=1, out_channels=4,
                        features=(4, 4, 8, 16, 32, 4))  # fmt: skip
    backbone = MonaiBackbone(network, spatial_dims=3, example_size=32)
    for channels in (0, 8):
        model = FineTuneSegmentation(backbone, num_classes=3, head_channels=channels,
                                     eval_patch_size=(16, 32, 32))  # fmt: skip
        assert model(torch.randn(1, 1, 16, 32, 32)).shape == (1, 3, 16, 32, 32)
