"""Modules the project did not write: batch formats, views matched by input, layer discovery,
checkpoints that reload into the unmodified module, precision, lightning.pytorch."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lrc_lightning import (
    KeyPathBatch,
    LRCCallback,
    LRCConfig,
    LRCDataModule,
    batch_format,
    find_feature_layers,
    format_feature_layers,
    print_feature_layers,
)
from lrc_lightning.integrations.callback import CHECKPOINT_KEY
from lrc_lightning.integrations.layers import dense_candidates
from lrc_lightning.objective.term import lrc_term

from .conftest import DEMO_MR, ROOT
from .helpers import (
    LightlyStyleMoCo,
    MetricHistory,
    PairedSlices,
    SoloStyleSimCLR,
    TinyMoCo,
    TinyMoCoLRC,
    TinySupervisedLike,
    trainer,
)


@pytest.fixture(scope="module")
def loader() -> DataLoader:
    return DataLoader(PairedSlices(n=8), batch_size=4, shuffle=False)


def _data(tmp_path: Path, fmt: str = "dict", **kwargs) -> LRCDataModule:
    return LRCDataModule(str(DEMO_MR), cache_dir=str(tmp_path / "cache"), image_size=32,
                         batch_size=4, batch_format=fmt, **kwargs)  # fmt: skip


# ---------------------------------------------------------------------- batch formats
def test_ready_batch_formats_read_views_and_hand_the_module_its_own_structure() -> None:
    x1, x2 = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    s1, s2 = torch.zeros(2, 8, 8, dtype=torch.long), torch.ones(2, 8, 8, dtype=torch.long)
    lightly = ([x1, x2], torch.tensor([-1, -1]), ["a", "b"], [s1, s2])
    solo = (torch.arange(2), [x1, x2], torch.tensor([-1, -1]), [s1, s2])
    as_dict = {"image_v1": x1, "image_v2": x2, "superpixels_v1": s1, "superpixels_v2": s2}
    for name, batch, module_len in (("lightly", lightly, 3), ("solo-learn", solo, 3),
                                    ("dict", as_dict, 4)):  # fmt: skip
        fmt = batch_format(name)
        got = fmt.inputs(batch)
        assert got.view_1 is x1 and got.view_2 is x2
        assert got.superpixels_1 is s1 and got.superpixels_2 is s2
        assert len(fmt.module_batch(batch)) == module_len
    custom = KeyPathBatch(views=("v.0", "v.1"), superpixels=("m.a", "m.b"))
    assert custom.inputs({"v": [x1, x2], "m": {"a": s1, "b": s2}}).view_2 is x2
    from_callable = batch_format(lambda b: (b["p"], b["q"], b["r"], b["s"]))
    assert from_callable.inputs({"p": x1, "q": x2, "r": s1, "s": s2}).superpixels_2 is s2
    with pytest.raises(ValueError, match="ready formats are"):
        batch_format("simclr")
    with pytest.raises(ValueError, match=r"must return \(view_1, view_2.*got 2 values"):
        batch_format(lambda b: (b["p"], b["q"])).inputs({"p": x1, "q": x2})
    with pytest.raises(KeyError, match=r"'3\.0'.*tuple\[list\[Tensor"):
        batch_format("lightly").inputs(([x1, x2], torch.tensor([-1, -1]), ["a", "b"]))


def test_data_module_emits_lightly_and_solo_learn_batches_from_real_volumes(tmp_path) -> None:
    for fmt in ("lightly", "solo-learn"):
        dm = _data(tmp_path, fmt)
        dm.prepare_data()
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        views = batch[0] if fmt == "lightly" else batch[1]
        assert len(batch) == 4 and [tuple(v.shape) for v in views] == [(4, 1, 32, 32)] * 2
        maps = batch[3]
        assert [tuple(m.shape) for m in maps] == [(4, 32, 32)] * 2 and maps[0].dtype == torch.long
        if fmt == "lightly":
            assert all(":" in name and name.startswith("chaos_t2_") for name in batch[2])
        assert (batch[1 if fmt == "lightly" else 2] == -1).all()  # unlabelled targets
    with pytest.raises(ValueError, match="pre-training batches"):
        _data(tmp_path, "lightly", mode="finetune")
    # Device batches take the same structure, every tensor on the batches' device.
    dm = _data(tmp_path, "solo-learn", device_batches=True)
    dm.prepare_data()
    dm.setup("fit")
    indexes, views, targets, maps = next(iter(dm.train_dataloader()))
    assert views[0].shape == (4, 1, 32, 32) and maps[1].shape == (4, 32, 32)
    assert {t.device for t in (indexes, targets, views[0], maps[0])} == {views[0].device}


def test_the_baseline_arm_gets_the_plain_structure_without_maps(tmp_path) -> None:
    """superpixels_in_batch=False: the same data module feeds the module without LRCCallback
    its own 3-item batch (lightly, solo-learn; loader and device batches) or a dict without
    maps; with the callback it is a clear error."""
    pl.seed_everything(0)
    model = LightlyStyleMoCo()
    before = copy.deepcopy(model.backbone.state_dict())
    trainer(max_steps=2).fit(model, _data(tmp_path, "lightly", superpixels_in_batch=False))
    assert model.steps_seen == [3, 3]
    assert not torch.equal(before["0.weight"], model.backbone.state_dict()["0.weight"])
    for fmt, device_batches in (("lightly", False), ("solo-learn", False), ("solo-learn", True)):
        dm = _data(tmp_path, fmt, superpixels_in_batch=False, device_batches=device_batches)
        dm.prepare_data()
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        views = batch[0] if fmt == "lightly" else batch[1]
        assert len(batch) == 3 and [tuple(v.shape) for v in views] == [(4, 1, 32, 32)] * 2
    dm = _data(tmp_path, "dict", superpixels_in_batch=False)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "image_v2" in batch and not {"superpixels_v1", "superpixels_v2"} & set(batch)
    cb = LRCCallback(feature_layer="backbone.2", batch_format="lightly")
    with pytest.raises(ValueError, match="superpixels_in_batch=False"):
        trainer(max_steps=1, callbacks=[cb]).fit(
            LightlyStyleMoCo(), _data(tmp_path, "lightly", superpixels_in_batch=False)
        )
    with pytest.raises(ValueError, match="superpixels_in_batch=False is for pre-training"):
        _data(tmp_path, superpixels_in_batch=False, mode="finetune")
    # The reverse: maps appended for a callback that is not there (once a bare unpack error).
    for fmt, device_batches in (("lightly", False), ("solo-learn", True)):
        advice = rf"no LRCCallback: add LRCCallback\(batch_format='{fmt}'\).*superpixels_in_"
        dm = _data(tmp_path, fmt, device_batches=device_batches)
        with pytest.raises(ValueError, match=advice):
            trainer(max_steps=1).fit(LightlyStyleMoCo(), dm)


def test_a_format_the_data_module_cannot_build_is_refused_at_construction(tmp_path) -> None:
    """A KeyPathBatch or a callable reads batches; the data module builds only the named
    formats, so it says so when it is made (it once failed at the first training step with
    a bare NotImplementedError). The callback keeps taking both."""
    key_paths = KeyPathBatch(views=("0.0", "0.1"), superpixels=("3.0", "3.1"))
    for fmt in (key_paths, lambda batch: batch):
        with pytest.raises(ValueError, match=r"builds only the named batch formats "
                           r"\['dict', 'lightly', 'solo-learn'\].*LRCCallback\(batch_format"):
            _data(tmp_path, fmt)  # type: ignore[arg-type]
    # The callback keeps taking both: the instance itself, and the callable wrapped.
    assert LRCCallback(feature_layer="backbone.2", batch_format=key_paths).batch_format is key_paths
    wrapped = LRCCallback(feature_layer="backbone.2", batch_format=lambda b: b).batch_format
    assert type(wrapped).__name__ == "CallableBatch"
    assert _data(tmp_path, "solo-learn").batch_format.name == "solo-learn"


def test_lightly_module_unmodified_gets_lrc_without_an_extra_forward(tmp_path) -> None:
    """lightly's MoCo as documented + LRCDataModule(batch_format) + LRCCallback: no
    DataModule subclass, no extra forward (view 2's features come from the momentum
    branch), and the module's step sees lightly's 3-item batch."""
    pl.seed_everything(0)
    model = LightlyStyleMoCo()
    cb = LRCCallback(feature_layer="backbone.2", target_layer="backbone_momentum.2",
                     batch_format="lightly")  # fmt: skip
    history = MetricHistory("train/lrc_loss_step")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=3, callbacks=[cb, history]).fit(model, _data(tmp_path, "lightly"))
    assert not [w for w in caught if "LRC" in str(w.message)]  # no extra forward, not coarse
    assert cb.extra_forwards == 0
    assert cb.head is not None and cb.head.in_channels == 8  # read from a dry forward
    assert model.steps_seen == [3, 3, 3]
    assert len(history.history["train/lrc_loss_step"]) == 3
    assert all(v > 0 for v in history.history["train/lrc_loss_step"])


def test_without_target_layer_the_extra_forward_is_made_and_reported(tmp_path) -> None:
    model = LightlyStyleMoCo()
    cb = LRCCallback(feature_layer="backbone.2", batch_format="lightly")
    with pytest.warns(UserWarning, match="extra forward.*target_layer") as caught:
        trainer(max_steps=2, callbacks=[cb]).fit(model, _data(tmp_path, "lightly"))
    assert cb.extra_forwards == 2
    assert [w.filename for w in caught if "extra forward" in str(w.message)] == [__file__]


def test_solo_learn_module_gets_lrc_with_its_own_batch(tmp_path) -> None:
    model = SoloStyleSimCLR()
    cb = LRCCallback(feature_layer="backbone.decoder", batch_format="solo-learn")
    history = MetricHistory("train/lrc_loss_step")
    trainer(max_steps=2, callbacks=[cb, history]).fit(model, _data(tmp_path, "solo-learn"))
    assert cb.extra_forwards == 0 and len(history.history["train/lrc_loss_step"]) == 2
    assert all(t.eq(-1).all() for t in model.targets_seen)


class _SoloLearnableParams(SoloStyleSimCLR):
    """solo-learn's BaseMethod: the optimizer takes ``self.learnable_params`` (groups)."""

    @property
    def learnable_params(self) -> list[dict]:
        return [{"name": "backbone", "params": self.backbone.parameters()}]

    def configure_optimizers(self):
        return torch.optim.SGD(self.learnable_params, lr=0.1)


