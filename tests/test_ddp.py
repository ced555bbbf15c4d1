"""Lightning DDP (gloo, 2 CPU processes): LRC gives the same result on 1 or N processes.

Each 2-process case runs ``tests/ddp_worker.py`` in a subprocess, which Lightning's ``ddp``
strategy re-launches for rank 1 exactly as it would a user's script; the 1-process
reference runs the same code in-process.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import ddp_worker

ROOT = Path(__file__).resolve().parents[1]


def run_ddp(scenario: str, out: Path, *extra: str, timeout: int = 240) -> None:
    cmd = [sys.executable, str(ROOT / "tests" / "ddp_worker.py"), scenario, "--devices", "2",
           "--out", str(out), *extra]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize("scenario", ["mixin", "mixin3d", "callback"])
def test_two_ranks_match_one_rank_with_twice_the_batch(scenario: str, tmp_path: Path) -> None:
    """(a) gathered negatives, (c) the callback path, (d) batch norm synchronised over ranks:
    gradients after DDP's all-reduce equal the single-process gradients of the global batch."""
    run_ddp(scenario, tmp_path / "ddp", "--batch", "2", "--sync-bn")
    ddp_worker.main([scenario, "--devices", "1", "--batch", "4", "--out", str(tmp_path / "one")])
    reference = torch.load(tmp_path / "one" / "grads_rank0.pt")
    rank0 = torch.load(tmp_path / "ddp" / "grads_rank0.pt")
    rank1 = torch.load(tmp_path / "ddp" / "grads_rank1.pt")
    assert set(rank0) == set(reference) and any(k.startswith("lrc_head.") for k in rank0)
    for name, grad in reference.items():
        assert torch.equal(rank0[name], rank1[name]), f"{name} not synchronised"
        torch.testing.assert_close(rank0[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Every BatchNorm, the head the callback registers in setup included, was converted.
    for rank in (0, 1):
        norms = json.loads((tmp_path / "ddp" / f"norms_rank{rank}.json").read_text())
        assert norms == ["GlobalBatchNorm", "MaskedBatchNorm(synchronized)"]


def test_without_synchronised_batch_norm_the_gradients_differ(tmp_path: Path) -> None:
    """The reference above is sensitive: per-rank BatchNorm statistics change gradients."""
    run_ddp("mixin", tmp_path / "ddp", "--batch", "2")
    ddp_worker.main(["mixin", "--devices", "1", "--batch", "4", "--out", str(tmp_path / "one")])
    reference = torch.load(tmp_path / "one" / "grads_rank0.pt")
    rank0 = torch.load(tmp_path / "ddp" / "grads_rank0.pt")
    worst = max(float((rank0[k] - g).abs().max() / g.abs().max()) for k, g in reference.items())
    assert worst > 1e-2


def test_prepare_data_once_per_node_setup_on_every_rank(tmp_path: Path) -> None:
    """(b)"""
    run_ddp("hooks", tmp_path)
    lines = (tmp_path / "hooks.log").read_text().splitlines()
    prepares = [line for line in lines if line.startswith("prepare_data")]
    setups = [line for line in lines if line.startswith("setup")]
    assert len(prepares) == 1 and "rank=0" in prepares[0]
    assert sorted(line.split("rank=")[1] for line in setups) == ["0", "1"]
    assert len({line.split("pid=")[1].split()[0] for line in setups}) == 2
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 4


def test_ranks_with_no_valid_region_do_not_hang(tmp_path: Path) -> None:
    """(e) rank 1's maps are all -1 (no region), rank 0's are real; 4 steps complete."""
    run_ddp("uneven", tmp_path, "--batch", "2", timeout=180)
    for rank in (0, 1):
        losses = json.loads((tmp_path / f"losses_rank{rank}.json").read_text())
        assert len(losses) == 4 and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("batch", [4, 3])
def test_shuffle_bn_keys_under_ddp_match_sub_batches_normalised_separately(
    batch: int, tmp_path: Path
) -> None:
    """MoCo's shuffle-BN over 2 ranks with key_bn_groups=2: one permutation of the 2B
    images of both ranks; each rank encodes its share in 2 sub-batches (of 2 and 1 for a
    per-rank batch of 3), each with its own BatchNorm statistics; keys back in input order."""
    from lrc_lightning.models import MoCoV2, UNet2d

    run_ddp("shuffle", tmp_path, "--batch", str(batch))
    records = [torch.load(tmp_path / f"keys_rank{r}.pt") for r in (0, 1)]
    model = MoCoV2(UNet2d(width=4, depth=2), queue_size=32, key_bn_groups=2).train()
    model.load_state_dict(torch.load(tmp_path / "state.pt"))
    images = torch.cat([r["images"] for r in records])  # rank order, as gathered
    torch.manual_seed(5)
    order = torch.randperm(2 * batch)
    reference = torch.empty(2 * batch, 128)
    with torch.no_grad():
        for rank in (0, 1):
            share = order[rank * batch : (rank + 1) * batch]
            for sub in share.tensor_split(2):
                reference[sub] = model.encode_keys(images[sub])
    for rank, record in enumerate(records):
        torch.testing.assert_close(record["keys"], reference[rank * batch : (rank + 1) * batch])
    whole = model.encode_keys(images[:batch])  # one batch's statistics: not what ran
    assert not torch.allclose(records[0]["keys"], whole, atol=1e-4)
