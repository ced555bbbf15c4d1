"""lightly's BYOL and a solo-learn-structured MoCoV2Plus with LRC, run for real.

Marked ``thirdparty``: they need lightly / torchvision / lightning, which .ci/run installs in
its second venv (there a missing library fails the test; elsewhere it skips). Both modules
keep their library's structure, and LRC is added only through the public API: the data
module's ``batch_format`` and ``channels=3`` (the ResNets keep their RGB first layer) and
an ``LRCCallback``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from .conftest import DEMO_MR, require_thirdparty
from .helpers import MetricHistory, trainer

pytestmark = pytest.mark.thirdparty

SIZE = 64  # slices of 64x64: ResNet layer1 16x16, layer2 8x8


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


# ---------------------------------------------------------------------- lightly BYOL
def _lightly_byol() -> type:
    """lightly's documented BYOL LightningModule (torchvision ResNet-18, lightly's heads,
    loss and momentum helpers), unchanged apart from a log line and smaller heads."""
    require_thirdparty("lightly")
    import torchvision
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    class BYOL(pl.LightningModule):
        def __init__(self):
            super().__init__()
            resnet = torchvision.models.resnet18()
            self.backbone = nn.Sequential(*list(resnet.children())[:-1])
            self.projection_head = BYOLProjectionHead(512, 256, 64)
            self.prediction_head = BYOLPredictionHead(64, 256, 64)

            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)

            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

            self.criterion = NegativeCosineSimilarity()

        def forward(self, x):
            y = self.backbone(x).flatten(start_dim=1)
            z = self.projection_head(y)
            p = self.prediction_head(z)
            return p

        def forward_momentum(self, x):
            y = self.backbone_momentum(x).flatten(start_dim=1)
            z = self.projection_head_momentum(y)
            z = z.detach()
            return z

        def training_step(self, batch, batch_idx):
            momentum = cosine_schedule(self.current_epoch, 10, 0.996, 1)
            update_momentum(self.backbone, self.backbone_momentum, m=momentum)
            update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)
            (x0, x1) = batch[0]
            p0 = self.forward(x0)
            z0 = self.forward_momentum(x0)
            p1 = self.forward(x1)
            z1 = self.forward_momentum(x1)
            loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
            self.log("train/byol_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.06)

    return BYOL


class _Probe(pl.Callback):
    """The head at the start of training and every gradient of the first backward."""

    def __init__(self) -> None:
        self.head_start: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.head_start = {k: v.clone() for k, v in pl_module.lrc_head.state_dict().items()}

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters()
                          if p.grad is not None}  # fmt: skip


def test_lightly_byol_gets_lrc_through_the_callback(cache) -> None:
    """lightly's BYOL + LRCDataModule(batch_format="lightly", channels=3) + LRCCallback: the
    LRC loss is logged and finite, the head gets gradients and trains, and the dense layer
    (ResNet layer1) and the layers before it get LRC's gradient while the layers after it
    and the heads get none (the first step's gradients with lambda=1 and lambda=0)."""
    from lrc_lightning import LRCCallback, LRCDataModule

    BYOL = _lightly_byol()

    def run(weight: float, steps: int) -> tuple[LRCCallback, _Probe, MetricHistory]:
        pl.seed_everything(0)
        model = BYOL()
        data = LRCDataModule(str(DEMO_MR), cache_dir=str(cache), image_size=SIZE,
                             batch_size=4, batch_format="lightly", channels=3)  # fmt: skip
        lrc = LRCCallback(feature_layer="backbone.4", batch_format="lightly", weight=weight)
        probe, history = _Probe(), MetricHistory("train/lrc_loss_step", "train/byol_loss")
        trainer(max_steps=steps, callbacks=[lrc, probe, history]).fit(model, data)
        return lrc, probe, history

    lrc, probe, history = run(1.0, 3)
    values = history.history["train/lrc_loss_step"]
    assert len(values) == 3 and all(torch.isfinite(torch.tensor(values))) and min(values) > 0
    assert len(history.history["train/byol_loss"]) == 3
    assert lrc.extra_forwards == 0  # BYOL runs both views online: no target_layer needed
    assert probe.grads is not None
    head_grads = {n: g for n, g in probe.grads.items() if n.startswith("lrc_head.")}
    assert head_grads and all(g.abs().sum() > 0 for g in head_grads.values())
    trained = lrc.head.state_dict()
    for name in ("layers.0.weight", "layers.3.weight"):
        assert not torch.equal(trained[name], probe.head_start[name])

    _, without, _ = run(0.0, 1)
    assert without.grads is not None
    with_lrc = {n: g for n, g in probe.grads.items() if not n.startswith("lrc_head.")}
    assert set(with_lrc) == {n for n in without.grads if not n.startswith("lrc_head.")}
    reached = [n for n in with_lrc if not torch.allclose(with_lrc[n], without.grads[n],
                                                         rtol=1e-5, atol=1e-8)]  # fmt: skip
    # Sequential indices: 0 conv1, 1 bn1, 4 layer1 (the feature layer), 5.. layer2..
    assert reached and all(n.split(".")[1] in {"0", "1", "4"} for n in reached), reached
    assert any(n.startswith("backbone.4.") for n in reached)
    layer1 = [n for n in reached if n.startswith("backbone.4.")]
    difference = sum(float((with_lrc[n] - without.grads[n]).norm()) for n in layer1)
    assert difference > 1e-3 * sum(float(without.grads[n].norm()) for n in layer1)


# ---------------------------------------------------------------------- solo-learn structure
def _solo_learn_mocov2plus() -> tuple[type, type, type]:
    """solo-learn's BaseMethod + BaseMomentumMethod + MoCoV2Plus, reduced to their structure
    (solo-learn cannot be installed with Lightning 2): built on ``lightning.pytorch``, an
    optimizer from the ``learnable_params`` groups, a torchvision ResNet-18 that expects 3
    channels, a channels-last ``forward`` with an online classifier on detached features
    (``cross_entropy(..., ignore_index=-1)``), both views through the online and the
    momentum branches, a queue, and the momentum update in ``on_train_batch_end``.

    Returns the method, the method with the guide's targets recipe, and a callback class of
    the ``lightning.pytorch`` namespace that records the head at the start of training.
    """
    L = require_thirdparty("lightning.pytorch")
    require_thirdparty("torchvision")
    import torchvision

    def mocov2plus_loss(query, key, queue, temperature):
        pos = torch.einsum("nc,nc->n", [query, key]).unsqueeze(-1)
        neg = torch.einsum("nc,ck->nk", [query, queue])
        logits = torch.cat([pos, neg], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long))

    class MoCoV2Plus(L.LightningModule):
        def __init__(self, num_classes: int = 4, proj_output_dim: int = 64,
                     queue_size: int = 32, temperature: float = 0.2) -> None:  # fmt: skip
            super().__init__()
            self.save_hyperparameters()
            self.backbone = torchvision.models.resnet18()
            self.features_dim = self.backbone.inplanes
            self.backbone.fc = nn.Identity()
            self.classifier = nn.Linear(self.features_dim, num_classes)
            self.projector = nn.Sequential(nn.Linear(self.features_dim, 256), nn.ReLU(),
                                           nn.Linear(256, proj_output_dim))  # fmt: skip
            self.momentum_backbone = copy.deepcopy(self.backbone)
            self.momentum_projector = copy.deepcopy(self.projector)
            for p in [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]:
                p.requires_grad = False
            queue = F.normalize(torch.randn(2, proj_output_dim, queue_size), dim=1)
            self.register_buffer("queue", queue)
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
            self.num_large_crops = 2

        @property
        def learnable_params(self) -> list[dict]:
            return [
                {"name": "backbone", "params": self.backbone.parameters()},
                {"name": "classifier", "params": self.classifier.parameters(), "lr": 0.1,
                 "weight_decay": 0},
                {"name": "projector", "params": self.projector.parameters()},
            ]  # fmt: skip

        def configure_optimizers(self):
            return torch.optim.SGD(self.learnable_params, lr=0.05, momentum=0.9,
                                   weight_decay=1e-5)  # fmt: skip

        def forward(self, X):
            X = X.to(memory_format=torch.channels_last)
            feats = self.backbone(X)
            logits = self.classifier(feats.detach())
            z = F.normalize(self.projector(feats), dim=-1)
            return {"logits": logits, "feats": feats, "z": z}

        @torch.no_grad()
        def momentum_forward(self, X):
            X = X.to(memory_format=torch.channels_last)
            feats = self.momentum_backbone(X)
            return {"feats": feats, "z": F.normalize(self.momentum_projector(feats), dim=-1)}

        def _base_shared_step(self, X, targets):
            out = self(X)
            out["loss"] = F.cross_entropy(out["logits"], targets, ignore_index=-1)
            return out

        def training_step(self, batch, batch_idx):
            _, X, targets = batch
            outs = [self._base_shared_step(x, targets) for x in X[: self.num_large_crops]]
            class_loss = sum(out["loss"] for out in outs) / self.num_large_crops
            k1, k2 = (self.momentum_forward(x)["z"] for x in X[: self.num_large_crops])
            q1, q2 = outs[0]["z"], outs[1]["z"]
            queue = self.queue.clone().detach()
            t = self.hparams.temperature
            nce_loss = (mocov2plus_loss(q1, k2, queue[1], t)
                        + mocov2plus_loss(q2, k1, queue[0], t)) / 2  # fmt: skip
            self._dequeue_and_enqueue(torch.stack((k1, k2)))
            self.log_dict({"train_nce_loss": nce_loss, "train_class_loss": class_loss})
            return nce_loss + class_loss

        @torch.no_grad()
        def _dequeue_and_enqueue(self, keys):
            b, ptr = keys.shape[1], int(self.queue_ptr)
            self.queue[:, :, ptr : ptr + b] = keys.permute(0, 2, 1)
            self.queue_ptr[0] = (ptr + b) % self.queue.shape[-1]

        def on_train_batch_end(self, outputs, batch, batch_idx):
            pairs = ((self.backbone, self.momentum_backbone),
                     (self.projector, self.momentum_projector))  # fmt: skip
            for online, momentum in pairs:
                for p, m in zip(online.parameters(), momentum.parameters(), strict=True):
                    m.data.mul_(0.99).add_(p.data, alpha=0.01)

    class MoCoV2PlusLRC(MoCoV2Plus):
        """The guide's 'Targets' recipe: the classifier's mean over labelled targets."""

        def _base_shared_step(self, X, targets):
            out = super()._base_shared_step(X, targets)
            labelled = (targets != -1).sum().clamp(min=1)
            out["loss"] = F.cross_entropy(out["logits"], targets, ignore_index=-1,
                                          reduction="sum") / labelled  # fmt: skip
            return out

    class HeadAtStart(L.Callback):
        def __init__(self) -> None:
            self.head: dict[str, torch.Tensor] = {}
            self.groups: list[str] = []

        def on_train_start(self, trainer, pl_module) -> None:
            self.head = {k: v.clone() for k, v in pl_module.lrc_head.state_dict().items()}
            self.groups = [g["name"] for g in trainer.optimizers[0].param_groups]

    return MoCoV2Plus, MoCoV2PlusLRC, HeadAtStart