def test_the_head_joins_a_solo_learn_modules_learnable_params(tmp_path) -> None:
    model = _SoloLearnableParams()
    lrc = LRCCallback(feature_layer="backbone.decoder", batch_format="solo-learn")
    fit = trainer(max_steps=2, callbacks=[lrc])
    fit.fit(model, _data(tmp_path, "solo-learn"))
    names = [group["name"] for group in fit.optimizers[0].param_groups]
    assert names == ["backbone", "lrc_head"]
    head = {id(p) for p in lrc.head.parameters()}
    assert head == {id(p) for p in fit.optimizers[0].param_groups[1]["params"]}
    # After fit the module is the user's class again, without the head.
    assert type(model) is _SoloLearnableParams and not hasattr(model, "lrc_head")
    assert [g["name"] for g in model.learnable_params] == ["backbone"]


def test_a_batch_of_the_other_tuple_format_is_a_batch_format_error(tmp_path) -> None:
    """lightly's and solo-learn's batches both hold four items: read with the other format,
    a view would be a target or an index (a 0-d tensor) and the network's shape error
    would say nothing about the cause. The error names the declared format and the batch."""
    cases = (("lightly", "solo-learn", SoloStyleSimCLR, "backbone.decoder"),
             ("solo-learn", "lightly", LightlyStyleMoCo, "backbone.2"))  # fmt: skip
    for emitted, declared, module_cls, layer in cases:
        cb = LRCCallback(feature_layer=layer, batch_format=declared)
        with pytest.raises(ValueError) as error:
            trainer(max_steps=1, callbacks=[cb]).fit(module_cls(), _data(tmp_path, emitted))
        message = str(error.value)
        assert f"batch_format {declared!r} reads" in message
        assert "view_1 is torch.int64 Tensor()" in message  # a target / an index
        assert "tuple[" in message and "Tensor(4, 1, 32, 32)" in message  # what arrived
        assert f"looks like a {emitted!r} batch" in message
    dict_batch = {"image_v1": torch.zeros(2, 1, 8, 8), "image_v2": torch.zeros(2, 1, 8, 8),
                  "superpixels_v1": torch.zeros(2, 1, 8, 8, dtype=torch.long),
                  "superpixels_v2": torch.zeros(2, 1, 8, 8, dtype=torch.long)}  # fmt: skip
    with pytest.raises(ValueError, match=r"superpixels_1 is torch.int64 Tensor\(2, 1, 8, 8\)"):
        batch_format("dict").inputs(dict_batch)  # maps with a channel: one dim too many


