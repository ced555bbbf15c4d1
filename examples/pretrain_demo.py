"""Short MoCo-style + LRC pre-training on the CHAOS demo volumes shipped in data/ (CPU).

    python examples/pretrain_demo.py [--data data/chaos-t2-demo] [--epochs 3] [--size 96]

Builds the super-pixel cache (progress bar), trains a small U-Net with a global InfoNCE
(momentum key encoder, as MoCo) plus LRC through LRCMixin, and prints the LRC loss per
epoch. Checkpoints and CSV logs go to --out.
"""

from __future__ import annotations

import argparse
import copy

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from lrc_lightning import LRCDataModule, LRCMixin


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallUNet(nn.Module):
    """Two-level U-Net: returns the bottleneck (global branch) and decoder features (LRC)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.enc1, self.enc2 = conv_block(1, width), conv_block(width, 2 * width)
        self.bottleneck = conv_block(2 * width, 4 * width)
        self.up2, self.dec2 = (
            nn.ConvTranspose2d(4 * width, 2 * width, 2, 2),
            conv_block(4 * width, 2 * width),
        )
        self.up1, self.dec1 = (
            nn.ConvTranspose2d(2 * width, width, 2, 2),
            conv_block(2 * width, width),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottleneck(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return b, d1


class MoCoLite(pl.LightningModule):
    """Global contrast: query encoder vs momentum key encoder on pooled bottlenecks."""

    def __init__(self, width: int = 16, lr: float = 1e-3, temperature: float = 0.2) -> None:
        super().__init__()
        self.net = SmallUNet(width)
        self.projector = nn.Sequential(nn.Linear(4 * width, 64), nn.ReLU(), nn.Linear(64, 32))
        self.key_net = copy.deepcopy(self.net).requires_grad_(False)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.lr, self.temperature = lr, temperature

    def embed(self, net: nn.Module, projector: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(projector(net(x)[0].mean((2, 3))), dim=1)

    def training_step(self, batch, batch_idx):
        q = self.embed(self.net, self.projector, batch["image_v1"])
        with torch.no_grad():
            for k, p in zip(
                [*self.key_net.parameters(), *self.key_projector.parameters()],
                [*self.net.parameters(), *self.projector.parameters()],
                strict=True,
            ):
                k.mul_(0.99).add_(p.detach(), alpha=0.01)
            k = self.embed(self.key_net, self.key_projector, batch["image_v2"])
        loss = F.cross_entropy(q @ k.T / self.temperature, torch.arange(len(q), device=q.device))
        self.log("train/global_loss", loss, prog_bar=True, batch_size=len(q))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class MoCoLiteLRC(LRCMixin, MoCoLite):
    """The same module with LRC: the lines a user adds to their own MoCo."""

    def __init__(self, width: int = 16, lr: float = 1e-3, lrc_weight: float = 1.0) -> None:
        super().__init__(width=width, lr=lr)
        self.init_lrc(feature_channels=width, weight=lrc_weight, schedule="linear", warmup_steps=10)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        _, f1 = self.net(batch["image_v1"])
        _, f2 = self.net(batch["image_v2"])
        return loss + self.lrc_loss(f1, f2, batch["superpixels_v1"], batch["superpixels_v2"])


class EpochPrinter(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        m = trainer.callback_metrics
        print(
            f"epoch {trainer.current_epoch}: lrc_loss={float(m['train/lrc_loss_epoch']):.3f} "
            f"global_loss={float(m['train/global_loss']):.3f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/chaos-t2-demo")
    parser.add_argument("--cache-dir", default=".lrc_cache")
    parser.add_argument("--out", default="runs/pretrain_demo")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=-1)
    args = parser.parse_args()

    pl.seed_everything(0, workers=True)
    datamodule = LRCDataModule(
        args.data,
        cache_dir=args.cache_dir,
        batch_size=args.batch_size,
        image_size=args.size,
        superpixel_scale=50,
        superpixel_min_size=20,
    )
    model = MoCoLiteLRC(width=args.width)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        logger=CSVLogger(args.out),
        default_root_dir=args.out,
        callbacks=[EpochPrinter()],
        log_every_n_steps=5,
    )
    trainer.fit(model, datamodule)
    print(f"checkpoint and logs in {trainer.log_dir}")


if __name__ == "__main__":
    main()
