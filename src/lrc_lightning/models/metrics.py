"""Dice: the segmentation metric (torchmetrics) and the soft Dice loss.

Definition used everywhere in this package (training, validation, test, benchmarks):
Dice of organ c over a *sample* = ``2 |P_c ∩ G_c| / (|P_c| + |G_c|)``. While training a
sample is one 2D slice; at validation and test it is one whole 3D volume (all its slices
together, the paper's and CHAOS's "3D Dice"). Background is not scored. An organ absent
from both prediction and ground truth has no Dice (NaN) and is left out of every mean; an
organ predicted but absent from the ground truth scores 0. Reported means: per organ, the
mean over samples; overall, the mean of those per-organ means.

``empty_organ`` reproduces MONAI's ``DiceMetric`` conventions instead, for comparisons
with MONAI pipelines: ``"ignore"`` is ``ignore_empty=True`` (MONAI's default: an organ
absent from the ground truth is NaN, predicted or not), ``"one"`` is
``ignore_empty=False`` (absent from both: 1; predicted but absent: 0).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.segmentation import dice_score

__all__ = ["EMPTY_ORGAN_CONVENTIONS", "EmptyOrgan", "dice_per_organ", "nanmean", "soft_dice_loss"]

EmptyOrgan = Literal["lrc", "ignore", "one"]
EMPTY_ORGAN_CONVENTIONS = ("lrc", "ignore", "one")


def dice_per_organ(
    prediction: Tensor, target: Tensor, num_classes: int, empty_organ: EmptyOrgan = "lrc"
) -> Tensor:
    """(N, num_classes - 1) Dice of each sample and organ (NaN where undefined).

    Args:
        prediction, target: (N, *spatial) integer class maps; target pixels < 0 (ignored)
            are left out of both.
        num_classes: classes including background (0).
        empty_organ: where the ground truth lacks an organ: ``"lrc"`` (NaN if also not
            predicted, else 0), ``"ignore"`` (NaN; MONAI ``ignore_empty=True``) or
            ``"one"`` (1 if also not predicted, else 0; MONAI ``ignore_empty=False``).

    Raises:
        ValueError: shapes differ, or an unknown ``empty_organ``.

    Example:
        >>> import torch
        >>> truth = torch.tensor([[0, 1, 1, 0]]); prediction = torch.tensor([[0, 1, 2, 0]])
        >>> dice_per_organ(prediction, truth, 3, "lrc")
        tensor([[0.6667, 0.0000]])
        >>> dice_per_organ(prediction, truth, 3, "ignore")
        tensor([[0.6667,    nan]])
    """
    if empty_organ not in EMPTY_ORGAN_CONVENTIONS:
        raise ValueError(
            f"empty_organ must be one of {EMPTY_ORGAN_CONVENTIONS}, got {empty_organ!r}"
        )
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction and target differ in shape: {tuple(prediction.shape)} vs "
            f"{tuple(target.shape)}"
        )
    ignored = target < 0
    if ignored.any():
        # An ignored pixel becomes background in both maps: it counts for no organ.
        prediction = prediction.masked_fill(ignored, 0)
        target = target.masked_fill(ignored, 0)
    dice = dice_score(
        prediction.long(),
        target.long(),
        num_classes=num_classes,
        include_background=False,
        average="none",
        input_format="index",
        aggregation_level="samplewise",
    ).reshape(prediction.shape[0], num_classes - 1)
    if empty_organ == "lrc":
        return dice
    organs = torch.arange(1, num_classes, device=target.device)
    flat_target, flat_prediction = target.flatten(1), prediction.flatten(1)
    in_truth = (flat_target.unsqueeze(-1) == organs).any(dim=1)
    predicted = (flat_prediction.unsqueeze(-1) == organs).any(dim=1)
    absent = torch.full_like(dice, float("nan"))
    if empty_organ == "one":
        absent = torch.where(predicted, 0.0, 1.0).to(dice.dtype)
    return torch.where(in_truth, dice, absent)


def nanmean(values: Tensor, dim: int | None = None) -> Tensor:
    """Mean over the defined (non-NaN) values; NaN when none is."""
    if dim is None:
        return values.nanmean() if (~values.isnan()).any() else values.new_tensor(float("nan"))
    return values.nanmean(dim=dim)


def soft_dice_loss(logits: Tensor, target: Tensor, ignore_index: int = -1) -> Tensor:
    """1 - mean soft Dice over the organs present in the batch (background excluded).

    Args:
        logits: (B, C, H, W) or (B, C, D, H, W); target: (B, *spatial) class ids,
            ``ignore_index`` ignored.
    """
    num_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)
    probabilities = logits.float().softmax(dim=1) * valid
    one_hot = F.one_hot(target.clamp(min=0), num_classes).movedim(-1, 1) * valid
    dims = (0, *range(2, logits.ndim))
    intersection = (probabilities * one_hot).sum(dims)[1:]
    denominator = probabilities.sum(dims)[1:] + one_hot.sum(dims)[1:]
    present = one_hot.sum(dims)[1:] > 0
    if not present.any():
        return probabilities.sum() * 0.0  # keeps the graph; nothing to score
    dice = (2 * intersection + 1e-6) / (denominator + 1e-6)
    return 1.0 - dice[present].mean()
