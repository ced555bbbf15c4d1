"""Intensity normalisation to [0, 1]: CT Hounsfield windows, MR percentile clipping."""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np

__all__ = ["CT_WINDOWS", "Modality", "normalise"]

Modality = Literal["ct", "mr"]

#: Named CT windows (a_min, a_max) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (-175.0, 250.0),  # soft tissue, the usual abdominal-organ window
    "lung": (-1000.0, 400.0),
    "bone": (-500.0, 1300.0),
    "brain": (0.0, 80.0),
    "mediastinum": (-160.0, 240.0),
}


def normalise(
    volume: np.ndarray,
    modality: Modality,
    ct_window: str | tuple[float, float] = "abdomen",
    mr_percentiles: tuple[float, float] = (0.5, 99.5),
    source: str = "volume",
) -> np.ndarray:
    """Map intensities to float32 in [0, 1].

    CT: clip to the window (a name from :data:`CT_WINDOWS` or ``(a_min, a_max)``) and
    rescale. MR: clip to the given percentiles of the volume and rescale. A constant volume
    becomes all zeros (with a warning naming ``source``).
    """
    volume = np.asarray(volume, dtype=np.float32)
    if modality == "ct":
        if isinstance(ct_window, str):
            if ct_window not in CT_WINDOWS:
                raise ValueError(f"unknown CT window {ct_window!r}; known: {sorted(CT_WINDOWS)}")
            lo, hi = CT_WINDOWS[ct_window]
        else:
            lo, hi = (float(v) for v in ct_window)
    elif modality == "mr":
        p_lo, p_hi = mr_percentiles
        if not 0 <= p_lo < p_hi <= 100:
            raise ValueError(
                f"mr_percentiles must satisfy 0 <= low < high <= 100, got {mr_percentiles}"
            )
        lo, hi = (float(v) for v in np.percentile(volume, [p_lo, p_hi]))
    else:
        raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}")
    if hi <= lo:
        if modality == "ct":
            raise ValueError(f"CT window needs a_min < a_max, got ({lo}, {hi})")
        warnings.warn(f"{source}: constant intensities; normalised to zeros", stacklevel=2)
        return np.zeros_like(volume)
    out = (volume - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)
