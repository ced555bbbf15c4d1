"""Reference models: shapes, MoCo queue and momentum, strict weight loading, Dice, probe."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lrc_lightning.evaluation.probe import fit_pixel_classifier, sample_pixels
from lrc_lightning.models import (
    FineTuneSegmentation,
    MoCoV2,
    MoCoV2LRC,
    SupervisedSegmentation,
    UNet2d,
    UNet3d,
    load_backbone_weights,
)
from lrc_lightning.models.metrics import dice_per_organ, nanmean, soft_dice_loss
from tests.helpers import PairedSlices, trainer


@pytest.mark.parametrize("depth", [1, 3])
def test_unet_shapes_and_channels(depth: int) -> None:
    net = UNet2d(width=4, depth=depth, norm="group")
    x = torch.randn(2, 1, 32, 32)
    bottleneck, decoder = net.forward_features(x)
    assert bottleneck.shape == (2, 4 * 2**depth, 32 // 2**depth, 32 // 2**depth)
    assert [f.shape[1] for f in decoder] == net.decoder_channels
    assert decoder[-1].shape == (2, 4, 32, 32) == net(x).shape
    assert [f.shape[-1] for f in decoder] == [32 // 2 ** (depth - 1 - i) for i in range(depth)]


def test_unet_rejects_bad_input_and_arguments() -> None:
    with pytest.raises(ValueError, match="divisible by 8"):
        UNet2d(width=4, depth=3)(torch.randn(1, 1, 36, 36))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        UNet2d(width=4, depth=1)(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="norm must be"):
        UNet2d(norm="layer")  # type: ignore[arg-type]


def test_moco_queue_wraps_around() -> None:
    model = MoCoV2(UNet2d(width=4, depth=1), queue_size=5, projection_dim=3)
    keys = torch.eye(3)
    model.enqueue(keys)
    model.enqueue(-keys)
    assert int(model.queue_ptr) == 1
    torch.testing.assert_close(model.queue[:1], -keys[2:])
    torch.testing.assert_close(model.queue[1:3], keys[1:])
    torch.testing.assert_close(model.queue[3:5], -keys[:2])


def _moco_for_keys(groups: int) -> MoCoV2:
    torch.manual_seed(0)
    model = MoCoV2(UNet2d(width=4, depth=2), queue_size=8, key_bn_groups=groups)
    return model.train()


def test_shuffle_bn_key_depends_on_no_other_sample_of_its_batch() -> None:
    """The MoCo BatchNorm leak: with the batch's own statistics, a key changes when *other*
    images of the batch change, so a query can find its positive through batch statistics.
    With one image per key sub-batch, a key depends on its own image only."""
    images = torch.rand(4, 1, 16, 16)
    others = images.clone()
    others[1:] = torch.rand(3, 1, 16, 16) * 3.0
    leaky = _moco_for_keys(groups=1)
    assert not torch.allclose(leaky.key(images)[0], leaky.key(others)[0], atol=1e-4)
    model = _moco_for_keys(groups=4)
    torch.testing.assert_close(model.key(images)[0], model.key(others)[0])
    # ...while the key is still that image's key (not a constant), in input order.
    expected = torch.cat([model.encode_keys(images[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(model.key(images), expected)


def test_shuffle_bn_keys_come_from_random_sub_batches_in_input_order() -> None:
    """Two sub-batches of two: every call's keys equal the keys of one of the three pairings
    of the four images (each pair with its own statistics), returned in input order, and
    the pairing changes from call to call."""
    images = torch.rand(4, 1, 16, 16)
    model = _moco_for_keys(groups=2)
    pairings = {((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2))}
    references = {}
    for pairing in pairings:
        keys = torch.empty(4, 128)
        for pair in pairing:
            keys[list(pair)] = model.encode_keys(images[list(pair)])
        references[pairing] = keys
    seen = set()
    for _ in range(12):
        keys = model.key(images)
        match = [p for p, ref in references.items() if torch.allclose(keys, ref, atol=1e-5)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) >= 2


def test_shuffle_bn_on_an_uneven_batch_normalises_each_sub_batch_separately() -> None:
    """A last batch of 7 with key_bn_groups=2: sub-batches of 4 and 3 of the permutation,
    each with its own statistics, keys in input order (no crash, no image left out)."""
    images = torch.rand(7, 1, 16, 16)
    model = _moco_for_keys(groups=2)
    torch.manual_seed(5)
    keys = model.key(images)
    torch.manual_seed(5)
    order = torch.randperm(7)
    reference = torch.empty(7, 128)
    for sub in (order[:4], order[4:]):
        reference[sub] = model.encode_keys(images[sub])
    torch.testing.assert_close(keys, reference)
    assert not torch.allclose(keys, model.encode_keys(images), atol=1e-4)  # groups matter
    # Fewer images than groups: one image per sub-batch.
    three = images[:3]
    expected = torch.cat([model.encode_keys(three[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(_moco_for_keys(groups=4).key(three), expected)
    # In a Trainer: 15 slices in batches of 8, the second batch holds 7.
    model = MoCoV2(UNet2d(width=4, depth=2), queue_size=32, key_bn_groups=2)
    t = trainer(max_epochs=1)
    t.fit(model, DataLoader(PairedSlices(n=15), batch_size=8))
    assert t.global_step == 2 and int(model.queue_ptr) == 2 * (8 + 7)


def test_moco_contrast_known_value() -> None:
    model = MoCoV2(UNet2d(width=4, depth=1), queue_size=2, projection_dim=2, temperature=1.0)
    model.queue.copy_(torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    q = k = torch.tensor([[1.0, 0.0]])
    expected = -torch.log(torch.exp(torch.tensor(1.0)) / (torch.e + 2.0))
    torch.testing.assert_close(model.contrast(q, k), expected)


def test_momentum_update_follows_optimizer_steps_and_key_encoder_is_frozen() -> None:
    model = MoCoV2(UNet2d(width=4, depth=1), queue_size=16, momentum=0.5, lr=1e-2)
    before = [p.detach().clone() for p in model.key_backbone.parameters()]
    t = trainer(max_steps=3, accumulate_grad_batches=2)
    t.fit(model, DataLoader(PairedSlices(n=8), batch_size=2))
    assert t.global_step == 3
    assert int(model.momentum_updates) == 3  # six batches, three optimizer steps
    optimized = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in model.key_backbone.parameters())
    assert not any(id(p) in optimized for p in model.key_projector.parameters())
    after = list(model.key_backbone.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_momentum_update_formula_on_known_tensors() -> None:
    """key <- m * key + (1 - m) * online, on the real module's parameters; BatchNorm
    statistics are copied from the online encoder."""
    model = MoCoV2(UNet2d(width=4, depth=1), queue_size=8, momentum=0.9)
    online = [*model.backbone.parameters(), *model.projector.parameters()]
    keys = [*model.key_backbone.parameters(), *model.key_projector.parameters()]
    with torch.no_grad():
        for p in online:
            p.fill_(2.0)
        for p in keys:
            p.fill_(1.0)
        for b in model.backbone.buffers():
            b.fill_(3)
    model.update_key_encoder()
    for p in keys:  # 0.9 * 1 + 0.1 * 2 (inverted: 0.1 * 1 + 0.9 * 2 = 1.9)
        torch.testing.assert_close(p, torch.full_like(p, 1.1))
    model.update_key_encoder()
    for p in keys:
        torch.testing.assert_close(p, torch.full_like(p, 0.9 * 1.1 + 0.1 * 2.0))
    assert all(b.eq(3).all() for b in model.key_backbone.buffers())
    assert int(model.momentum_updates) == 2


def test_momentum_update_under_gradient_accumulation_follows_optimizer_steps() -> None:
    """With accumulate_grad_batches=2 the key encoder moves once per optimizer step, towards
    the online weights of that step: the EMA of the online weights after steps 1 and 2."""
    torch.manual_seed(0)
    model = MoCoV2(UNet2d(width=4, depth=1), queue_size=16, momentum=0.7, optimizer="sgd",
                   lr=0.1)  # fmt: skip
    start = [p.detach().clone() for p in model.key_backbone.parameters()]
    snapshots: list[list[torch.Tensor]] = []

    class AfterEachOptimizerStep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if (batch_idx + 1) % 2 == 0:
                snapshots.append([p.detach().clone() for p in pl_module.backbone.parameters()])

    t = trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[AfterEachOptimizerStep()])
    t.fit(model, DataLoader(PairedSlices(n=8), batch_size=2))
    assert len(snapshots) == 2 and int(model.momentum_updates) == 2
    expected = start
    for online in snapshots:
        expected = [0.7 * k + 0.3 * o for k, o in zip(expected, online, strict=True)]
    for got, want in zip(model.key_backbone.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(snapshots[0][0], snapshots[1][0])  # the online weights moved


def test_resuming_with_other_sizes_names_the_option_that_differs(tmp_path) -> None:
    """Another head size, feature level or projection size than the checkpoint's: an error
    naming the option and both values, not load_state_dict's size mismatch."""
    from lrc_lightning import LRCConfig

    loader = DataLoader(PairedSlices(n=4), batch_size=4)
    t = trainer(max_steps=1)
    t.fit(MoCoV2LRC(UNet2d(width=4, depth=2), queue_size=8), loader)
    path = tmp_path / "run.ckpt"
    t.save_checkpoint(path)
    cases = [
        (dict(lrc=LRCConfig(embedding_dim=64)),
         r"LRC projection head has other sizes \(embedding_dim 128 in the checkpoint, 64 now\)"
         r", from the LRC option\(s\) embedding_dim=128 in the checkpoint, 64 now"),
        (dict(lrc=LRCConfig(feature_level=-2)),
         r"feature channels 4 in the checkpoint, 8 now.*feature_level=-1 in the checkpoint, "
         r"-2 now\..*come from .*lrc\.feature_level"),
        (dict(projection_dim=64),
         r"projector\.2\.weight \(128, 512\) in the checkpoint, \(64, 512\) now.*"
         r"the hyper-parameters that differ: projection_dim=128 in the checkpoint, 64 now\."),
    ]  # fmt: skip
    for kwargs, message in cases:
        model = MoCoV2LRC(UNet2d(width=4, depth=2), queue_size=8, **kwargs)
        with pytest.raises(ValueError, match=f"(?s)cannot resume MoCoV2LRC.*{message}.*"
                           "Resume with the checkpoint's options"):  # fmt: skip
            trainer(max_steps=2).fit(model, loader, ckpt_path=path)


