"""A pre-training run that can kill itself with SIGKILL mid-epoch, and its resumption
(for tests/test_fault_tolerance.py).

    python tests/resume_worker.py --out DIR --max-steps 8 [--kill-at 5] [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402

from lrc_lightning import LRCConfig, LRCDataModule  # noqa: E402
from lrc_lightning.models import MoCoV2LRC, UNet2d  # noqa: E402


def _total(module) -> float:
    return float(sum(v.double().sum() for v in module.state_dict().values()))


class Record(pl.Callback):
    """Appends step, losses and lambda after every step (flushed: survives SIGKILL)."""

    def __init__(self, path: Path, kill_at: int | None) -> None:
        self.path, self.kill_at = path, kill_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        row = {"step": trainer.global_step, "lrc_loss": float(m["train/lrc_loss_step"]),
               "moco_loss": float(m["train/moco_loss"]),
               "lrc_weight": float(m["train/lrc_weight"])}  # fmt: skip
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.kill_at is not None and trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint

    def on_train_start(self, trainer, pl_module) -> None:
        """What the run starts from, after Lightning restored the checkpoint (if any)."""
        optimizer_state = trainer.optimizers[0].state_dict()["state"]
        steps = {int(s["step"]) for s in optimizer_state.values()} if optimizer_state else set()
        state = {
            "global_step": trainer.global_step,
            "queue_ptr": int(pl_module.queue_ptr),
            "queue_sum": float(pl_module.queue.double().sum()),
            "key_sum": _total(pl_module.key_backbone),
            "backbone_sum": _total(pl_module.backbone),
            "momentum_updates": int(pl_module.momentum_updates),
            "lrc_current_weight": pl_module.lrc_current_weight,
            "optimizer_steps": sorted(steps),
        }
        (self.path.parent / "start_state.json").write_text(json.dumps(state))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    data = LRCDataModule(str(ROOT / "data" / "chaos-t2-demo"), cache_dir=str(args.out / "cache"),
                         image_size=32, batch_size=4)  # fmt: skip
    lrc = LRCConfig(weight=1.0, schedule="linear", warmup_steps=10)
    model = MoCoV2LRC(UNet2d(width=4, depth=2), lrc=lrc, queue_size=64, lr=1e-2)
    checkpoints = ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=2,
                                  save_last=True, save_top_k=-1)  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1,
        callbacks=[checkpoints, Record(args.out / "steps.jsonl", args.kill_at)],
    )  # fmt: skip
    trainer.fit(model, data, ckpt_path="last" if args.resume else None, weights_only=True)


if __name__ == "__main__":
    main()
