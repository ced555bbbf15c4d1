"""Lightning DDP runs on CPU (gloo) for tests/test_ddp.py: one scenario per invocation.

    python tests/ddp_worker.py SCENARIO --devices N --out DIR [--batch B] [--sync-bn]

Lightning's ``ddp`` strategy re-launches this script for every other rank, as it would a
user's training script. Results land in DIR as files written by rank 0 (or every rank).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from lrc_lightning import LRCCallback, LRCConfig, LRCDataModule  # noqa: E402
from lrc_lightning.distributed.sync_batchnorm import GlobalBatchNormSync  # noqa: E402
from lrc_lightning.models import MoCoV2, MoCoV2LRC, UNet2d, UNet3d  # noqa: E402
from tests.helpers import PairedPatches, PairedSlices  # noqa: E402

LRC_EXACT = dict(samples_per_region=None, num_regions=64, min_pixels=1, gather_distributed=True)


class Reconstruction(pl.LightningModule):
    """A user's module without the mixin: U-Net reconstruction of view 1 (MSE)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = UNet2d(width=4, depth=2)
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(x))

    def setup(self, stage: str) -> None:
        # LRCCallback registers its head in its own setup (before this hook). Lightning's DDP
        # re-seeds each process on launch, so the global RNG differs from a 1-process run
        # here: initialise the head from a fixed seed so that both runs start equal.
        with torch.random.fork_rng():
            torch.manual_seed(123)
            for module in self.lrc_head.modules():
                if hasattr(module, "reset_parameters") and module is not self.lrc_head:
                    module.reset_parameters()

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch["image_v1"]), batch["image_v1"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SaveGradients(pl.Callback):
    """After DDP's all-reduce, before the step: every rank saves its gradients."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                 if p.grad is not None}  # fmt: skip
        torch.save(grads, self.out / f"grads_rank{trainer.global_rank}.pt")
        types = sorted({type(m).__name__ + ("(synchronized)" if getattr(m, "synchronize", False)
                                            else "")
                        for m in pl_module.modules() if "Norm" in type(m).__name__})  # fmt: skip
        (self.out / f"norms_rank{trainer.global_rank}.json").write_text(json.dumps(types))


class HalfEmpty(Dataset):
    """Real slices; odd indices (rank 1 under DDP) have no valid region at all."""

    def __init__(self, n: int) -> None:
        self.base = PairedSlices(n=n)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        item = dict(self.base[i])
        if i % 2:
            item["superpixels_v1"] = torch.full_like(item["superpixels_v1"], -1)
            item["superpixels_v2"] = torch.full_like(item["superpixels_v2"], -1)
        return item


class RecordLoss(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        path = self.out / f"losses_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.losses))


class RecordKeys(pl.Callback):
    """Before the first step: the momentum encoder's state (rank 0), then every rank's
    shuffle-BN keys of its view 1 from a fixed seed (the permutation is rank 0's)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx:
            return
        if trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), self.out / "state.pt")
        torch.manual_seed(5)
        keys = pl_module.key(batch["image_v1"])
        record = {"images": batch["image_v1"], "keys": keys}
        torch.save(record, self.out / f"keys_rank{trainer.global_rank}.pt")


class CountingDataModule(LRCDataModule):
    """Appends a line per hook call to a file: who prepared, who set up."""

    def __init__(self, log: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log_path = log

    def _note(self, what: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(f"{what} pid={os.getpid()} rank={os.environ.get('LOCAL_RANK', '0')}\n")

    def prepare_data(self) -> None:
        self._note("prepare_data")
        super().prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self._note("setup")
        super().setup(stage)


def trainer(args: argparse.Namespace, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        plugins=[GlobalBatchNormSync()] if args.sync_bn and args.devices > 1 else None,
        logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, **kwargs,
    )  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    scenarios = ["mixin", "mixin3d", "callback", "uneven", "hooks", "shuffle"]
    parser.add_argument("scenario", choices=scenarios)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4, help="per-process batch size")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sync-bn", action="store_true")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--groups", type=int, default=2, help="MoCoV2 key_bn_groups")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)

    if args.scenario == "hooks":
        data = CountingDataModule(
            log=str(args.out / "hooks.log"), data=str(ROOT / "data" / "chaos-t2-demo"),
            cache_dir=str(args.out / "cache"), image_size=32, batch_size=args.batch,
        )  # fmt: skip
        model = MoCoV2LRC(UNet2d(width=4, depth=2), queue_size=32)
        trainer(args, [], max_steps=1).fit(model, data)
        return

    total = args.batch * args.devices  # the global batch is the same in every run
    if args.scenario == "shuffle":
        # Shuffle-BN across ranks with key_bn_groups sub-batches per rank's share.
        loader = DataLoader(PairedSlices(n=total), batch_size=args.batch)
        model = MoCoV2(UNet2d(width=4, depth=2), queue_size=32, key_bn_groups=args.groups)
        trainer(args, [RecordKeys(args.out)], max_steps=1).fit(model, loader)
        return
    if args.scenario == "uneven":
        loader = DataLoader(HalfEmpty(n=4 * total), batch_size=args.batch)
        lrc = LRCConfig(gather_distributed=True)
        model = MoCoV2LRC(UNet2d(width=4, depth=2), lrc=lrc, queue_size=32)
        trainer(args, [RecordLoss(args.out)], max_steps=4).fit(model, loader)
        return

    dataset = PairedPatches(n=total) if args.scenario == "mixin3d" else PairedSlices(n=total)
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=False)
    callbacks: list = [SaveGradients(args.out)]
    if args.scenario in ("mixin", "mixin3d"):
        unet = UNet3d if args.scenario == "mixin3d" else UNet2d
        model: pl.LightningModule = MoCoV2LRC(
            unet(width=4, depth=2), lrc=LRCConfig(**LRC_EXACT), queue_size=32,
            optimizer="sgd", lr=0.1,
            # One key sub-batch per rank: with synchronised BatchNorm its statistics are
            # those of the global batch, as on one process (the permutation is exercised).
            key_bn_groups=1,
        )  # fmt: skip
    else:
        model = Reconstruction()
        callbacks.append(LRCCallback(feature_layer="net.decoders.1", feature_channels=4,
                                     **LRC_EXACT))  # fmt: skip
    trainer(args, callbacks, max_steps=args.steps).fit(model, loader)


if __name__ == "__main__":
    main()