def test_solo_learn_structured_mocov2plus_with_learnable_params_and_three_channels(
    cache, tmp_path
) -> None:
    """The head joins ``learnable_params`` as the group ``lrc_head`` and trains; the online
    classifier's NaN on unlabelled targets is named at the first step, and the guide's
    recipe trains; a checkpoint keeps the head outside the state_dict (strict reload into
    the method) and resuming restores it."""
    MoCoV2Plus, MoCoV2PlusLRC, HeadAtStart = _solo_learn_mocov2plus()
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lrc_lightning.lightning import LRCCallback, LRCDataModule

    def data() -> LRCDataModule:
        return LRCDataModule(str(DEMO_MR), cache_dir=str(cache), image_size=SIZE, batch_size=4,
                             batch_format="solo-learn", channels=3)  # fmt: skip

    def fit(steps: int, callbacks: list, model, **kwargs) -> L.Trainer:
        run = L.Trainer(max_steps=steps, callbacks=callbacks, accelerator="cpu", devices=1,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, default_root_dir=tmp_path,
                        enable_checkpointing=any(isinstance(c, ModelCheckpoint)
                                                 for c in callbacks))  # fmt: skip
        run.fit(model, datamodule=data(), **kwargs)
        return run

    def callback() -> LRCCallback:
        return LRCCallback(feature_layer="backbone.layer2", batch_format="solo-learn")

    with pytest.raises(ValueError, match=r"(?s)MoCoV2Plus.training_step returned a non-finite "
                       r"loss.*targets are all -1"):  # fmt: skip
        fit(1, [callback()], MoCoV2Plus())

    L.seed_everything(0)
    model, lrc, start = MoCoV2PlusLRC(), callback(), HeadAtStart()
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    run = fit(3, [lrc, start, ckpts], model)
    assert start.groups == ["backbone", "classifier", "projector", "lrc_head"]
    group = run.optimizers[0].param_groups[3]["params"]
    assert {id(p) for p in group} == {id(p) for p in lrc.head.parameters()}
    trained = {k: v.clone() for k, v in lrc.head.state_dict().items()}
    assert not torch.equal(trained["layers.0.weight"], start.head["layers.0.weight"])
    assert lrc.extra_forwards == 0  # both views through the online backbone, channels-last
    metrics = run.callback_metrics
    assert torch.isfinite(metrics["train/lrc_loss_step"]) and metrics["train/lrc_loss_step"] > 0
    assert float(metrics["train_class_loss"]) == 0.0  # the recipe on unlabelled batches
    assert type(model) is MoCoV2PlusLRC and not hasattr(model, "lrc_head")

    path = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    assert not any(k.startswith("lrc_head.") for k in ckpt["state_dict"])
    saved = ckpt["lrc_lightning"]["head"]
    assert set(saved) == set(trained) and all(torch.equal(saved[k], trained[k]) for k in saved)
    MoCoV2PlusLRC.load_from_checkpoint(path)  # strict: the method's own state_dict

    again, resumed_start = callback(), HeadAtStart()
    resumed = fit(4, [again, resumed_start], MoCoV2PlusLRC(), ckpt_path=path)
    assert resumed.global_step == 4
    assert resumed_start.groups == ["backbone", "classifier", "projector", "lrc_head"]
    assert all(torch.equal(resumed_start.head[k], saved[k]) for k in saved)
