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

from lrc_lightning.distributed import all_reduce_with_grad, is_distributed

__all__ = ["GlobalBatchNorm", "GlobalBatchNormSync", "convert_batchnorm", "revert_batchnorm"]


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

        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.full((1,), x.numel() / channels, device=x.device, dtype=torch.float64)
        local = torch.cat([xf.sum(dims).double(), (xf * xf).sum(dims).double(), count])
        total = all_reduce_with_grad(local)  # its backward sums the gradients over ranks
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels : 2 * channels] / n - mean * mean).clamp(min=0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 0.1
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
                self.num_batches_tracked += 1
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (xf - mean.float().view(shape)) * torch.rsqrt(var.float().view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


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
    :class:`GlobalBatchNorm` sharing its parameters and statistics."""
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
