"""LRCMixin and LRCCallback in real (CPU) Trainer runs."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lrc_lightning import LRCCallback, LRCMixin
from lrc_lightning.objective.schedules import lrc_weight

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
    # The head was trained with the module; after fit the module is the user's again.
    assert cb.head is not None and cb.head.layers[0].weight.grad is not None
    assert not hasattr(model, "lrc_head")
    assert not {"training_step", "on_save_checkpoint", "on_load_checkpoint"} & set(model.__dict__)


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
    """Same weights, same sampling seed: the callback's added term is the mixin's term
    (TinySupervisedLike runs view 1 only, so view 2 costs the callback a forward)."""
    batch = next(iter(loader))
    pl.seed_everything(0)
    mixin = TinyMoCoLRC(num_regions=6, samples_per_region=4)
    mixin.train()
    other = module_cls()
    other.net.load_state_dict(mixin.net.state_dict())
    plain = copy.deepcopy(other).train()
    cb = LRCCallback(feature_layer="net.decoder", feature_channels=8, embedding_dim=16,
                     num_regions=6, samples_per_region=4)  # fmt: skip
    cb.setup(trainer(max_steps=1, callbacks=[cb]), other, "fit")
    other.lrc_head.load_state_dict(mixin.lrc_head.state_dict())
    other.train()
    f1, f2 = mixin.net(batch["image_v1"])[1], mixin.net(batch["image_v2"])[1]
    torch.manual_seed(7)
    from_mixin = mixin.lrc_loss(f1, f2, batch["superpixels_v1"], batch["superpixels_v2"])
    torch.manual_seed(7)
    with_term = other.training_step(batch, 0)
    without = plain.training_step(batch, 0)
    loss = lambda out: out["loss"] if isinstance(out, dict) else out  # noqa: E731
    assert mixin.lrc_current_weight == pytest.approx(0.3)
    assert (loss(with_term) - loss(without)).item() == pytest.approx(from_mixin.item(), rel=1e-5)
    assert cb.extra_forwards == (1 if module_cls is TinySupervisedLike else 0)


def test_weight_schedules_drive_the_mixin_weight(loader) -> None:
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


class _OwnLoss(TinySupervisedLike):
    """Keeps the loss of its own step, so that the callback's added term can be read."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.own_loss = float(out["loss"])
        return out


def test_callback_lambda_follows_its_schedule_over_trainer_steps(loader) -> None:
    """The term the callback adds at each real step is LRCConfig.weight_at(step) times the
    logged unweighted loss; lambda is logged and mirrored in current_weight."""
    pl.seed_everything(0)
    cb = LRCCallback(feature_layer="net.decoder", weight=0.5, schedule="linear", warmup_steps=4)
    seen: list[dict[str, float]] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            metrics = trainer.callback_metrics
            seen.append({"added": float(outputs["loss"]) - pl_module.own_loss,
                         "raw": float(metrics["train/lrc_loss_step"]),
                         "logged": float(metrics["train/lrc_weight"]),
                         "current": cb.current_weight})  # fmt: skip

    trainer(max_steps=6, callbacks=[cb, Record()]).fit(_OwnLoss(), loader)
    expected = [cb.config.weight_at(step) for step in range(6)]
    assert expected == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.5])
    assert [r["logged"] for r in seen] == pytest.approx(expected)
    assert [r["current"] for r in seen] == pytest.approx(expected)
    assert all(r["raw"] > 0.1 for r in seen)
    assert [r["added"] for r in seen] == pytest.approx(
        [w * r["raw"] for w, r in zip(expected, seen, strict=True)], rel=1e-4, abs=1e-6
    )


def test_mixin_lambda_follows_the_restored_step_without_a_callback(tmp_path, loader) -> None:
    model = TinyMoCoLRC(weight=0.5, schedule="linear", warmup_steps=4)
    t = trainer(max_steps=2, enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(model, loader)
    assert not any(isinstance(c, LRCCallback) for c in t.callbacks)
    path = tmp_path / "last.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert any(k.startswith("lrc_head.") for k in ckpt["state_dict"])
    assert model.lrc_current_weight == pytest.approx(0.25)  # lambda at step 2
    resumed = TinyMoCoLRC(weight=0.5, schedule="linear", warmup_steps=4)
    history = MetricHistory("train/lrc_weight")
    trainer(max_steps=4, callbacks=[history]).fit(resumed, loader, ckpt_path=path)
    assert history.history["train/lrc_weight"] == pytest.approx([0.25, 0.375])


def test_clear_errors(loader) -> None:
    views = {"image_v1": torch.zeros(1, 32, 32), "image_v2": torch.zeros(1, 32, 32)}
    no_maps = DataLoader([views] * 2, batch_size=2)
    with pytest.raises(KeyError, match=r"'superpixels_v1'.*image_v1"):
        trainer(max_steps=1).fit(TinyMoCoLRC(), no_maps)
    with pytest.raises(ValueError, match="feature_layer"):
        trainer(max_steps=1, callbacks=[LRCCallback()]).fit(TinySupervisedLike(), loader)
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        cb = LRCCallback(feature_layer="nope", feature_channels=8)
        trainer(max_steps=1, callbacks=[cb]).fit(TinySupervisedLike(), loader)
    with pytest.raises(TypeError, match=r"unknown LRC option.*'weight'"):
        LRCCallback(feature_layer="net.decoder", wieght=1.0)

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
    with pytest.raises(ValueError, match="init_lrc"):  # two homes for the options: refused
        trainer(max_steps=1, callbacks=[LRCCallback(weight=1.0)]).fit(TinyMoCoLRC(), loader)