class _ViewTwoFirst(TinyMoCo):
    """Runs view 2 before view 1: matching by call order would swap them."""

    def training_step(self, batch, batch_idx):
        self(batch["image_v2"])
        self(batch["image_v1"])
        return self.global_loss(batch)


def test_views_are_matched_by_input_not_by_call_order(loader) -> None:
    batch = next(iter(loader))
    pl.seed_everything(0)
    model = _ViewTwoFirst().train()
    plain = copy.deepcopy(model)
    cb = LRCCallback(feature_layer="net.decoder", feature_channels=8)
    cb.setup(trainer(max_steps=1, callbacks=[cb]), model, "fit")
    torch.manual_seed(3)
    added = model.training_step(batch, 0) - plain.training_step(batch, 0)
    f1, f2 = model.net(batch["image_v1"])[1], model.net(batch["image_v2"])[1]
    s1, s2 = batch["superpixels_v1"], batch["superpixels_v2"]
    terms = {}
    for name, (a, b) in {"right": (f1, f2), "swapped": (f2, f1)}.items():
        torch.manual_seed(3)
        terms[name] = 0.3 * lrc_term(model.lrc_head, cb.criterion, a, b, s1, s2).item()
    assert added.item() == pytest.approx(terms["right"], rel=1e-5)
    assert abs(terms["right"] - terms["swapped"]) > 1e-3
    cb.teardown(None, model, "fit")


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


class _NormalisesViews(TinyMoCo):
    """Normalises each view in the step, view 2 first: no captured output has a view as
    its input, and by call order f(view 2) would be paired with view 1's super-pixels."""

    def training_step(self, batch, batch_idx):
        self(_normalised(batch["image_v2"]))
        self(_normalised(batch["image_v1"]))
        return self.global_loss(batch)


class _CopiesViews(TinyMoCo):
    """Copies the views (view 2 first) before the network: recognised by their values."""

    def training_step(self, batch, batch_idx):
        self(batch["image_v2"].clone())
        self(batch["image_v1"].clone())
        return self.global_loss(batch)


class _ConcatenatesViews(TinySupervisedLike):
    """One forward of ``cat([view 2, view 1])``: halves in the reverse of the usual order."""

    def training_step(self, batch, batch_idx):
        x = torch.cat([batch["image_v2"], batch["image_v1"]])
        return {"loss": F.mse_loss(self(x), x)}


def _separate(f, batch):
    """(right, guessed by call order): features of view 1 and view 2 each forwarded alone."""
    f1, f2 = f(batch["image_v1"]), f(batch["image_v2"])
    return (f1, f2), (f2, f1)


def _normalised_pairs(f, batch):
    right, _ = _separate(f, batch)
    return right, (f(_normalised(batch["image_v2"])), f(_normalised(batch["image_v1"])))


def _concatenated(f, batch):
    """One forward of cat([view 2, view 1]) (BatchNorm sees both): its halves."""
    second, first = f(torch.cat([batch["image_v2"], batch["image_v1"]])).chunk(2)
    return (first, second), (second, first)