def test_moco_lrc_backpropagates_lrc_into_decoder_only_through_query() -> None:
    model = MoCoV2LRC(UNet2d(width=4, depth=2), queue_size=8)
    batch = next(iter(DataLoader(PairedSlices(n=4), batch_size=4)))
    model.training_step(batch, 0).backward()
    assert model.backbone.decoders[-1][0].weight.grad.abs().sum() > 0
    assert model.lrc_head.layers[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.key_backbone.parameters())


def test_lrc_alone_has_no_global_branch() -> None:
    model = MoCoV2LRC(UNet2d(width=4, depth=1), global_weight=0.0)
    assert not hasattr(model, "key_backbone") and not hasattr(model, "projector")
    with pytest.raises(ValueError, match="no loss"):
        MoCoV2(UNet2d(width=4, depth=1), global_weight=0.0)


def test_strict_loading_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = UNet2d(width=4, depth=2).state_dict()
    state.pop("bottleneck.0.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_backbone_weights(UNet2d(width=4, depth=2), path)
    message = str(info.value)
    assert "w.pt" in message
    assert "missing keys (1): bottleneck.0.weight" in message
    assert "unexpected keys (1): extra.weight" in message
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        FineTuneSegmentation(UNet2d(width=4, depth=2), pretrained=str(tmp_path / "nope.pt"))


def test_finetune_loads_exact_weights(tmp_path: Path) -> None:
    source = UNet2d(width=4, depth=2)
    torch.save(source.state_dict(), tmp_path / "b.pt")
    model = FineTuneSegmentation(UNet2d(width=4, depth=2), pretrained=str(tmp_path / "b.pt"),
                                 freeze_backbone=True)  # fmt: skip
    for a, b in zip(model.backbone.state_dict().values(), source.state_dict().values(),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_dice_known_values_and_undefined_organs() -> None:
    prediction = torch.tensor([[[0, 1, 1, 2]], [[0, 1, 0, 0]]])
    target = torch.tensor([[[0, 1, 0, 0]], [[0, 1, -1, 0]]])
    dice = dice_per_organ(prediction, target, num_classes=3)
    # sample 0: organ 1 2*1/(2+1); organ 2 predicted, absent: 0. sample 1: 1; organ 2 undefined
    torch.testing.assert_close(dice[0], torch.tensor([2 / 3, 0.0]))
    assert dice[1, 0] == 1.0 and dice[1, 1].isnan()
    torch.testing.assert_close(nanmean(dice, dim=0), torch.tensor([5 / 6, 0.0]))
    assert nanmean(torch.tensor([float("nan")])).isnan()


def test_soft_dice_loss_perfect_and_gradient() -> None:
    target = torch.tensor([[[0, 1], [2, -1]]])
    perfect = torch.nn.functional.one_hot(target.clamp(min=0), 3).permute(0, 3, 1, 2) * 50.0
    assert soft_dice_loss(perfect.float(), target) < 1e-3
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    soft_dice_loss(logits, target).backward()
    assert logits.grad.abs().sum() > 0
    assert logits.grad[..., 1, 1].abs().sum() == 0  # the ignored pixel


def test_supervised_volume_dice_is_3d() -> None:
    model = SupervisedSegmentation(UNet2d(width=4, depth=1), num_classes=3)
    label = torch.zeros(4, 8, 8, dtype=torch.long)
    label[1, 2:4, 2:4] = 1
    # A perfect predictor for organ 1 and none for organ 2: 3D Dice of organ 1 = 1, 2 = NaN.
    model.predict_volume = lambda volume: label  # type: ignore[method-assign]
    model._eval_step({"image": torch.zeros(1, 4, 1, 8, 8), "label": label[None],
                      "case_id": ["c1"]})  # fmt: skip
    rows = model.volume_dice.compute()
    assert rows.shape == (1, 2) and rows[0, 0] == 1.0 and rows[0, 1].isnan()


def test_probe_head_recovers_separable_features() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=generator)
    features = torch.nn.functional.one_hot(labels, 3).float() * 5 + 0.3 * torch.randn(
        600, 3, generator=generator
    )
    head = fit_pixel_classifier(features, labels, 3)
    image = features.T.reshape(1, 3, 20, 30)
    prediction = head(image).argmax(1)
    dice = dice_per_organ(prediction, labels.reshape(1, 20, 30), 3)
    assert (dice > 0.98).all()


def test_sample_pixels_is_class_balanced() -> None:
    label = torch.zeros(32, 32, dtype=torch.long)
    label[:3, :3] = 1  # a 9-pixel organ
    label[-1, -1] = -1
    rows, cols = sample_pixels(label, 5, torch.Generator().manual_seed(0))
    picked = label[rows, cols]
    assert (picked == 1).sum() == 5 and (picked == 0).sum() == 5 and (picked == -1).sum() == 0


class _TwoFeatures(torch.nn.Identity):
    """A 'backbone' whose finest features are its 2-channel input."""

    out_channels = 2


def test_hidden_head_separates_what_a_1x1_head_cannot() -> None:
    # Classes by XOR of the signs of two features: no plane separates them, so a 1x1 head
    # tops out at 3 of 4 quadrants; a 3x3 conv + BN + ReLU head learns all four.
    torch.manual_seed(0)
    features = torch.randn(8, 2, 6, 6)
    target = ((features[:, 0] > 0) ^ (features[:, 1] > 0)).long()
    accuracy = {}
    for channels in (0, 16):
        model = SupervisedSegmentation(_TwoFeatures(), num_classes=2, head_channels=channels)
        optimizer = torch.optim.Adam(model.head.parameters(), lr=3e-2)
        for _ in range(300):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(features), target).backward()
            optimizer.step()
        model.eval()
        accuracy[channels] = (model(features).argmax(1) == target).float().mean().item()
    assert accuracy[0] < 0.8 and accuracy[16] > 0.95, accuracy
    with pytest.raises(ValueError, match="head_channels must be >= 0"):
        SupervisedSegmentation(_TwoFeatures(), num_classes=2, head_channels=-1)


def test_hidden_head_keeps_pretrained_backbone_loading_and_3d(tmp_path: Path) -> None:
    source = UNet2d(width=4, depth=2)
    torch.save(source.state_dict(), tmp_path / "b.pt")
    model = FineTuneSegmentation(UNet2d(width=4, depth=2), pretrained=str(tmp_path / "b.pt"),
                                 num_classes=3, head_channels=8)  # fmt: skip
    torch.testing.assert_close(model.backbone.state_dict(), source.state_dict())
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3, 16, 16)
    assert model.hparams["head_channels"] == 8  # travels in the checkpoint's hyperparameters
    volume = SupervisedSegmentation(UNet3d(width=2, depth=1), num_classes=3, head_channels=4,
                                    eval_patch_size=(4, 8, 8))  # fmt: skip
    assert volume(torch.randn(1, 1, 4, 8, 8)).shape == (1, 3, 4, 8, 8)
