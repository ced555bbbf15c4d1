"""lightly's MoCo v2 LightningModule, as lightly documents it, gets LRC in three lines.

    pip install -e ".[lightly]"  # lightly + torchvision: install the torchvision built
                                 # for your torch (e.g. torch==2.14.1, torchvision==0.29.1)
    python examples/lightly_moco.py [--data data/chaos-t2-demo] [--steps 20]

`MoCo` below is lightly's example module (docs: "MoCo" in lightly's examples), with one
change that has nothing to do with LRC: the ResNet-18 reads one-channel CT/MR slices. The
LRC lines are marked ``# LRC``:

* ``LRCDataModule(batch_format="lightly")`` serves lightly's ``(views, targets, filenames)``
  with the super-pixel maps appended; the callback takes the maps off before ``MoCo``'s
  ``training_step`` sees the batch. No DataModule subclass.
* ``LRCCallback(feature_layer="backbone.4", target_layer="backbone_momentum.4")`` captures
  ResNet ``layer1`` (stride 4) of the query encoder for view 1 and of the momentum encoder,
  which ``training_step`` already runs on view 2: no extra forward. Its channels are read
  from one dry forward.
* Checkpoints keep the LRC head outside ``state_dict``: ``MoCo.load_from_checkpoint`` loads
  them as they are.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import pytorch_lightning as pl
import torch
import torchvision
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from lrc_lightning import LRCCallback, LRCDataModule


class MoCo(pl.LightningModule):
    def __init__(self):
        super().__init__()
        resnet = torchvision.models.resnet18()
        resnet.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # one-channel CT/MR slices
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = MoCoProjectionHead(512, 512, 128)

        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)

        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

        self.criterion = NTXentLoss(memory_bank_size=(4096, 128))

    def forward(self, x):
        query = self.backbone(x).flatten(start_dim=1)
        query = self.projection_head(query)
        return query

    def forward_momentum(self, x):
        key = self.backbone_momentum(x).flatten(start_dim=1)
        key = self.projection_head_momentum(key).detach()
        return key

    def training_step(self, batch, batch_idx):
        momentum = cosine_schedule(self.current_epoch, 10, 0.996, 1)
        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)
        x_query, x_key = batch[0]
        query = self.forward(x_query)
        key = self.forward_momentum(x_key)
        loss = self.criterion(query, key)
        self.log("train/moco_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optim = torch.optim.SGD(self.parameters(), lr=0.06)
        return optim


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/chaos-t2-demo")
    parser.add_argument("--cache-dir", default=None,
                        help="super-pixel cache (default: a temporary folder)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    # Nothing is written to the working directory: the cache and Lightning's run folder go
    # to a temporary folder unless --cache-dir is given.
    scratch = tempfile.TemporaryDirectory(prefix="lrc_lightly_")
    cache_dir = args.cache_dir or scratch.name
    data = LRCDataModule(args.data, cache_dir=cache_dir, image_size=128, batch_size=8,
                         batch_format="lightly")  # LRC  # fmt: skip
    lrc = LRCCallback(feature_layer="backbone.4", target_layer="backbone_momentum.4",
                      batch_format="lightly")  # LRC  # fmt: skip
    trainer = pl.Trainer(max_steps=args.steps, accelerator="auto", devices=1, logger=False,
                         enable_checkpointing=False, default_root_dir=scratch.name,
                         callbacks=[lrc], log_every_n_steps=1)  # LRC: callbacks=[lrc]  # fmt: skip
    model = MoCo()
    trainer.fit(model, data)
    m = trainer.callback_metrics
    print(f"moco_loss={float(m['train/moco_loss']):.3f} "
          f"lrc_loss={float(m['train/lrc_loss_epoch']):.3f} "
          f"extra_forwards={lrc.extra_forwards}")  # fmt: skip
    scratch.cleanup()


if __name__ == "__main__":
    main()