@pytest.mark.parametrize(
    ("module_cls", "extra", "pairs_of"),
    [(_NormalisesViews, 1, _normalised_pairs), (_CopiesViews, 0, _separate),
     (_ConcatenatesViews, 0, _concatenated)],
)  # fmt: skip
def test_views_changed_before_the_network_are_never_paired_by_guess(
    loader, module_cls, extra, pairs_of
) -> None:
    """Copies and concatenations are matched by value; a normalised view (that no output
    can be matched to) is forwarded by the callback itself, counted and warned: the term is
    always that of (f(view 1), f(view 2)), never the pairing by call order."""
    batch = next(iter(loader))
    pl.seed_everything(0)
    model = module_cls().train()
    plain = copy.deepcopy(model)
    cb = LRCCallback(feature_layer="net.decoder", feature_channels=8)
    cb.setup(trainer(max_steps=1, callbacks=[cb]), model, "fit")
    torch.manual_seed(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, ref = model.training_step(batch, 0), plain.training_step(batch, 0)
    loss = lambda o: o["loss"] if isinstance(o, dict) else o  # noqa: E731
    added = loss(out) - loss(ref)
    assert cb.extra_forwards == extra
    messages = [str(w.message) for w in caught if "LRCCallback" in str(w.message)]
    if extra:
        assert len(messages) == 1 and "neither view" in messages[0]
        assert "forwards view 2" in messages[0] and "does not guess" in messages[0]
    else:
        assert not messages
    s1, s2 = batch["superpixels_v1"], batch["superpixels_v2"]
    f = lambda x: model.net(x)[1]  # noqa: E731
    terms = {}
    for name, (a, b) in zip(("right", "guess"), pairs_of(f, batch), strict=True):
        torch.manual_seed(3)
        terms[name] = 0.3 * lrc_term(model.lrc_head, cb.criterion, a, b, s1, s2).item()
    assert added.item() == pytest.approx(terms["right"], rel=1e-5)
    assert abs(terms["right"] - terms["guess"]) > 1e-3
    cb.teardown(None, model, "fit")


# ---------------------------------------------------------------------- feature layers
class _WithExample(TinySupervisedLike):
    def __init__(self) -> None:
        super().__init__()
        self.example_input_array = torch.zeros(2, 1, 32, 32)


def test_find_feature_layers_lists_shapes_and_dense_candidates_finest_first() -> None:
    layers = find_feature_layers(_WithExample(), torch.zeros(2, 1, 32, 32))
    shapes = {layer.name: layer.shape for layer in layers}
    assert shapes["net.encoder"] == (2, 8, 16, 16) and shapes["net.decoder"] == (2, 8, 32, 32)
    names = [layer.name for layer in dense_candidates(layers)]
    assert names.index("net.decoder") < names.index("net.encoder")  # finest first
    assert "net.decoder.1" not in names  # inside net.decoder, same shape: named by its block


def test_the_layer_listing_names_momentum_copies_that_forward_does_not_run(capsys) -> None:
    """finest first, dense only (no pooled 1x1), and backbone_momentum.* (never run by
    forward) right after the backbone.* layer it copies, usable as target_layer."""
    model = LightlyStyleMoCo()
    text = format_feature_layers(model, torch.zeros(2, 1, 32, 32))
    lines = text.splitlines()
    assert lines[0] == ("Dense outputs of LightlyStyleMoCo for an input of (2, 1, 32, 32), "
                        "finest first:")  # fmt: skip
    names = [line.split()[0] for line in lines[1:]]
    assert names == [f"backbone{c}.{i}" for i in (2, 1, 0, 5, 4, 3) for c in ("", "_momentum")]
    assert lines[2] == ("  backbone_momentum.2 (ReLU) -> (2, 8, 32, 32)  [copy of backbone.2, "
                        "not run by forward: a target_layer]")  # fmt: skip
    assert lines[7] == "  backbone.5 (ReLU) -> (2, 16, 16, 16)"
    for name in names:
        model.get_submodule(name)
    print_feature_layers(model, torch.zeros(2, 1, 32, 32))
    assert capsys.readouterr().out == text + "\n"
    # A module whose copy differs in structure gets no copy line.
    model.backbone_momentum[0] = nn.Conv2d(1, 4, 3, 1, 1)
    assert "momentum" not in format_feature_layers(model, torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"LightlyStyleMoCo.*example_input"):
        format_feature_layers(model)


def test_layer_errors_name_the_dense_candidates_and_the_layer_shape(loader) -> None:
    cb = LRCCallback(feature_layer="net.decodr")
    with pytest.raises(
        ValueError, match=r"(?s)no submodule 'net.decodr'.*net.decoder.*\(2, 8, 32, 32\)"
    ):
        trainer(max_steps=1, callbacks=[cb]).fit(_WithExample(), loader)
    cb = LRCCallback(feature_layer="net.decoder", feature_channels=5)
    with pytest.raises(ValueError, match=r"feature_channels=5.*\(2, 8, 32, 32\)"):
        trainer(max_steps=1, callbacks=[cb]).fit(_WithExample(), loader)
    cb = LRCCallback(feature_layer="net.decoder", feature_channels=5)  # no example input
    with pytest.raises(ValueError, match=r"outputs shape \(4, 8, 32, 32\).*built for 5"):
        trainer(max_steps=1, callbacks=[cb]).fit(TinySupervisedLike(), loader)
    cb = LRCCallback(feature_layer="head")
    with pytest.raises(TypeError, match="dense"):
        trainer(max_steps=1, callbacks=[cb]).fit(_Pooled(), loader)


class _Pooled(_WithExample):
    """Its ``head`` outputs (B, 1): not dense."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(8, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def training_step(self, batch, batch_idx):
        return self(batch["image_v1"]).mean()


class _Coarse(TinySupervisedLike):
    """A 2x2 feature layer: at most one region of >= 4 feature pixels per image."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        return F.interpolate(self.head(self.pool(self.net(x)[1])), size=x.shape[-2:])


def test_too_coarse_features_warn_once(loader) -> None:
    cb = LRCCallback(feature_layer="pool")
    with pytest.warns(UserWarning, match=r"spatial size \(2, 2\).*region") as caught:
        trainer(max_steps=2, callbacks=[cb]).fit(_Coarse(), loader)
    # Attributed to the user's line (this trainer.fit), not to a frame of lrc_lightning,
    # Lightning or torch.
    ours = [w for w in caught if "spatial size" in str(w.message)]
    assert len(ours) == 1 and ours[0].filename == __file__


class _OnePixel(_Coarse):
    """Its ``pool`` outputs (B, 8, 1, 1): a global vector in a dense shape."""

    def __init__(self, with_example: bool) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        if with_example:
            self.example_input_array = torch.zeros(2, 1, 32, 32)


@pytest.mark.parametrize("with_example", [True, False])
def test_a_one_pixel_feature_layer_is_refused_before_training(loader, with_example) -> None:
    model = _OnePixel(with_example)
    before = [p.detach().clone() for p in model.net.parameters()]
    shape = r"\(2, 8, 1, 1\)" if with_example else r"\(4, 8, 1, 1\)"
    listing = r".*finest first:.*net.decoder" if with_example else ""
    with pytest.raises(ValueError, match=rf"(?s)feature_layer 'pool' outputs shape {shape}: one "
                       rf"feature pixel per image.*finer layer{listing}"):  # fmt: skip
        trainer(max_steps=2, callbacks=[LRCCallback(feature_layer="pool")]).fit(model, loader)
    assert all(torch.equal(a, b) for a, b in zip(before, model.net.parameters(), strict=True))


def test_under_ddp_unknown_channels_are_a_clear_error() -> None:
    """DDP wraps the module before the first step: a lazy head would be too late."""
    from types import SimpleNamespace

    cb = LRCCallback(feature_layer="net.decoder")
    with pytest.raises(ValueError, match=r"before DDP wraps it: give feature_channels"):
        cb._channels(TinySupervisedLike(), None, SimpleNamespace(world_size=2))
    assert cb._channels(TinySupervisedLike(), None, SimpleNamespace(world_size=1)) is None


def test_head_channels_are_inferred_without_any_example(loader) -> None:
    cb = LRCCallback(feature_layer="net.decoder")
    model = TinySupervisedLike()
    trainer(max_steps=2, callbacks=[cb]).fit(model, loader)
    assert cb.head is not None and cb.head.in_channels == 8
    # Materialised for 8 input channels (hidden: the embedding size when inferred).
    assert cb.head.layers[0].weight.shape == (128, 8, 1, 1)


# ---------------------------------------------------------------------- validation loader
_NO_VAL_STEP = "val_dataloader` but have no `validation_step"


class _Validates(TinySupervisedLike):
    def __init__(self) -> None:
        super().__init__()
        self.validated: list[tuple[int, ...]] = []

    def validation_step(self, batch, batch_idx) -> None:
        self.validated.append(tuple(batch["image"].shape))


def _fit_recording_warnings(fit) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit()
    return [str(w.message) for w in caught]


def test_a_module_without_validation_step_fits_without_the_val_dataloader_warning(
    tmp_path,
) -> None:
    """LRCDataModule(val_cases=1) on a module with no validation_step: Lightning sees no
    validation loader (no warning); a module with one still validates the held-out case."""
    run = dict(max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0)
    data = _data(tmp_path, val_cases=1)
    asked: list[int] = []

    class AsksForTheLoader(pl.Callback):  # a user's callback still gets it when it asks
        def on_train_end(self, trainer, pl_module) -> None:
            asked.append(len(trainer.datamodule.val_dataloader()))

    fit = trainer(**run, callbacks=[AsksForTheLoader()]).fit
    messages = _fit_recording_warnings(lambda: fit(TinySupervisedLike(), data))
    assert not [m for m in messages if _NO_VAL_STEP in m]
    assert asked == [1]
    validating = _Validates()
    trainer(**run).fit(validating, _data(tmp_path, val_cases=1))
    assert len(validating.validated) == 1 and validating.validated[0][-2:] == (32, 32)
    # Called by hand (no Trainer attached), the loader is there.
    data = _data(tmp_path, val_cases=1)
    data.prepare_data()
    data.setup("fit")
    assert len(data.val_dataloader()) == 1


def test_lightning_pytorch_module_without_validation_step_gets_no_warning(tmp_path) -> None:
    L = pytest.importorskip("lightning.pytorch")
    from lrc_lightning.frameworks.lightning import LRCDataModule as LDataModule

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinySupervisedLike().net

        def training_step(self, batch, batch_idx):
            return self.net(batch["image_v1"])[1].pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    data = LDataModule(str(DEMO_MR), cache_dir=str(tmp_path / "c"), image_size=32,
                       batch_size=4, val_cases=1)  # fmt: skip
    fit = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False).fit  # fmt: skip
    messages = _fit_recording_warnings(lambda: fit(Plain(), datamodule=data))
    assert not [m for m in messages if _NO_VAL_STEP in m]


