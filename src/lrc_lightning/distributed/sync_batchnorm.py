"""Batch statistics over all processes on any device: SyncBatchNorm that also runs on CPU.

``Trainer(sync_batchnorm=True)`` uses ``torch.nn.SyncBatchNorm``, which PyTorch's DDP only
accepts on GPUs. ``GlobalBatchNorm`` computes the same statistics with an autograd-aware
all-reduce that works with every backend (gloo included), so CPU clusters and tests get
the global-batch BatchNorm that LRC's and MoCo's projection heads expect::

    trainer = pl.Trainer(strategy="ddp", plugins=[GlobalBatchNormSync()])

On GPUs either works; Lightning's ``sync_batchnorm=True`` is faster there.
"""

from __future__ import annotations

import torch
from pytorch_lightning.plugins import LayerSync
from torch import Tensor, nn

from lrc_lightning.distributed.collectives import all_reduce_with_grad, is_distributed

__all__ = [
    "GlobalBatchNorm",
    "GlobalBatchNormSync",
    "MaskedBatchNorm",
    "convert_batchnorm",
    "revert_batchnorm",
]


def _normalise(
    bn: nn.modules.batchnorm._BatchNorm, x: Tensor, mask: Tensor | None, synchronize: bool
) -> Tensor:
    """Training-mode batch norm of ``x`` (B, C, *) with statistics over the positions where
    ``mask`` (B, *) is True (all positions if None), summed over ranks when ``synchronize``
    (autograd-aware). Updates the running statistics; no host sync."""
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    xf = x.float()
    if mask is None:
        weights = None
        count = torch.full((1,), x.numel() / channels, device=x.device, dtype=torch.float64)
    else:
        weights = mask.unsqueeze(1).to(xf.dtype)
        xf_masked = xf * weights
        count = weights.sum().double().reshape(1)
    masked = xf if weights is None else xf_masked
    local = torch.cat([masked.sum(dims).double(), (masked * xf).sum(dims).double(), count])
    total = all_reduce_with_grad(local) if synchronize else local
    n = total[-1]
    mean = total[:channels] / n.clamp(min=1)
    var = (total[channels : 2 * channels] / n.clamp(min=1) - mean * mean).clamp(min=0)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            momentum = bn.momentum if bn.momentum is not None else 0.1
            # No valid position anywhere: keep the running statistics as they are.
            step = torch.where(n > 0, momentum, 0.0)
            unbiased = var * n / (n - 1).clamp(min=1)
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), step.to(bn.running_mean.dtype))
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), step.to(bn.running_var.dtype))
            bn.num_batches_tracked += 1
    shape = [1, channels] + [1] * (x.dim() - 2)
    y = (xf - mean.float().view(shape)) * torch.rsqrt(var.float().view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (any number of spatial dims) whose training statistics span all ranks.

    Shapes: (B, C, *) -> (B, C, *). Outside training, or in a single process, it is
    ``nn.BatchNorm``. Ranks may hold different batch sizes (counts are reduced too).
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (B, C, ...), got {input.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        # all_reduce_with_grad's backward sums the gradients over ranks.
        return _normalise(self, x, None, synchronize=True)


class MaskedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics come from the positions a mask marks as valid.

    LRC's head sees fixed-shape samples; slots of regions that do not exist hold arbitrary
    pixels (often background with id -1). Counting them would let ignored pixels set the
    statistics, and through them the gradients of the valid ones. With the mask they only
    get normalised; their outputs are dropped by the loss, so they receive no gradient.

    Shapes: ``forward(x (B, C, *), mask (B, *) bool or None)`` -> (B, C, *). Without a mask,
    or outside training, it is ``nn.BatchNorm``. Under :class:`GlobalBatchNormSync` (which
    sets ``synchronize``) the statistics span all ranks.
    """

    synchronize: bool = False

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (B, C, ...), got {input.dim()}D")

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        sync = self.synchronize and is_distributed()
        if not self.training or (mask is None and not sync):
            return super().forward(x)
        if mask is not None and mask.shape != (x.shape[0], *x.shape[2:]):
            raise ValueError(
                f"mask {tuple(mask.shape)} does not match input {tuple(x.shape)} without channels"
            )
        return _normalise(self, x, mask, synchronize=sync)


def _swap(module: nn.modules.batchnorm._BatchNorm, cls: type) -> nn.Module:
    """A ``cls`` batch norm that shares ``module``'s parameter and buffer *objects*, so that
    flags such as ``requires_grad=False`` (a momentum encoder's) and optimizer references
    survive the swap."""
    swapped = cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.track_running_stats)  # fmt: skip
    for name, param in module.named_parameters(recurse=False):
        setattr(swapped, name, param)
    for name, buffer in module.named_buffers(recurse=False):
        swapped.register_buffer(name, buffer)
    swapped.train(module.training)
    return swapped


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` (not already synchronised) by a
    :class:`GlobalBatchNorm` sharing its parameters and statistics; a
    :class:`MaskedBatchNorm` is switched to synchronised statistics in place."""
    if isinstance(module, MaskedBatchNorm):
        module.synchronize = True
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (GlobalBatchNorm, nn.SyncBatchNorm)
    ):
        converted = _swap(module, GlobalBatchNorm)
        converted._lrc_original_type = type(module)  # type: ignore[assignment]
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child))
    return module


def revert_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_batchnorm`."""
    if isinstance(module, MaskedBatchNorm):
        module.synchronize = False
        return module
    if isinstance(module, GlobalBatchNorm):
        return _swap(module, getattr(module, "_lrc_original_type", nn.BatchNorm2d))
    for name, child in module.named_children():
        module.add_module(name, revert_batchnorm(child))
    return module


class GlobalBatchNormSync(LayerSync):
    """Lightning plugin: ``Trainer(plugins=[GlobalBatchNormSync()])`` converts the model's
    BatchNorm layers (including heads registered by :class:`LRCCallback` in ``setup``)."""

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        return revert_batchnorm(model)
