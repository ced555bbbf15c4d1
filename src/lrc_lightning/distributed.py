"""Autograd-aware all-gather for contrastive losses with negatives from every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather", "is_distributed", "rank", "world_size"]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the summed gradients.

    Every rank computes its loss against the gathered tensor, so the gradient w.r.t. this
    rank's input is the sum of what every rank's loss sends back to it: all-reduce, then
    keep our slice.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        stacked = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return stacked[dist.get_rank()]


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, keeping gradients.

    A no-op outside a multi-process group. Every rank must pass a tensor of the same shape
    (the LRC loss guarantees this with fixed-shape region embeddings and validity masks).
    Integer and bool tensors are gathered without autograd.
    """
    if not is_distributed():
        return tensor
    if not tensor.is_floating_point():
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor.contiguous())
        return torch.cat(out, dim=0)
    return torch.cat(_GatherWithGrad.apply(tensor), dim=0)
