"""Autograd-aware all-gather for contrastive losses with negatives from every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_with_grad", "gather", "is_distributed", "rank", "side_group", "world_size"]

_SIDE_GROUPS: dict[int, dist.ProcessGroup] = {}


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def side_group() -> dist.ProcessGroup:
    """A process group of all ranks for the collectives that run *inside* backward.

    DDP all-reduces gradient buckets asynchronously on the default group while autograd
    goes on; a collective issued from a backward function on that same group can then be
    matched with a different collective on another rank (seen with gloo: gradients left
    unsynchronised). A group of their own keeps both orders consistent. Created on first
    use, which every rank reaches in the same forward pass.
    """
    key = id(dist.group.WORLD)
    if key not in _SIDE_GROUPS:
        _SIDE_GROUPS[key] = dist.new_group(backend=dist.get_backend())
    return _SIDE_GROUPS[key]


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of all ranks' output
    gradients (each rank's loss depends on the reduced value)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=side_group())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=side_group())
        return out


def all_reduce_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Autograd-aware sum over ranks (a no-op outside a multi-process group)."""
    if not is_distributed():
        return tensor
    return _AllReduceWithGrad.apply(tensor)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the summed gradients.

    Every rank computes its loss against the gathered tensor, so the gradient w.r.t. this
    rank's input is the sum of what every rank's loss sends back to it: all-reduce, then
    keep our slice.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor.contiguous(), group=side_group())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        stacked = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=side_group())
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
        dist.all_gather(out, tensor.contiguous(), group=side_group())
        return torch.cat(out, dim=0)
    return torch.cat(_GatherWithGrad.apply(tensor), dim=0)
