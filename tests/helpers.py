"""Small real-data batches and tiny LightningModules for the Trainer tests."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lrc_lightning import LRCMixin, felzenszwalb

DEMO = Path(__file__).resolve().parents[1] / "data" / "chaos-t2-demo" / "imagesTr"


class PairedSlices(Dataset):
    """Real CHAOS slices at 32x32 with two aligned views and their super-pixel maps.

    View 2 is the horizontal flip of view 1 with a brightness change: maps move with the
    image, intensities change on the image only.
    """

    def __init__(self, n: int = 8, size: int = 32) -> None:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(DEMO / "chaos_t2_001.nii.gz")))
        arr = arr.astype(np.float32)
        lo, hi = np.percentile(arr, [0.5, 99.5])
        vol = np.clip((arr - lo) / (hi - lo), 0, 1).astype(np.float32)
        idx = np.linspace(8, vol.shape[0] - 8, n).astype(int)
        t = torch.from_numpy(vol[idx]).unsqueeze(1)
        self.images = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        self.maps = torch.stack(
            [
                torch.from_numpy(felzenszwalb(im[0].numpy(), scale=20, min_size=8))
                for im in self.images
            ]
        ).long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, sp = self.images[i], self.maps[i]
        return {
            "image_v1": image,
            "image_v2": (image.flip(-1) * 0.8 + 0.1),
            "superpixels_v1": sp,
            "superpixels_v2": sp.flip(-1),
        }


class TinyUNet(nn.Module):
    """Encoder (stride 2) + decoder back to full resolution; decoder output = features."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, 1, 1), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bottleneck = self.encoder(x)
        return bottleneck, self.decoder(bottleneck)


class TinyMoCo(pl.LightningModule):
    """Global InfoNCE between pooled query and momentum-key embeddings (MoCo-like)."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.net = TinyUNet()
        self.key_net = copy.deepcopy(self.net).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[1]

    def global_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        q = F.normalize(self.net(batch["image_v1"])[0].mean((2, 3)), dim=1)
        with torch.no_grad():
            for pk, pq in zip(self.key_net.parameters(), self.net.parameters(), strict=False):
                pk.mul_(0.99).add_(pq.detach(), alpha=0.01)
            k = F.normalize(self.key_net(batch["image_v2"])[0].mean((2, 3)), dim=1)
        logits = q @ k.T / 0.2
        return F.cross_entropy(logits, torch.arange(len(q)))

    def training_step(self, batch, batch_idx):
        loss = self.global_loss(batch)
        self.log("train/global_loss", loss, batch_size=len(batch["image_v1"]))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class TinyMoCoLRC(LRCMixin, TinyMoCo):
    """The user's MoCo plus LRC through the mixin: five added lines."""

    def __init__(self, lr: float = 1e-2, **lrc) -> None:
        super().__init__(lr=lr)
        self.init_lrc(feature_channels=8, embedding_dim=16, **lrc)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        x1, x2, s1, s2 = self.lrc_inputs(batch)
        return loss + self.lrc_loss(self.net(x1)[1], self.net(x2)[1], s1, s2)