# ---------------------------------------------------------------------- checkpoints
def test_callback_checkpoints_load_into_the_unmodified_module_and_resume_the_head(
    tmp_path, loader
) -> None:
    pl.seed_everything(0)
    ckpts = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True)
    cb = LRCCallback(feature_layer="net.decoder")
    trainer(max_steps=2, callbacks=[cb, ckpts], enable_checkpointing=True).fit(
        TinySupervisedLike(), loader
    )
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert not any(k.startswith("lrc_head.") for k in ckpt["state_dict"])
    head_state = ckpt[CHECKPOINT_KEY]["head"]
    assert set(head_state) == set(cb.head.state_dict())
    plain = TinySupervisedLike.load_from_checkpoint(tmp_path / "last.ckpt")  # strict
    assert not hasattr(plain, "lrc_head")

    seen = {}

    class HeadAtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            seen.update({k: v.clone() for k, v in pl_module.lrc_head.state_dict().items()})

    resumed = LRCCallback(feature_layer="net.decoder")
    trainer(max_steps=3, callbacks=[resumed, HeadAtStart()]).fit(
        TinySupervisedLike(), loader, ckpt_path=tmp_path / "last.ckpt"
    )
    assert all(torch.equal(seen[k], v) for k, v in head_state.items())


def test_a_checkpoint_saved_after_fit_carries_the_trained_head(tmp_path, loader) -> None:
    """trainer.save_checkpoint(path) after fit (the head is off the module by then) still
    holds the head, and resuming from it restores the head bit for bit."""
    pl.seed_everything(0)
    cb = LRCCallback(feature_layer="net.decoder")
    fitted = trainer(max_steps=2, callbacks=[cb])
    fitted.fit(TinySupervisedLike(), loader)
    trained = {k: v.clone() for k, v in cb.head.state_dict().items()}
    path = tmp_path / "after_fit.ckpt"
    fitted.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert not any(k.startswith("lrc_head.") for k in ckpt["state_dict"])
    saved = ckpt[CHECKPOINT_KEY]["head"]
    assert set(saved) == set(trained) and all(torch.equal(saved[k], trained[k]) for k in trained)
    assert ckpt[CHECKPOINT_KEY]["feature_layer"] == "net.decoder"

    seen = {}

    class HeadAtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            seen.update({k: v.clone() for k, v in pl_module.lrc_head.state_dict().items()})

    resumed = LRCCallback(feature_layer="net.decoder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=3, callbacks=[resumed, HeadAtStart()]).fit(
            TinySupervisedLike(), loader, ckpt_path=path
        )
    assert not [w for w in caught if "holds no LRC head" in str(w.message)]
    assert set(seen) == set(trained) and all(torch.equal(seen[k], trained[k]) for k in trained)


