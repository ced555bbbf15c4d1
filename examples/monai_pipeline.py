"""A MONAI pipeline and a MONAI network, pre-trained with MoCo v2 + LRC.

    python examples/monai_pipeline.py [--data data/chaos-t2-demo] [--steps 20]

The data side is a plain MONAI ``CacheDataset``: volumes are loaded, normalised, resized
and segmented into super-pixels once (``Superpixelsd``, cached); every epoch a random axial
slice is cropped and ``PairedViewsd`` makes the two augmented views with their maps (-1
outside the image, plain tensors). The network is MONAI's ``BasicUNet``; ``MonaiBackbone``
gives its bottleneck to MoCo and its finest decoder level to LRC.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytorch_lightning as pl
from monai.data import CacheDataset, DataLoader
from monai.networks.nets import BasicUNet
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    RandSpatialCropd,
    Resized,
    ScaleIntensityRangePercentilesd,
    SqueezeDimd,
)

from lrc_lightning import LRCConfig
from lrc_lightning.models import MoCoV2LRC
from lrc_lightning.monai import MonaiBackbone, PairedViewsd, Superpixelsd


def pipeline(size: int) -> Compose:
    return Compose([
        LoadImaged(keys="image", image_only=True),
        EnsureChannelFirstd(keys="image"),
        ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True),
        Resized(keys="image", spatial_size=(size, size, -1)),
        Superpixelsd(keys="image", scale=100, min_size=50),  # cached with the volume
        RandSpatialCropd(keys=["image", "superpixels"], roi_size=(-1, -1, 1), random_size=False),
        SqueezeDimd(keys=["image", "superpixels"], dim=-1),  # one axial slice
        PairedViewsd(),  # image_v1, image_v2, superpixels_v1, superpixels_v2
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/chaos-t2-demo")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    files = [{"image": str(p)} for p in sorted(Path(args.data, "imagesTr").glob("*.nii.gz"))]
    dataset = CacheDataset(files, pipeline(args.size).set_random_state(0), progress=False)
    loader = DataLoader(dataset, batch_size=min(4, len(files)), shuffle=True, drop_last=True)
    network = BasicUNet(spatial_dims=2, in_channels=1, out_channels=5,
                        features=(16, 16, 32, 64, 128, 16))  # fmt: skip
    model = MoCoV2LRC(MonaiBackbone(network), lrc=LRCConfig(weight=0.3), queue_size=256,
                      key_bn_groups=1)  # fmt: skip
    trainer = pl.Trainer(max_steps=args.steps, accelerator="auto", devices=1, logger=False,
                         enable_checkpointing=False, log_every_n_steps=1)  # fmt: skip
    trainer.fit(model, loader)
    m = trainer.callback_metrics
    print(f"moco_loss={float(m['train/moco_loss']):.3f} "
          f"lrc_loss={float(m['train/lrc_loss_epoch']):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
