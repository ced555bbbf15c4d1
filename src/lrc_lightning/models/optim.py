"""Optimizer + learning-rate schedule shared by the reference models."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn

__all__ = [
    "LRSchedule",
    "OptimizerName",
    "ReferenceModel",
    "configure_optimizer",
    "trainable_parameters",
]

OptimizerName = Literal["adamw", "sgd"]
LRSchedule = Literal["cosine", "constant"]


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters that need gradients (momentum encoders and frozen parts are left out)."""
    return [p for p in module.parameters() if p.requires_grad]


def configure_optimizer(
    parameters: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
    optimizer: OptimizerName,
    lr: float,
    weight_decay: float,
    schedule: LRSchedule,
    warmup_steps: int,
    total_steps: int,
) -> dict[str, Any]:
    """A Lightning ``configure_optimizers`` dict: linear warm-up, then cosine or constant,
    stepped every optimizer step (so gradient accumulation is respected). ``parameters``
    may be torch param groups (dicts with their own ``lr``)."""
    params = list(parameters)
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {schedule!r}")
    total = max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def total_training_steps(trainer: Any) -> int:
    """Optimizer steps of the whole fit (Lightning's estimate; 1 when unknown)."""
    try:
        steps = trainer.estimated_stepping_batches
    except Exception:  # no dataloader yet, e.g. a bare module
        return 1
    return int(steps) if math.isfinite(steps) else 1


class ReferenceModel(pl.LightningModule):
    """What the reference models share: the optimizer built from their hyper-parameters
    (``optimizer``, ``lr``, ``weight_decay``, ``lr_schedule``, ``warmup_steps``) and the
    backbone's description in every checkpoint (read by ``lrc-lightning export``)."""

    backbone: nn.Module

    def optimizer_parameters(self) -> list[Any]:
        """Parameters or param groups to optimise (override for per-group learning rates)."""
        return trainable_parameters(self)

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        return configure_optimizer(
            self.optimizer_parameters(),
            h["optimizer"],
            h["lr"],
            h["weight_decay"],
            h["lr_schedule"],
            h["warmup_steps"],
            total_training_steps(self.trainer),
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from lrc_lightning.models.backbone import describe_backbone

        checkpoint["backbone_config"] = describe_backbone(self.backbone)
