"""Schedules for the LRC loss weight lambda."""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["DEFAULT_LRC_WEIGHT", "WeightSchedule", "lrc_weight"]

WeightSchedule = Literal["constant", "linear", "cosine"]

#: lambda's default [ours]: the best of 0.3 / 1 / 3 in the validation ablation of
#: benchmarks/label_efficiency.py (MoCo v2 + LRC, CHAOS T2, k=1; see benchmarks/results).
DEFAULT_LRC_WEIGHT = 0.3


def lrc_weight(
    step: int, weight: float, schedule: WeightSchedule = "constant", warmup_steps: int = 0
) -> float:
    """lambda at optimizer step ``step``.

    * ``constant``: ``weight`` from the first step.
    * ``linear``: 0 -> ``weight`` linearly over ``warmup_steps``, then constant.
    * ``cosine``: 0 -> ``weight`` along a half cosine over ``warmup_steps`` (smooth start and
      end), then constant.

    [ours] The paper adds the local term with a fixed weight; the warm-ups let the global
    objective shape the encoder first. ``warmup_steps=0`` makes every schedule constant.
    """
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"schedule must be 'constant', 'linear' or 'cosine', got {schedule!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if weight < 0:
        # A negative lambda would maximise the contrastive loss: never what is meant.
        raise ValueError(f"the LRC weight (lambda) must be >= 0, got {weight}")
    if schedule == "constant" or warmup_steps == 0 or step >= warmup_steps:
        return float(weight)
    progress = max(step, 0) / warmup_steps
    if schedule == "linear":
        return float(weight) * progress
    return float(weight) * 0.5 * (1.0 - math.cos(math.pi * progress))
