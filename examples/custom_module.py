"""Your own SimCLR-style module gets LRC through LRCMixin (the added lines are marked).

    python examples/custom_module.py [--data data/chaos-t2-demo] [--steps 20]

`SimCLR` below stands for the module you already have: a U-Net, a global projector and an
NT-Xent loss over the two views. `SimCLRWithLRC` is everything LRC needs: 10 added lines.
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lrc_lightning import LRCDataModule, LRCMixin
from lrc_lightning.models import UNet2d


class SimCLR(pl.LightningModule):
    """A plain SimCLR on a U-Net's pooled bottleneck (the user's existing code)."""

    def __init__(self, width: int = 16, temperature: float = 0.2, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = UNet2d(width=width, depth=3)
        self.projector = nn.Sequential(
            nn.Linear(8 * width, 128), nn.ReLU(inplace=True), nn.Linear(128, 64)
        )
        self.temperature, self.lr = temperature, lr

    def nt_xent(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z = F.normalize(torch.cat([z1, z2]), dim=1)
        logits = z @ z.T / self.temperature
        logits.fill_diagonal_(float("-inf"))
        n = len(z1)
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
        return F.cross_entropy(logits, targets)

    def training_step(self, batch, batch_idx):
        images = torch.cat([batch["image_v1"], batch["image_v2"]])
        bottleneck, decoder = self.net.forward_features(images)
        z1, z2 = self.projector(bottleneck.mean((2, 3))).chunk(2)
        loss = self.nt_xent(z1, z2)
        self.log("train/simclr_loss", loss, prog_bar=True)
        self.dense_features = decoder[-1]  # added: kept for subclasses (one forward)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class SimCLRWithLRC(LRCMixin, SimCLR):  # added: the mixin first
    def __init__(self, width: int = 16, **kwargs) -> None:  # added
        super().__init__(width=width, **kwargs)  # added
        self.init_lrc(feature_channels=width, schedule="linear", warmup_steps=10)  # added

    def training_step(self, batch, batch_idx):  # added
        loss = super().training_step(batch, batch_idx)  # added
        f1, f2 = self.dense_features.chunk(2)  # added
        sp1, sp2 = batch["superpixels_v1"], batch["superpixels_v2"]  # added
        return loss + self.lrc_loss(f1, f2, sp1, sp2)  # added


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/chaos-t2-demo")
    parser.add_argument("--cache-dir", default=".lrc_cache")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=16)
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    data = LRCDataModule(args.data, cache_dir=args.cache_dir, image_size=args.size, batch_size=8)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False,
        log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(SimCLRWithLRC(width=args.width), data)
    m = trainer.callback_metrics
    print(f"simclr_loss={float(m['train/simclr_loss']):.3f} "
          f"lrc_loss={float(m['train/lrc_loss_epoch']):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