def test_callback_resume_with_another_head_size_or_layer(tmp_path, loader) -> None:
    """A head size that differs from the checkpoint's is an error naming the option; a
    feature layer of the same channels is a warning naming both layers."""
    cb = LRCCallback(feature_layer="net.decoder", feature_channels=8)
    ckpts = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_steps=1, callbacks=[cb, ckpts], enable_checkpointing=True).fit(
        TinySupervisedLike(), loader
    )
    path = tmp_path / "last.ckpt"
    other = LRCCallback(feature_layer="net.decoder", embedding_dim=64, feature_channels=8)
    with pytest.raises(ValueError, match=r"(?s)cannot resume LRCCallback on TinySupervisedLike"
                       r".*embedding_dim 128 in the checkpoint, 64 now.*embedding_dim=128 in "
                       r"the checkpoint, 64 now.*Resume with the checkpoint's options"):
        trainer(max_steps=2, callbacks=[other]).fit(TinySupervisedLike(), loader, ckpt_path=path)
    layer = LRCCallback(feature_layer="net.encoder", feature_channels=8)
    with pytest.warns(UserWarning, match=r"trained on feature_layer 'net.decoder' with "
                      r"feature_layer 'net.encoder'"):  # fmt: skip
        trainer(max_steps=2, callbacks=[layer]).fit(TinySupervisedLike(), loader, ckpt_path=path)


# ---------------------------------------------------------------------- precision
class _SGDModule(TinySupervisedLike):
    # Adam's eps underflows in pure fp16 (NaN after one step, with or without LRC).
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class _SGDMixin(TinyMoCoLRC):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_half_precision_with_callback_and_mixin(precision, loader) -> None:
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float16
    cb = LRCCallback(feature_layer="net.decoder")
    history = MetricHistory("train/lrc_loss_step")
    trainer(max_steps=3, precision=precision, callbacks=[cb, history]).fit(_SGDModule(), loader)
    assert next(cb.head.parameters()).dtype == dtype
    values = history.history["train/lrc_loss_step"]
    assert len(values) == 3 and all(torch.isfinite(torch.tensor(values)))
    mixin, history = _SGDMixin(), MetricHistory("train/lrc_loss_step")
    trainer(max_steps=3, precision=precision, callbacks=[history]).fit(mixin, loader)
    assert next(mixin.lrc_head.parameters()).dtype == dtype
    assert all(torch.isfinite(torch.tensor(history.history["train/lrc_loss_step"])))


