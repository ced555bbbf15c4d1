"""``lrc-lightning preview``: see the slices and super-pixels before pre-training.

    lrc-lightning preview --data path/to/dataset.json --data.image_size 256 --out preview.png
    lrc-lightning preview --config examples/configs/moco_lrc.yaml --scales 50 100 200

Writes a PNG grid: a few slices per case with their super-pixel boundaries, captioned with
the chosen slice axis, the in-plane spacing and the region count per slice; with
``--scales`` further columns show Felzenszwalb at other ``scale`` values side by side, so a
user can see whether slices are cut along the acquisition plane and which scale suits the
data, before any pre-training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lrc_lightning.data import LRCDataModule
from lrc_lightning.data.cache import CachedVolume
from lrc_lightning.evaluation.image_logging import overlay_boundaries
from lrc_lightning.superpixels.graph import felzenszwalb

__all__ = ["preview_grid", "write_preview"]

#: Tiles are enlarged to at least this many pixels, so that small slices stay legible.
_MIN_TILE = 192
_CAPTION = 16


def _chosen_slices(volume: CachedVolume, count: int) -> list[int]:
    """``count`` slices evenly spread inside the kept (non-empty) slices, ends excluded."""
    candidates = volume.kept_slices or list(range(volume.image.shape[0]))
    picks = (np.arange(1, count + 1) / (count + 1)) * (len(candidates) - 1)
    return sorted({candidates[round(float(p))] for p in picks})


def _tile(image: np.ndarray, ids: np.ndarray, caption: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    rgb = overlay_boundaries(image, ids)
    factor = max(1, -(-_MIN_TILE // max(rgb.shape[:2])))
    rgb = np.kron(rgb, np.ones((factor, factor, 1), dtype=np.uint8))
    canvas = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + _CAPTION), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb), (0, _CAPTION))
    ImageDraw.Draw(canvas).text((2, 2), caption, fill=(255, 255, 255))
    return np.asarray(canvas)


def preview_grid(
    datamodule: LRCDataModule, cases: int = 3, slices: int = 4, scales: Sequence[float] = ()
) -> tuple[np.ndarray, list[dict[str, object]]]:
    """The (H, W, 3) uint8 grid and one summary per shown slice.

    Only the first ``cases`` cases are read and cached. Rows: ``slices`` slices of each of
    them; columns: the cached super-pixels, then Felzenszwalb at each of ``scales`` (same
    sigma and min_size).
    """
    # Only the shown cases are pre-processed (into the data module's cache, reused later).
    shown = datamodule.cases()[:cases]
    datamodule.cache.prepare(shown, processes=datamodule.precompute_workers)
    config = datamodule.config
    rows, summary = [], []
    for volume in (datamodule.cache.load(case) for case in shown):
        meta = volume.meta
        spacing = meta.get("spacing", [float("nan")] * 3)
        for s in _chosen_slices(volume, slices):
            image = np.asarray(volume.image[s], dtype=np.float32)
            ids = np.asarray(volume.superpixels[s])
            regions = len(np.unique(ids[ids >= 0]))
            caption = (f"{volume.case_id} s{s} axis {meta.get('slice_axis')} "
                       f"{spacing[1]:.2g}x{spacing[2]:.2g}mm {regions} reg")  # fmt: skip
            tiles = [_tile(image, ids, caption)]
            entry: dict[str, object] = {
                "case": volume.case_id, "slice": s, "slice_axis": meta.get("slice_axis"),
                "spacing_mm": spacing[1:], "size": list(image.shape), "regions": regions,
            }  # fmt: skip
            for scale in scales:
                alt = felzenszwalb(
                    image, scale, config.superpixel_sigma, config.superpixel_min_size,
                    config.background_threshold,
                )  # fmt: skip
                alt = np.where(ids >= 0, alt, -1)  # padding stays padding
                count = len(np.unique(alt[alt >= 0]))
                tiles.append(_tile(image, alt, f"scale {scale:g}: {count} regions"))
                entry[f"regions_scale_{scale:g}"] = count
            rows.append(np.concatenate(tiles, axis=1))
            summary.append(entry)
    if not rows:
        raise ValueError("no case to preview")
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(rows, axis=0), summary


def write_preview(
    datamodule: LRCDataModule,
    out: str | Path,
    cases: int = 3,
    slices: int = 4,
    scales: Sequence[float] = (),
) -> list[dict[str, object]]:
    """Write :func:`preview_grid` as a PNG at ``out``; returns the per-slice summary."""
    from PIL import Image

    grid, summary = preview_grid(datamodule, cases, slices, scales)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out)
    return summary
