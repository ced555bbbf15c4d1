"""Online segmentation probe: watch representation quality during pre-training.

Self-supervised libraries probe classification with a linear head; segmentation needs a
dense one. Every few epochs this callback fits a 1x1 convolution (a per-pixel logistic regression,
solved to convergence) on frozen dense features of the few labelled slices, then scores 3D Dice per
organ on the validation volumes. The pre-training itself is not touched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrc_lightning.models.metrics import dice_per_organ, nanmean

__all__ = [
    "SegmentationProbe",
    "dense_features",
    "fit_pixel_classifier",
    "linear_probe_dice",
    "sample_pixels",
]


def sample_pixels(
    labels: Tensor, per_class: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Up to ``per_class`` random pixels of every class present in a (H, W) label map.

    Returns (rows, cols). Class-balanced, so small organs are not drowned by background.
    """
    rows, cols = [], []
    for c in labels.unique().tolist():
        if c < 0:
            continue
        where = (labels == c).nonzero()
        pick = torch.randperm(len(where), generator=generator)[:per_class]
        rows.append(where[pick, 0])
        cols.append(where[pick, 1])
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    return torch.cat(rows), torch.cat(cols)


def fit_pixel_classifier(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    l2: float = 1e-4,
    max_iter: int = 500,
    tolerance: float = 1e-6,
) -> nn.Conv2d:
    """Multinomial logistic regression on (N, C) pixel features, solved to convergence.

    The objective (mean cross-entropy + ``l2 / 2 * ||W||^2`` on standardised features) is
    strictly convex, and L-BFGS with a strong-Wolfe line search in float64 solves it to a
    gradient norm below ``tolerance``: the result depends on the features and labels only,
    not on a learning rate, a step budget or an initialisation. Classes are weighted so that
    each counts equally (what sampling did not balance). The standardisation is folded
    into the returned 1x1 convolution, which maps (B, C, H, W) features to logits.

    Raises:
        ValueError: empty or mismatched inputs.
        RuntimeError: L-BFGS stopped with a gradient norm above ``100 * tolerance``.
    """
    if features.ndim != 2 or labels.shape != features.shape[:1] or len(labels) == 0:
        raise ValueError(
            f"expected (N, C) features and (N,) labels with N > 0, got "
            f"{tuple(features.shape)} and {tuple(labels.shape)}"
        )
    device, dtype = features.device, features.dtype
    x64 = features.detach().double().cpu()
    y = labels.detach().long().cpu()
    mean, std = x64.mean(0), x64.std(0).clamp(min=1e-6)
    x = (x64 - mean) / std
    counts = torch.bincount(y, minlength=num_classes).double().clamp(min=1)
    weight = counts.sum() / (num_classes * counts)
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def objective() -> Tensor:
        solver.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y, weight=weight) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        solver.step(objective)
        objective()
    grad_norm = float(torch.cat([w.grad.flatten(), b.grad]).abs().max())  # type: ignore[union-attr]
    if grad_norm > 100 * tolerance:
        raise RuntimeError(
            f"the probe's logistic regression did not converge in {max_iter} L-BFGS "
            f"iterations (gradient {grad_norm:.2e}); raise max_iter or l2"
        )
    conv = nn.Conv2d(features.shape[1], num_classes, 1)
    with torch.no_grad():
        w_d = w.detach()
        conv.weight.copy_((w_d / std)[:, :, None, None].to(conv.weight.dtype))
        conv.bias.copy_((b.detach() - (w_d * mean / std).sum(1)).to(conv.bias.dtype))
    return conv.to(device=device, dtype=dtype)


FeatureLevel = int | Literal["bottleneck"]


