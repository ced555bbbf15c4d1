"""An unmodified module gets LRC from LRCCallback alone: not a line of it changes.

    python examples/callback_only.py [--data data/chaos-t2-demo] [--steps 20]

`BYOLStyle` stands for the module you already have. The callback hooks the layer you name
(its output must be (B, C, h, w) decoder features), adds a projection head to the module,
and wraps its training_step so that lambda * L_LRC is added to the loss it returns (a
Lightning callback cannot change a returned loss otherwise). The module only has to build
its optimizer from ``self.parameters()`` *after* the callback's setup, as Lightning does.
"""

from __future__ import annotations

import argparse
import copy

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lrc_lightning import LRCCallback, LRCDataModule
from lrc_lightning.models import UNet2d


class BYOLStyle(pl.LightningModule):
    """Online U-Net + predictor against an EMA target network (the user's existing code)."""

    def __init__(self, width: int = 16, lr: float = 1e-3, tau: float = 0.99) -> None:
        super().__init__()
        self.online = UNet2d(width=width, depth=3)
        self.projector = nn.Sequential(nn.Linear(8 * width, 128), nn.ReLU(), nn.Linear(128, 64))
        self.predictor = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
        self.target = copy.deepcopy(nn.ModuleList([self.online, self.projector]))
        self.target.requires_grad_(False)
        self.lr, self.tau = lr, tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.online(x)

    def embed(self, net: nn.Module, projector: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return projector(net.encode(x)[0].mean((2, 3)))

    def training_step(self, batch, batch_idx):
        v1, v2 = batch["image_v1"], batch["image_v2"]
        p1 = self.predictor(self.embed(self.online, self.projector, v1))
        p2 = self.predictor(self.embed(self.online, self.projector, v2))
        with torch.no_grad():
            t1, t2 = (self.embed(self.target[0], self.target[1], v) for v in (v1, v2))
        loss = (2 - 2 * F.cosine_similarity(p1, t2).mean()) + (
            2 - 2 * F.cosine_similarity(p2, t1).mean()
        )
        self.log("train/byol_loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            for t, o in zip(self.target.parameters(), [*self.online.parameters(),
                            *self.projector.parameters()], strict=True):  # fmt: skip
                t.mul_(self.tau).add_(o.detach(), alpha=1 - self.tau)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


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
    # BYOLStyle.training_step never runs the decoder; the callback forwards both views
    # through the module (its forward = the U-Net) and captures the last decoder block.
    lrc = LRCCallback(feature_layer="online.decoders.2", feature_channels=args.width,
                      schedule="linear", warmup_steps=10)  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False,
        callbacks=[lrc], log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(BYOLStyle(width=args.width), data)
    m = trainer.callback_metrics
    print(f"byol_loss={float(m['train/byol_loss']):.3f} "
          f"lrc_loss={float(m['train/lrc_loss_epoch']):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