# ---------------------------------------------------------------------- lightning.pytorch
def test_lightning_pytorch_users_get_their_own_callback_mixin_and_data_module(tmp_path) -> None:
    L = pytest.importorskip("lightning.pytorch")
    from lrc_lightning.frameworks.lightning import LRCCallback as LCallback
    from lrc_lightning.frameworks.lightning import LRCDataModule as LDataModule
    from lrc_lightning.frameworks.lightning import LRCMixin as LMixin

    class Reconstruction(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinySupervisedLike().net
            self.out = nn.Conv2d(8, 1, 1)

        def forward(self, x):
            return self.out(self.net(x)[1])

        def training_step(self, batch, batch_idx):
            return (self(batch["image_v1"]) - batch["image_v1"]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class ReconstructionLRC(LMixin, Reconstruction):
        def __init__(self) -> None:
            super().__init__()
            self.init_lrc(config=LRCConfig(embedding_dim=16))

        def training_step(self, batch, batch_idx):
            x1, x2, s1, s2 = self.lrc_inputs(batch)
            lrc = self.lrc_loss(self.net(x1)[1], self.net(x2)[1], s1, s2)
            return super().training_step(batch, batch_idx) + lrc

    cb = LCallback(feature_layer="net.decoder")
    assert isinstance(cb, L.Callback) and not isinstance(cb, pl.Callback)
    data = LDataModule(str(DEMO_MR), cache_dir=str(tmp_path / "c"), image_size=32, batch_size=4)
    assert isinstance(data, L.LightningDataModule) and not isinstance(data, pl.LightningDataModule)
    for model, callbacks in ((Reconstruction(), [cb]), (ReconstructionLRC(), [])):
        seen: list[float] = []

        class Record(L.Callback):
            def __init__(self, seen: list[float]) -> None:
                self.seen = seen

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.seen.append(float(trainer.callback_metrics["train/lrc_loss_step"]))

        L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[*callbacks, Record(seen)]).fit(model, datamodule=data)  # fmt: skip
        assert len(seen) == 2 and all(v > 0 for v in seen)


def test_which_objects_of_the_other_namespace_a_lightning_pytorch_trainer_takes(
    tmp_path, loader
) -> None:
    """What docs/guides/other-frameworks.md says: the top-level (pytorch_lightning) callback
    runs on a lightning.pytorch Trainer; the top-level data module is refused."""
    L = pytest.importorskip("lightning.pytorch")

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinySupervisedLike().net

        def training_step(self, batch, batch_idx):
            views = (batch["image_v1"], batch["image_v2"])
            return sum(self.net(x)[1].pow(2).mean() for x in views)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def make(callbacks=()):
        return L.Trainer(accelerator="cpu", max_steps=1, logger=False, callbacks=list(callbacks),
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip

    cb = LRCCallback(feature_layer="net.decoder")
    make([cb]).fit(Plain(), loader)
    assert cb.head is not None and cb.head.in_channels == 8
    with pytest.raises(ValueError, match="Expected a parent"):
        make().fit(Plain(), datamodule=_data(tmp_path))


# ---------------------------------------------------------------------- channels (RGB backbones)
@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """One super-pixel cache for the tests below (channels are not part of the cache)."""
    return tmp_path_factory.mktemp("shared")


def _first_batch(dm: LRCDataModule, seed: int = 0):
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(seed)  # the same augmentation draw for channels=1 and channels=3
    return next(iter(dm.train_dataloader()))


def _copies(images: torch.Tensor, channels: int, dim: int = 1) -> bool:
    """``images`` has ``channels`` channels on ``dim``, each equal to the first."""
    first = images.narrow(dim, 0, 1)
    return images.shape[dim] == channels and torch.equal(images, first.expand_as(images))


def test_channels_repeats_every_served_image_and_leaves_the_maps(shared) -> None:
    """channels=3: each image the loaders serve (2D pre-training in the dict and the tuple
    formats, device batches, fine-tuning, whole validation volumes) and example_input() has
    3 identical channels equal to the channels=1 image of the same draw; maps and labels are
    the channels=1 ones."""
    one = _first_batch(_data(shared, "dict"))
    three = _first_batch(_data(shared, "dict", channels=3))
    for key in ("image_v1", "image_v2"):
        assert three[key].shape == (4, 3, 32, 32) and _copies(three[key], 3)
        assert torch.equal(three[key][:, :1], one[key])
    for key in ("superpixels_v1", "superpixels_v2"):
        assert three[key].shape == (4, 32, 32) and torch.equal(three[key], one[key])
    (x1, x2), targets, _, (s1, s2) = _first_batch(_data(shared, "lightly", channels=3))
    assert x1.shape == x2.shape == (4, 3, 32, 32) and _copies(x1, 3) and _copies(x2, 3)
    assert s1.shape == s2.shape == (4, 32, 32) and s1.dtype == torch.long
    assert (targets == -1).all()
    dev_one = _first_batch(_data(shared, "solo-learn", device_batches=True))
    dev_three = _first_batch(_data(shared, "solo-learn", device_batches=True, channels=3))
    for v1, v3 in zip(dev_one[1], dev_three[1], strict=True):
        assert v3.shape == (4, 3, 32, 32) and _copies(v3, 3) and torch.equal(v3[:, :1], v1)
    assert all(torch.equal(a, b) for a, b in zip(dev_one[3], dev_three[3], strict=True))
    tune = _first_batch(_data(shared, mode="finetune", channels=2, val_cases=1))
    assert tune["image"].shape == (4, 2, 32, 32) and _copies(tune["image"], 2)
    assert tune["label"].shape == (4, 32, 32)
    dm = _data(shared, mode="finetune", channels=2, val_cases=1, device_batches=True)
    assert _first_batch(dm)["image"].shape == (4, 2, 32, 32)
    volume = next(iter(dm.val_dataloader()))
    assert volume["image"].shape[2] == 2 and _copies(volume["image"], 2, dim=2)
    assert volume["label"].ndim == 4  # (1, S, H, W)
    example = _data(shared, channels=3)
    example.prepare_data()
    example.setup("fit")
    assert example.example_input().shape == (2, 3, 32, 32)


def test_channels_for_3d_patches(shared) -> None:
    dm = LRCDataModule(str(DEMO_MR), cache_dir=str(shared / "cache3d"), image_size=32,
                       spatial_dims=3, patch_size=(8, 16, 16), batch_size=2,
                       channels=3)  # fmt: skip
    batch = _first_batch(dm)
    assert batch["image_v1"].shape == (2, 3, 8, 16, 16) and _copies(batch["image_v1"], 3)
    assert batch["superpixels_v1"].shape == (2, 8, 16, 16)
    assert dm.example_input().shape == (2, 3, 8, 16, 16)


@pytest.mark.parametrize("channels", [0, -1, 1.5, True, "3"])
def test_channels_must_be_a_positive_integer(shared, channels) -> None:
    with pytest.raises(ValueError, match=r"channels must be an integer >= 1 \(3 for a "
                       rf"backbone that expects RGB input\), got {channels!r}"):  # fmt: skip
        _data(shared, channels=channels)


# ---------------------------------------------------------------------- unlabelled targets
class _SoloWithClassifier(SoloStyleSimCLR):
    """solo-learn's BaseMethod: an online linear classifier on detached features, its loss
    ``F.cross_entropy(logits, targets, ignore_index=-1)`` added to the method's loss."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(8, 4)

    def _base_shared_step(self, x: torch.Tensor, targets: torch.Tensor) -> dict:
        logits = self.classifier(self.backbone(x)[0].mean((2, 3)).detach())
        return {"logits": logits, "loss": F.cross_entropy(logits, targets, ignore_index=-1)}

    def training_step(self, batch, batch_idx):
        _, views, targets = batch
        class_loss = sum(self._base_shared_step(x, targets)["loss"] for x in views) / 2
        self.log("train/class_loss", class_loss)
        return super().training_step(batch, batch_idx) + class_loss


class _SoloWithClassifierFixed(_SoloWithClassifier):
    """The guide's recipe ('Targets'): the classifier's mean over the labelled targets,
    0 when a batch has none."""

    def _base_shared_step(self, x, targets):
        out = super()._base_shared_step(x, targets)
        labelled = (targets != -1).sum().clamp(min=1)
        out["loss"] = F.cross_entropy(out["logits"], targets, ignore_index=-1,
                                      reduction="sum") / labelled  # fmt: skip
        return out


def test_unlabelled_targets_and_a_classifier_loss(shared) -> None:
    """Tuple batches' targets are -1 (unlabelled). solo-learn's online classifier loss on
    them is NaN: the callback names that at the first step instead of training on a NaN
    loss; the guide's recipe gives a finite classifier loss and training goes on."""
    guide = (ROOT / "docs" / "guides" / "other-frameworks.md").read_text()
    assert "### Targets" in guide and "reduction=\"sum\") / labelled" in guide
    cb = LRCCallback(feature_layer="backbone.decoder", batch_format="solo-learn")
    with pytest.raises(ValueError, match=r"(?s)_SoloWithClassifier.training_step returned a "
                       r"non-finite loss \(nan\).*'solo-learn' batch whose targets are all -1"
                       r".*ignore_index=-1.*other-frameworks.md, 'Targets'"):  # fmt: skip
        trainer(max_steps=2, callbacks=[cb]).fit(_SoloWithClassifier(),
                                                 _data(shared, "solo-learn"))  # fmt: skip
    history = MetricHistory("train/class_loss", "train/lrc_loss_step")
    cb = LRCCallback(feature_layer="backbone.decoder", batch_format="solo-learn")
    model = _SoloWithClassifierFixed()
    trainer(max_steps=2, callbacks=[cb, history]).fit(model, _data(shared, "solo-learn"))
    assert history.history["train/class_loss"] == [0.0, 0.0]
    assert len(history.history["train/lrc_loss_step"]) == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # With labelled targets the recipe is solo-learn's mean (ignore_index=-1) exactly.
    logits, targets = torch.randn(4, 4), torch.tensor([2, -1, 0, -1])
    fixed = F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum") / 2
    assert torch.allclose(fixed, F.cross_entropy(logits, targets, ignore_index=-1))


# ---------------------------------------------------------------------- resume without it
@pytest.mark.parametrize("module_cls", [TinySupervisedLike, _SoloLearnableParams])
def test_resuming_an_lrc_checkpoint_without_the_callback_says_what_to_do(
    shared, tmp_path, module_cls
) -> None:
    """A checkpoint of a fit with LRCCallback holds the head in its optimizer state: a
    Trainer without the callback gets an error naming the checkpoint, the callback's options
    and both ways on (add the callback; load the weights only), not an optimizer-group size
    error. With the callback it resumes; a fit without LRCCallback writes no entry."""
    fmt, layer = ("dict", "net.decoder") if module_cls is TinySupervisedLike else (
        "solo-learn", "backbone.decoder")  # fmt: skip
    ckpts = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    lrc = LRCCallback(feature_layer=layer, batch_format=fmt)
    trainer(max_steps=2, callbacks=[lrc, ckpts], enable_checkpointing=True).fit(
        module_cls(), _data(shared, fmt)
    )
    path = tmp_path / "last.ckpt"
    options = f"feature_layer={layer!r}" + (", batch_format='solo-learn'" if fmt != "dict" else "")
    expected = (rf"(?s)checkpoint {path} was saved by a fit with LRCCallback\({options}\).*"
                rf"add LRCCallback\({options}\) to the Trainer's callbacks.*load the weights "
                rf"only: {module_cls.__name__}.load_from_checkpoint\(path\).*without ckpt_path")
    with pytest.raises(ValueError, match=expected):
        trainer(max_steps=3).fit(module_cls(), _data(shared, fmt), ckpt_path=path)
    # The way on with the callback, and the weights-only way.
    again = LRCCallback(feature_layer=layer, batch_format=fmt)
    resumed = trainer(max_steps=3, callbacks=[again])
    resumed.fit(module_cls(), _data(shared, fmt), ckpt_path=path)
    assert resumed.global_step == 3
    module_cls.load_from_checkpoint(path)  # strict
    # trainer.save_checkpoint after fit records it too (the optimizer still holds the head).
    resumed.save_checkpoint(tmp_path / "after.ckpt")
    with pytest.raises(ValueError, match="was saved by a fit with LRCCallback"):
        trainer(max_steps=4).fit(module_cls(), _data(shared, fmt),
                                 ckpt_path=tmp_path / "after.ckpt")  # fmt: skip
    plain = trainer(max_steps=1)
    plain.fit(module_cls(), _data(shared, fmt, superpixels_in_batch=fmt == "dict"))
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    assert "LRCDataModule" not in torch.load(tmp_path / "plain.ckpt", weights_only=True)


# ---------------------------------------------------------------------- a fit that raises
class _FailsAtStep3(_SoloLearnableParams):
    fail = True

    def training_step(self, batch, batch_idx):
        if self.fail and batch_idx == 2:
            raise RuntimeError("the user's step fails at step 3")
        return super().training_step(batch, batch_idx)


#: The module methods the callback wraps on the instance while fitting.
_WRAPPED = {"training_step", "on_save_checkpoint", "on_load_checkpoint"}


def _hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_a_fit_that_raises_leaves_the_module_as_it_found_it(shared) -> None:
    """An exception in training_step at step 3 (and one from the callback's own check in
    on_fit_start): the module keeps no hook, wrapped method, swapped class or head, and a
    second fit in the same process with a fresh Trainer and callback trains (notebooks)."""
    model = _FailsAtStep3()
    hooks = _hooks(model)
    first = LRCCallback(feature_layer="backbone.decoder", batch_format="solo-learn")
    with pytest.raises(RuntimeError, match="fails at step 3"):
        trainer(max_steps=5, callbacks=[first]).fit(model, _data(shared, "solo-learn"))
    assert _hooks(model) == hooks and not _WRAPPED & set(vars(model))
    assert type(model) is _FailsAtStep3 and not hasattr(model, "lrc_head")
    assert [g["name"] for g in model.learnable_params] == ["backbone"]
    model.fail = False
    second = LRCCallback(feature_layer="backbone.decoder", batch_format="solo-learn")
    history = MetricHistory("train/lrc_loss_step")
    fit = trainer(max_steps=2, callbacks=[second, history])
    fit.fit(model, _data(shared, "solo-learn"))
    assert len(history.history["train/lrc_loss_step"]) == 2
    in_optimizer = {id(p) for g in fit.optimizers[0].param_groups for p in g["params"]}
    expected = {id(p) for p in (*model.backbone.parameters(), *second.head.parameters())}
    assert in_optimizer == expected  # the first callback's head is in no later optimizer
    assert _hooks(model) == hooks and not hasattr(model, "lrc_head")

    class NoHeadInOptimizer(TinySupervisedLike):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.1)

    refused = NoHeadInOptimizer()
    hooks = _hooks(refused)
    with pytest.raises(RuntimeError, match="did not include its parameters"):
        trainer(max_steps=1, callbacks=[LRCCallback(feature_layer="net.decoder")]).fit(
            refused, _data(shared)
        )
    assert _hooks(refused) == hooks and not _WRAPPED & set(vars(refused))
    assert not hasattr(refused, "lrc_head")
