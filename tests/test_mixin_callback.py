"""LRCMixin and LRCCallback in real (CPU) Trainer runs."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lrc_lightning import LRCCallback, LRCMixin
from lrc_lightning.schedules import lrc_weight

from .helpers import MetricHistory, PairedSlices, TinyMoCo, TinyMoCoLRC, TinySupervisedLike, trainer


@pytest.fixture(scope="module")
def loader() -> DataLoader:
    return DataLoader(PairedSlices(n=8), batch_size=4, shuffle=False)


def _decreases(values: list[float]) -> bool:
    k = max(3, len(values) // 5)
    return sum(values[-k:]) / k < 0.9 * sum(values[:k]) / k


def test_mixin_module_trains_and_lrc_decreases(loader) -> None:
    pl.seed_everything(0)
    model = TinyMoCoLRC(temperature=0.2, num_regions=8, samples_per_region=8)
    history = MetricHistory("train/lrc_loss_step", "train/lrc_weight")
    trainer(max_epochs=15, callbacks=[history]).fit(model, loader)
    lrc = history.history["train/lrc_loss_step"]
    assert len(lrc) == 30
    assert _decreases(lrc), lrc
    assert history.history["train/lrc_weight"] == [pytest.approx(0.3)] * 30  # the default


def test_callback_on_unmodified_module_trains_and_lrc_decreases(loader) -> None:
    pl.seed_everything(0)
    model = TinySupervisedLike()
    history = MetricHistory("train/lrc_loss_step")
    cb = LRCCallback(
        feature_layer="net.decoder",
        feature_channels=8,
        embedding_dim=16,
        temperature=0.2,
        num_regions=8,
        samples_per_region=8,
    )
    trainer(max_epochs=15, callbacks=[cb, history]).fit(model, loader)
    lrc = history.history["train/lrc_loss_step"]
    assert len(lrc) == 30 and _decreases(lrc), lrc
    # The head was trained with the module, and the module is restored after fit.
    assert hasattr(model, "lrc_head")
    assert "training_step" not in model.__dict__


def test_callback_changes_gradients_of_the_backbone(loader) -> None:
    batch = next(iter(loader))
    pl.seed_everything(0)
    plain = TinySupervisedLike()
    with_lrc = copy.deepcopy(plain)
    cb = LRCCallback(feature_layer="net.decoder", feature_channels=8, embedding_dim=16)
    t = trainer(max_steps=1, callbacks=[cb])
    cb.setup(t, with_lrc, "fit")
    loss_plain = plain.training_step(batch, 0)["loss"]
    loss_lrc = with_lrc.training_step(batch, 0)["loss"]
    assert loss_lrc.item() > loss_plain.item()
    loss_lrc.backward()
    assert with_lrc.lrc_head.layers[0].weight.grad is not None
    assert with_lrc.net.encoder[0].weight.grad.abs().sum() > 0
    cb.teardown(t, with_lrc, "fit")
    assert with_lrc.training_step(batch, 0)["loss"].item() == pytest.approx(loss_plain.item())


class _TwoViewModule(TinyMoCo):
    """Unmodified module that itself forwards both views through the decoder."""

    def training_step(self, batch, batch_idx):
        self(batch["image_v1"])
        self(batch["image_v2"])
        return self.global_loss(batch)


@pytest.mark.parametrize("module_cls", [_TwoViewModule, TinySupervisedLike])
def test_mixin_and_callback_give_the_same_lrc_term(loader, module_cls) -> None:
    batch = next(iter(loader))
    pl.seed_everything(0)
    mixin = TinyMoCoLRC(num_regions=6, samples_per_region=4)
    mixin.train()
    other = module_cls()
    other.net.load_state_dict(mixin.net.state_dict())
    cb = LRCCallback(
        feature_layer="net.decoder",
        feature_channels=8,
        embedding_dim=16,
        num_regions=6,
        samples_per_region=4,
    )
    cb.setup(trainer(max_steps=1, callbacks=[cb]), other, "fit")
    other.lrc_head.load_state_dict(mixin.lrc_head.state_dict())
    other.train()
    f1, f2 = mixin.net(batch["image_v1"])[1], mixin.net(batch["image_v2"])[1]
    torch.manual_seed(7)
    from_mixin = mixin.lrc_loss(f1, f2, batch["superpixels_v1"], batch["superpixels_v2"])
    cb._captured = []
    torch.manual_seed(7)
    cb._capturing = True
    other(batch["image_v1"])
    other(batch["image_v2"])
    cb._capturing = False
    g1, g2 = cb._view_features(other, batch)
    from lrc_lightning.mixin import lrc_term

    torch.manual_seed(7)
    from_callback = lrc_term(
        other.lrc_head, cb.criterion, g1, g2, batch["superpixels_v1"], batch["superpixels_v2"]
    )
    # lrc_loss returns lambda * L_LRC; lrc_term the unweighted term.
    assert mixin.lrc_current_weight == pytest.approx(0.3)
    assert from_mixin.item() == pytest.approx(0.3 * from_callback.item(), rel=1e-6)


def test_weight_schedules_and_callback_drives_mixin_weight(loader) -> None:
    assert lrc_weight(0, 2.0, "linear", 10) == 0.0
    assert lrc_weight(5, 2.0, "linear", 10) == pytest.approx(1.0)
    assert lrc_weight(5, 2.0, "cosine", 10) == pytest.approx(1.0)
    assert lrc_weight(2, 2.0, "cosine", 10) < lrc_weight(2, 2.0, "linear", 10)
    assert lrc_weight(50, 2.0, "cosine", 10) == 2.0
    with pytest.raises(ValueError, match="schedule"):
        lrc_weight(0, 1.0, "step")  # type: ignore[arg-type]
    pl.seed_everything(0)
    model = TinyMoCoLRC(weight=0.5, schedule="linear", warmup_steps=4)
    history = MetricHistory("train/lrc_weight")
    trainer(max_steps=6, callbacks=[history]).fit(model, loader)
    assert history.history["train/lrc_weight"] == pytest.approx([0, 0.125, 0.25, 0.375, 0.5, 0.5])


def test_callback_state_in_checkpoint(tmp_path, loader) -> None:
    model = TinyMoCoLRC(weight=0.5, schedule="linear", warmup_steps=4)
    t = trainer(max_steps=2, enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(model, loader)
    path = tmp_path / "last.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("LRCCallback")]
    assert state["schedule"] == "linear" and state["current_weight"] == pytest.approx(0.125)
    assert any(k.startswith("lrc_head.") for k in ckpt["state_dict"])
    resumed = TinyMoCoLRC(weight=0.5, schedule="linear", warmup_steps=4)
    history = MetricHistory("train/lrc_weight")
    trainer(max_steps=4, callbacks=[history]).fit(resumed, loader, ckpt_path=path)
    assert history.history["train/lrc_weight"] == pytest.approx([0.25, 0.375])


def test_clear_errors(loader) -> None:
    no_maps = [{"image_v1": torch.zeros(2, 1, 32, 32), "image_v2": torch.zeros(2, 1, 32, 32)}]
    with pytest.raises(KeyError, match="superpixels_v1"):
        trainer(max_steps=1).fit(TinyMoCoLRC(), no_maps)
    with pytest.raises(ValueError, match="feature_layer"):
        trainer(max_steps=1, callbacks=[LRCCallback()]).fit(TinySupervisedLike(), loader)
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        cb = LRCCallback(feature_layer="nope", feature_channels=8)
        trainer(max_steps=1, callbacks=[cb]).fit(TinySupervisedLike(), loader)
    with pytest.raises(ValueError, match="feature_channels"):
        LRCCallback(feature_layer="net.decoder")

    class NotInOptimizer(TinySupervisedLike):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.1)

    cb = LRCCallback(feature_layer="net.decoder", feature_channels=8)
    with pytest.raises(RuntimeError, match="did not include its parameters"):
        trainer(max_steps=1, callbacks=[cb]).fit(NotInOptimizer(), loader)

    class Forgot(LRCMixin, TinyMoCo):
        pass

    with pytest.raises(RuntimeError, match="init_lrc"):
        trainer(max_steps=1, callbacks=[LRCCallback()]).fit(Forgot(), loader)