class TinySupervisedLike(pl.LightningModule):
    """An unmodified module: forwards view 1 once, returns a dict with its own loss."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.net = TinyUNet()
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        return self.head(self.net(x)[1])

    def training_step(self, batch, batch_idx):
        pred = self(batch["image_v1"])
        return {"loss": F.mse_loss(pred, batch["image_v1"])}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class MetricHistory(pl.Callback):
    """Records chosen logged values after every training batch."""

    def __init__(self, *keys: str) -> None:
        self.keys = keys
        self.history: dict[str, list[float]] = {k: [] for k in keys}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for k in self.keys:
            if k in trainer.callback_metrics:
                self.history[k].append(float(trainer.callback_metrics[k]))


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class LightlyStyleMoCo(pl.LightningModule):
    """lightly's documented MoCo v2 LightningModule, line for line, except that the
    ResNet-18 is a small conv net and lightly's helpers are written out (lightly needs
    torchvision, which cannot import beside the CPU torch wheel here).

    Its step reads ``x_query, x_key = batch[0]`` and runs the key view only through the
    momentum copy: the structure that cost LRCCallback a second forward before.
    """

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.projection_head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.backbone_momentum = copy.deepcopy(self.backbone).requires_grad_(False)
        self.projection_head_momentum = copy.deepcopy(self.projection_head).requires_grad_(False)
        self.steps_seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.backbone(x).flatten(start_dim=1)
        return self.projection_head(query)

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        key = self.backbone_momentum(x).flatten(start_dim=1)
        return self.projection_head_momentum(key).detach()

    def training_step(self, batch, batch_idx):
        self.steps_seen.append(len(batch))  # lightly's modules get (views, targets, filenames)
        with torch.no_grad():
            pairs = ((self.backbone, self.backbone_momentum),
                     (self.projection_head, self.projection_head_momentum))  # fmt: skip
            for online, momentum in pairs:
                for p, m in zip(online.parameters(), momentum.parameters(), strict=True):
                    m.mul_(0.99).add_(p.detach(), alpha=0.01)
        x_query, x_key = batch[0]
        query = F.normalize(self.forward(x_query), dim=1)
        key = F.normalize(self.forward_momentum(x_key), dim=1)
        return F.cross_entropy(query @ key.T / 0.2, torch.arange(len(query)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.06)


class SoloStyleSimCLR(pl.LightningModule):
    """solo-learn's batch ``(indexes, [x1, x2], targets)``; both views run online."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = TinyUNet()
        self.targets_seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        indexes, views, targets = batch
        self.targets_seen.append(targets)
        z = [F.normalize(self.backbone(x)[0].mean((2, 3)), dim=1) for x in views]
        return F.cross_entropy(z[0] @ z[1].T / 0.2, torch.arange(len(indexes)))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class PairedPatches(Dataset):
    """Real CHAOS (8, 16, 16) patches with 3D supervoxels and two aligned views (view 2:
    flipped along x, brighter), for 3D Trainer runs."""

    def __init__(self, n: int = 4) -> None:
        from lrc_lightning.superpixels import felzenszwalb_3d

        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(DEMO / "chaos_t2_001.nii.gz")))
        arr = arr.astype(np.float32)
        lo, hi = np.percentile(arr, [0.5, 99.5])
        vol = torch.from_numpy(np.clip((arr - lo) / (hi - lo), 0, 1).astype(np.float32))
        vol = F.interpolate(vol[None, None], size=(16, 64, 64), mode="trilinear")[0, 0]
        starts = [(4 * (i % 2), 16 + 8 * (i % 3), 16 + 8 * (i // 3 % 2)) for i in range(n)]
        self.images = torch.stack([vol[z : z + 8, y : y + 16, x : x + 16] for z, y, x in starts])
        self.maps = torch.stack([
            torch.from_numpy(felzenszwalb_3d(p.numpy(), scale=20, min_size=8)).long()
            for p in self.images
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, sv = self.images[i].unsqueeze(0), self.maps[i]
        return {"image_v1": image, "image_v2": image.flip(-1) * 0.8 + 0.1,
                "superpixels_v1": sv, "superpixels_v2": sv.flip(-1)}  # fmt: skip


def write_tiny_chaos_volumes(folder: Path, nnunet_names: bool = False) -> list[str]:
    """The four shipped CHAOS T2 patients, 12 central slices, in-plane 64 x 64 (5 mm), as
    ``folder/imagesTr`` and ``folder/labelsTr`` (images named ``<case>_0000.nii.gz`` with
    ``nnunet_names``, nnU-Net's raw layout); returns the case ids."""
    from .conftest import DEMO_MR

    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (DEMO_MR / "imagesTr").glob("*.nii.gz"))
    for case in cases:
        for kind, interpolator in (("imagesTr", sitk.sitkLinear),
                                   ("labelsTr", sitk.sitkNearestNeighbor)):  # fmt: skip
            image = sitk.ReadImage(str(DEMO_MR / kind / f"{case}.nii.gz"))
            z0 = image.GetSize()[2] // 2 - 6
            image = image[:, :, z0 : z0 + 12]
            small = sitk.Resample(image, [64, 64, 12], sitk.Transform(), interpolator,
                                  image.GetOrigin(), (5.0, 5.0, image.GetSpacing()[2]),
                                  image.GetDirection(), 0, image.GetPixelID())  # fmt: skip
            name = f"{case}_0000" if nnunet_names and kind == "imagesTr" else case
            sitk.WriteImage(small, str(folder / kind / f"{name}.nii.gz"))
    return cases
