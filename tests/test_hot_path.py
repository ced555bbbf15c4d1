"""The LRC hot path on an accelerator: no host syncs, deterministic, compilable, linear memory.

Host syncs are counted on CPU with a TorchDispatchMode: every op that would make a GPU wait
for the device (``.item()`` = ``aten._local_scalar_dense``, ``nonzero``, boolean-mask
indexing, ``masked_select``) is recorded. (The loss's bound check on ids reads maps in host
memory through numpy, outside this count: on CPU there is no device to wait for, and maps
on an accelerator are not read, see ``lrc_lightning.objective.regions.check_region_ids``.)
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from lrc_lightning import DenseProjectionHead, LocalizedRegionContrastLoss
from lrc_lightning.models import MoCoV2LRC, UNet2d
from lrc_lightning.objective.regions import downsample_superpixels
from tests.helpers import PairedSlices

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "item"}


class SyncCounter(TorchDispatchMode):
    """Records the ops of a region that would synchronise host and device."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.__name__.split(".")[0]
        if name in SYNCING:
            self.syncs.append(func.__name__)
        if name in ("index", "index_put", "index_put_"):
            indices = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or []):
                self.syncs.append(f"{func.__name__} (boolean mask)")
        return func(*args, **(kwargs or {}))


def _maps(seed: int, b: int = 4, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(-1, 12, (b, size // 4, size // 4), generator=g)
    return coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)


@pytest.mark.parametrize("samples_per_region", [16, None])
@pytest.mark.parametrize("downsample", ["nearest", "majority"])
def test_lrc_loss_forward_backward_with_head_has_no_host_sync(
    samples_per_region: int | None, downsample: str
) -> None:
    torch.manual_seed(0)
    head = DenseProjectionHead(8, out_channels=16).train()
    loss_fn = LocalizedRegionContrastLoss(
        samples_per_region=samples_per_region, downsample=downsample, negatives_from_same_view=True
    )
    f1 = torch.randn(4, 8, 16, 16, requires_grad=True)
    f2 = torch.randn(4, 8, 16, 16, requires_grad=True)
    s1, s2 = _maps(1), _maps(2)
    with SyncCounter() as counter:
        loss = loss_fn(f1, f2, s1, s2, projector=head)
        loss.backward()
    assert counter.syncs == []
    assert torch.isfinite(loss) and f1.grad is not None


def test_detector_sees_item_and_boolean_masks() -> None:
    """The counter is not blind: the old code's patterns are caught."""
    x = torch.arange(6)
    with SyncCounter() as counter:
        int(x.max().item())
        x[x > 2].sum()
        x.nonzero()
    assert len(counter.syncs) >= 3


def test_moco_lrc_training_step_and_queue_update_have_no_host_sync() -> None:
    torch.manual_seed(0)
    model = MoCoV2LRC(UNet2d(width=4, depth=2), queue_size=12)
    batch = next(iter(DataLoader(PairedSlices(n=4), batch_size=4)))

    def expected_keys() -> torch.Tensor:
        """What the step enqueues: the momentum encoder's keys of view 1, then of view 2,
        with the same shuffle-BN permutations (the random state is put back)."""
        state = torch.get_rng_state()
        with torch.no_grad():
            keys = torch.cat([model.key(batch["image_v1"]), model.key(batch["image_v2"])])
        torch.set_rng_state(state)
        return keys

    before, keys = model.queue.clone(), expected_keys()
    with SyncCounter() as counter:
        model.training_step(batch, 0).backward()
        model.update_key_encoder()
    assert counter.syncs == []
    # 2 views x 4 keys went in at rows 0..7; rows 8..11 kept their random negatives.
    assert int(model.queue_ptr) == 8
    torch.testing.assert_close(model.queue[:8], keys)
    assert torch.equal(model.queue[8:], before[8:])
    # The next 8 keys wrap around: rows 8..11, then 0..3; rows 4..7 keep the first step's.
    first, keys = model.queue.clone(), expected_keys()
    assert not torch.allclose(keys, first[:8])  # the key encoder moved: new keys
    model.training_step(batch, 1)
    assert int(model.queue_ptr) == (8 + 8) % 12
    torch.testing.assert_close(model.queue[8:], keys[:4])
    torch.testing.assert_close(model.queue[:4], keys[4:])
    assert torch.equal(model.queue[4:8], first[4:8])


def _run_losses(tmp_path, name: str) -> list[float]:
    pl.seed_everything(0, workers=True)
    model = MoCoV2LRC(UNet2d(width=4, depth=2), queue_size=16)
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(
        accelerator="cpu", max_steps=4, deterministic=True, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Record()], default_root_dir=tmp_path / name,
    )  # fmt: skip
    trainer.fit(model, DataLoader(PairedSlices(n=16), batch_size=4, shuffle=True))
    return losses


def test_deterministic_trainer_runs_are_bit_identical(tmp_path) -> None:
    first, second = _run_losses(tmp_path, "a"), _run_losses(tmp_path, "b")
    assert len(first) == 4 and first == second


def test_loss_and_head_compile_without_graph_breaks() -> None:
    """Dynamo traces the whole loss (head included) as one graph: ``fullgraph=True`` raises
    on any graph break. The eager backend checks the tracing without a C++ compiler."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    head = DenseProjectionHead(8, out_channels=16).train()
    loss_fn = LocalizedRegionContrastLoss()

    def step(f1, f2, s1, s2):
        return loss_fn(f1, f2, s1, s2, projector=head)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    f1, f2 = torch.randn(4, 8, 16, 16), torch.randn(4, 8, 16, 16)
    s1, s2 = _maps(1), _maps(2)
    torch.manual_seed(5)
    expected = step(f1, f2, s1, s2)
    torch.manual_seed(5)
    torch.testing.assert_close(compiled(f1, f2, s1, s2), expected)


class LargestTensor(TorchDispatchMode):
    """The largest tensor (in bytes) any op of a region creates."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_majority_downsampling_memory_is_linear_in_the_map() -> None:
    """16x16 blocks: the pairwise vote built a (B, h, w, 256, 256) tensor, 256 times the map
    (537 MB at B=32, 256x256); the sort-based vote never makes one larger than the int64 map."""
    maps = torch.randint(-1, 50, (2, 256, 256))
    with LargestTensor() as sizes:
        out = downsample_superpixels(maps, (16, 16), "majority")
    assert sizes.largest <= maps.numel() * 8
    assert out.shape == (2, 16, 16)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_moco_lrc_trains_in_bf16(precision: str) -> None:
    """precision="bf16-true" casts the head's weights to bf16: the loss feeds it bf16 samples
    and computes the contrast in fp32."""
    pl.seed_everything(0)
    model = MoCoV2LRC(UNet2d(width=4, depth=2), queue_size=16)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(model, DataLoader(PairedSlices(n=8), batch_size=4))
    assert trainer.global_step == 2
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert model.lrc_head.layers[0].weight.dtype == expected
    assert torch.isfinite(trainer.callback_metrics["train/lrc_loss_step"])