@torch.no_grad()
def dense_features(
    backbone: nn.Module,
    slices: np.ndarray,
    batch_size: int = 32,
    level: FeatureLevel = -1,
    feature_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Frozen (S, C, H, W) features of (S, H, W) slices at the slices' resolution (float32,
    on the backbone's device): decoder ``level`` of a U-Net-like backbone (or
    ``"bottleneck"``: its encoder's output), the output of any other backbone, or
    ``feature_fn(images)`` when given."""
    from lrc_lightning.models.backbone import backbone_features

    device = next(backbone.parameters()).device
    out = []
    for start in range(0, len(slices), batch_size):
        x = torch.from_numpy(np.asarray(slices[start : start + batch_size], np.float32))
        x = x[:, None].to(device)
        if feature_fn is not None:
            f = feature_fn(x).float()
        elif level == "bottleneck":
            f = backbone.encode(x)[0].float()  # type: ignore[operator]
        else:
            f = backbone_features(backbone, x, level)[1].float()  # type: ignore[union-attr]
        out.append(F.interpolate(f, size=x.shape[-2:], mode="bilinear", align_corners=False))
    return torch.cat(out)


def linear_probe_dice(
    backbone: nn.Module,
    train: list[tuple[np.ndarray, np.ndarray]],
    test: dict[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    pixels_per_class: int = 4096,
    seed: int = 0,
    l2: float = 1e-4,
    batch_size: int = 32,
    level: FeatureLevel = -1,
) -> dict[str, list[float]]:
    """Frozen-feature dense linear probe: 3D Dice per organ of each test volume.

    Deterministic given the backbone's weights: ``pixels_per_class`` pixels of each class are
    drawn (seeded) from all slices of the ``train`` volumes (class-balanced, so small organs
    count), a logistic regression is solved to convergence on their frozen features
    (:func:`fit_pixel_classifier`), and every slice of each test volume is classified.

    Args:
        backbone: the pre-trained (or random) network; put in eval mode here.
        train: (image (S, H, W), label (S, H, W)) of the labelled volumes.
        test: case id -> (image, label) of the volumes to score.
        level: the features probed (:func:`dense_features`).

    Returns:
        case id -> Dice of organs 1..num_classes-1 (NaN where undefined).
    """
    was_training = backbone.training
    backbone.eval()
    try:
        generator = torch.Generator().manual_seed(seed)
        features, targets = [], []
        for image, label in train:
            dense = dense_features(backbone, image, batch_size, level)
            flat_label = torch.from_numpy(np.asarray(label, np.int64)).flatten()
            flat = dense.permute(1, 0, 2, 3).flatten(1)  # (C, S*H*W)
            for c in range(num_classes):
                where = (flat_label == c).nonzero().squeeze(1)
                pick = where[torch.randperm(len(where), generator=generator)[:pixels_per_class]]
                features.append(flat[:, pick.to(flat.device)].T)
                targets.append(torch.full((len(pick),), c, dtype=torch.long))
        head = fit_pixel_classifier(torch.cat(features), torch.cat(targets), num_classes, l2)
        scores: dict[str, list[float]] = {}
        for case_id, (image, label) in test.items():
            dense = dense_features(backbone, image, batch_size, level)
            with torch.no_grad():
                prediction = torch.cat([head(f).argmax(1) for f in dense.split(batch_size)])
            target = torch.from_numpy(np.asarray(label, np.int64))
            dice = dice_per_organ(prediction.cpu()[None], target[None], num_classes)
            scores[case_id] = dice[0].tolist()
        return scores
    finally:
        backbone.train(was_training)


class SegmentationProbe(pl.Callback):
    """Fits a detached per-pixel linear head on labelled slices and logs Dice per organ.

    Needs an :class:`~lrc_lightning.LRCDataModule` with ``labelled_cases`` (probe training
    slices) and ``val_cases`` (probe evaluation volumes), and a module whose ``backbone``
    gives dense features (the reference models), or ``feature_fn``: a method name of the
    module mapping (B, 1, H, W) images to (B, C, H', W') features.

    Logs ``probe/dice_<organ>`` and ``probe/dice_mean`` every ``every_n_epochs`` epochs.

    Args:
        every_n_epochs: how often to probe.
        pixels_per_class: pixels sampled per class and slice for fitting.
        max_slices: labelled slices used (those with most foreground first).
        l2, max_iter: the head's L2 penalty and L-BFGS budget (:func:`fit_pixel_classifier`).
        num_classes, class_names: default from the data set's labels.
        batch_size: slices per forward.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        pixels_per_class: int = 64,
        max_slices: int = 256,
        l2: float = 1e-4,
        max_iter: int = 500,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        feature_fn: str | None = None,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        if every_n_epochs < 1 or pixels_per_class < 1 or max_slices < 1 or max_iter < 1:
            raise ValueError("every_n_epochs, pixels_per_class, max_slices, max_iter must be >= 1")
        self.every_n_epochs = every_n_epochs
        self.pixels_per_class = pixels_per_class
        self.max_slices = max_slices
        self.l2 = l2
        self.max_iter = max_iter
        self.num_classes = num_classes
        self.class_names = class_names
        self.feature_fn = feature_fn
        self.batch_size = batch_size
        self.seed = seed

    def _volumes(self, trainer: pl.Trainer) -> tuple[list[Any], list[Any]]:
        datamodule = trainer.datamodule
        split = getattr(datamodule, "split", None)
        if split is None or not split.labelled or not split.val:
            raise ValueError(
                "SegmentationProbe needs an LRCDataModule with labelled_cases >= 1 and "
                "val_cases >= 1 (its labelled slices train the probe, its validation volumes "
                "score it)"
            )
        labelled, val = datamodule.volumes(split.labelled), datamodule.volumes(split.val)
        for v in labelled + val:
            if v.label is None:
                raise ValueError(f"SegmentationProbe: case {v.case_id} has no label")
        return labelled, val

    def _dense(self, pl_module: pl.LightningModule, image: np.ndarray) -> Tensor:
        """Features of (S, H, W) slices, brought to the image resolution."""
        if self.feature_fn is not None:
            method = getattr(pl_module, self.feature_fn)
            return dense_features(pl_module, image, self.batch_size, feature_fn=method)
        backbone = getattr(pl_module, "backbone", None)
        if backbone is None:
            raise ValueError(
                f"{type(pl_module).__name__} has no `backbone`; give SegmentationProbe "
                "feature_fn='<method returning dense features>'"
            )
        return dense_features(backbone, image, self.batch_size)

    def probe(self, pl_module: pl.LightningModule, trainer: pl.Trainer) -> dict[str, float]:
        labelled, val = self._volumes(trainer)
        num_classes = self.num_classes or int(max(v.label_ids().max() for v in labelled + val)) + 1
        generator = torch.Generator().manual_seed(self.seed)
        # The labelled slices with most foreground first, at most max_slices of them.
        ranked = sorted(
            ((int((v.label_ids(s) > 0).sum()), i, s)
             for i, v in enumerate(labelled) for s in range(v.label.shape[0])),
            reverse=True,
        )[: self.max_slices]  # fmt: skip
        features, targets = [], []
        for i, v in enumerate(labelled):
            chosen = sorted(s for _, j, s in ranked if j == i)
            for start in range(0, len(chosen), self.batch_size):
                batch = chosen[start : start + self.batch_size]
                dense = self._dense(pl_module, np.asarray(v.image[batch]))
                for k, s in enumerate(batch):
                    label = torch.from_numpy(v.label_ids(s))
                    rows, cols = sample_pixels(label, self.pixels_per_class, generator)
                    features.append(dense[k][:, rows, cols].T)
                    targets.append(label[rows, cols].to(dense.device))
        head = fit_pixel_classifier(
            torch.cat(features), torch.cat(targets), num_classes, self.l2, self.max_iter
        )
        rows_dice = []
        with torch.no_grad():
            for v in val:
                logits = torch.cat(
                    [head(f[None]) for f in self._dense(pl_module, np.asarray(v.image))]
                )
                prediction = logits.argmax(1).cpu()
                target = torch.from_numpy(v.label_ids())
                rows_dice.append(dice_per_organ(prediction[None], target[None], num_classes))
        per_organ = nanmean(torch.cat(rows_dice), dim=0)
        names = self.class_names or [f"class_{c}" for c in range(1, num_classes)]
        if len(names) == num_classes:
            names = names[1:]
        result = {f"dice_{n}": float(d) for n, d in zip(names, per_organ.tolist(), strict=True)}
        result["dice_mean"] = float(nanmean(per_organ))
        return result

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            result = self.probe(pl_module, trainer)
        finally:
            pl_module.train(was_training)
        for key, value in result.items():
            pl_module.log(f"probe/{key}", value, prog_bar=key == "dice_mean")
