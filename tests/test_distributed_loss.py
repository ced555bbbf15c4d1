"""gather_distributed: 2 ranks x batch b == 1 rank x batch 2b (loss and gradients), gloo."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lrc_lightning import LocalizedRegionContrastLoss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(dims: int = 2):
    """2D: (4, 6, 8, 8) features; 3D: (4, 6, 4, 8, 8) features and supervoxel maps."""
    g = torch.Generator().manual_seed(0)
    spatial = (8, 8) if dims == 2 else (4, 8, 8)
    f1 = torch.randn(4, 6, *spatial, generator=g, dtype=torch.float64)
    f2 = torch.randn(4, 6, *spatial, generator=g, dtype=torch.float64)
    maps = torch.randint(0, 5, (4, *[n // 4 for n in spatial]), generator=g)
    for axis in range(1, dims + 1):
        maps = maps.repeat_interleave(4, axis)
    maps[3] = -1  # rank 1 holds an image without valid regions: uneven counts per rank
    return f1, f2, maps


def _loss_fn():
    # N >= number of ids and full pooling: no random draw, so both runs see the same regions.
    return LocalizedRegionContrastLoss(
        temperature=0.3,
        num_regions=8,
        samples_per_region=None,
        min_pixels=1,
        gather_distributed=True,
        negatives_from_same_view=True,
    )


def _worker(rank: int, world: int, port: int, out: dict, dims: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        f1, f2, maps = _data(dims)
        sl = slice(2 * rank, 2 * rank + 2)
        a = f1[sl].clone().requires_grad_(True)
        b = f2[sl].clone().requires_grad_(True)
        loss = _loss_fn()(a, b, maps[sl], maps[sl])
        loss.backward()
        # The gradient reaching this rank's inputs is world x the global-batch gradient;
        # DDP's averaging of the parameter gradients over ranks divides it back.
        grads = torch.cat([a.grad, b.grad]) / world
        value = loss.detach().clone()
        dist.all_reduce(value)
        out[rank] = (value.item() / world, grads)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dims", [2, 3])
def test_two_ranks_equal_one_rank_with_double_batch(dims: int) -> None:
    f1, f2, maps = _data(dims)
    a, b = f1.clone().requires_grad_(True), f2.clone().requires_grad_(True)
    single = _loss_fn()(a, b, maps, maps)
    single.backward()

    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), out, dims), nprocs=2, join=True)
    loss0, _grads0 = out[0]
    assert abs(loss0 - single.item()) < 1e-5
    for rank in (0, 1):
        sl = slice(2 * rank, 2 * rank + 2)
        expected = torch.cat([a.grad[sl], b.grad[sl]]).float()
        _, grads = out[rank]
        assert torch.allclose(grads.float(), expected, atol=1e-6)
        assert grads.abs().sum() > 0
