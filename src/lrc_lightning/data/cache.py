"""Persistent, memory-mappable cache of normalised slices and their super-pixels.

One entry per case: a folder ``<case_id>-<key>`` holding ``image.npy`` (float16, [0, 1]),
``superpixels.npy`` (int16, or int32 when a slice has more than 32767 regions),
``label.npy`` (uint8, when the case has labels) and ``meta.json``. All slices of the volume
are stored; ``meta["kept_slices"]`` lists the non-empty ones used for pre-training.

**Key.** A BLAKE2 hash of the cache format version, every pre-processing parameter that
changes the result, and the inputs' identity: by default each input file's resolved path,
size and modification time (cheap; a file rewritten in place with the same size within the
same nanosecond would be missed), or with ``hash_content=True`` the bytes of the files.

**Safety.** An entry is built in a temporary folder and renamed into place (atomic on one
filesystem), so a crash leaves no half-written entry and two processes filling the same
cache never corrupt it (the second rename loses and is discarded). ``meta.json`` records
each array's byte size and BLAKE2 digest; a truncated or corrupt entry is detected, removed
and rebuilt. Work is per case, so an interrupted run resumes with the missing cases only.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lrc_lightning.data.intensity import Modality, normalise
from lrc_lightning.data.io import (
    Case,
    DataError,
    assemble_dicom_blocks,
    check_same_geometry,
    checked_volume,
    dicom_blocks,
    dicom_series_files,
    read_dicom_block,
    read_volume,
)
from lrc_lightning.superpixels import felzenszwalb

__all__ = ["CACHE_VERSION", "CachedVolume", "PreprocessConfig", "VolumeCache", "parse_shard"]

CACHE_VERSION = 1
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 6 * 3600


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that changes a cache entry."""

    modality: Modality = "mr"
    ct_window: str | tuple[float, float] = "abdomen"
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    image_size: int | None = None
    slice_axis: int = 0
    foreground_threshold: float = 0.05
    min_foreground_fraction: float = 0.02
    superpixel_scale: float = 100.0
    superpixel_sigma: float = 0.8
    superpixel_min_size: int = 50
    background_threshold: float | None = None
    allowed_labels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {self.slice_axis}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")


@dataclass
class CachedVolume:
    """Memory-mapped arrays of one cached case."""

    case_id: str
    image: np.ndarray  # (S, H, W) float16
    superpixels: np.ndarray  # (S, H, W) int16/int32
    label: np.ndarray | None  # (S, H, W) uint8
    kept_slices: list[int]
    meta: dict[str, Any]


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"i/n"`` or ``(i, n)`` -> (i, n) with 0 <= i < n; ``None`` -> (0, 1)."""
    if shard is None:
        return 0, 1
    if isinstance(shard, str):
        try:
            i_str, n_str = shard.split("/")
            i, n = int(i_str), int(n_str)
        except ValueError as err:
            raise ValueError(f"shard must look like 'i/n' (e.g. '0/4'), got {shard!r}") from err
    else:
        i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard index must satisfy 0 <= i < n, got {i}/{n}")
    return i, n


def _file_identity(path: Path, hash_content: bool) -> list[Any]:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    out: list[Any] = []
    for f in files:
        if hash_content:
            h = hashlib.blake2b(digest_size=16)
            with f.open("rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(chunk)
            out.append([f.name, h.hexdigest()])
        else:
            st = f.stat()
            out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _resize_slices(volume: np.ndarray, size: int, mode: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(volume)).unsqueeze(1)
    if mode == "nearest":
        out = F.interpolate(t.float(), size=(size, size), mode="nearest-exact")
        return out.squeeze(1).numpy().astype(volume.dtype)
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.squeeze(1).numpy()


@dataclass
class _ReadCase:
    case: Case
    image: np.ndarray  # (S, H, W) float32 in [0, 1], contiguous
    label: np.ndarray | None  # (S, H, W) uint8
    spacing_zyx: list[float]


def build_entry(case: Case, config: PreprocessConfig) -> dict[str, np.ndarray | dict]:
    """Read, normalise, resize and segment one case (no I/O to the cache)."""
    read = _read_case(case, config)
    superpixels = np.stack([_felzenszwalb(s, config) for s in read.image])
    return _assemble(read, superpixels, config)


def _felzenszwalb(image: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    return felzenszwalb(
        image,
        config.superpixel_scale,
        config.superpixel_sigma,
        config.superpixel_min_size,
        config.background_threshold,
    )


def _felzenszwalb_slices(images: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Pool worker: super-pixels of a (k, H, W) block of slices (numba only, no torch)."""
    return np.stack([_felzenszwalb(s, config) for s in images])


def _read_case(
    case: Case, config: PreprocessConfig, read_image: Callable[[Path], sitk.Image] = read_volume
) -> _ReadCase:
    """Read, check, normalise and resize one case."""
    image = read_image(case.image)
    arr = sitk.GetArrayFromImage(image)  # (z, y, x)
    label_arr = None
    if case.label is not None:
        label = read_volume(case.label)
        check_same_geometry(image, label, case.image, case.label)
        label_arr = sitk.GetArrayFromImage(label)
        if np.issubdtype(label_arr.dtype, np.floating):
            if not np.all(label_arr == np.round(label_arr)):
                raise DataError(f"{case.label}: label map has non-integer values")
        values = np.unique(label_arr)
        if values.min() < 0 or values.max() > 255:
            raise DataError(
                f"{case.label}: label values must lie in 0..255, "
                f"found {values.min()}..{values.max()}"
            )
        if config.allowed_labels is not None:
            extra = sorted(set(values.tolist()) - set(config.allowed_labels))
            if extra:
                raise DataError(
                    f"{case.label}: label values {extra} are not among the declared labels "
                    f"{list(config.allowed_labels)}"
                )
        label_arr = label_arr.astype(np.uint8)
    norm = normalise(arr, config.modality, config.ct_window, config.mr_percentiles, str(case.image))
    norm = np.moveaxis(norm, config.slice_axis, 0)
    if label_arr is not None:
        label_arr = np.moveaxis(label_arr, config.slice_axis, 0)
    if config.image_size is not None:
        norm = _resize_slices(norm, config.image_size, "bilinear")
        norm = np.clip(norm, 0.0, 1.0)
        if label_arr is not None:
            label_arr = _resize_slices(label_arr, config.image_size, "nearest")
    norm = np.ascontiguousarray(norm, dtype=np.float32)
    return _ReadCase(case, norm, label_arr, list(reversed(image.GetSpacing())))


def _assemble(
    read: _ReadCase, superpixels: np.ndarray, config: PreprocessConfig
) -> dict[str, np.ndarray | dict]:
    """The arrays and metadata of a cache entry."""
    case, norm, label_arr = read.case, read.image, read.label
    foreground = (norm > config.foreground_threshold).mean(axis=(1, 2))
    kept = [int(i) for i in np.flatnonzero(foreground >= config.min_foreground_fraction)]
    n_regions = superpixels.reshape(len(norm), -1).max(1) + 1
    sp_dtype = np.int16 if superpixels.max() < np.iinfo(np.int16).max else np.int32
    arrays: dict[str, Any] = {
        "image": norm.astype(np.float16),
        "superpixels": superpixels.astype(sp_dtype),
    }
    if label_arr is not None:
        arrays["label"] = label_arr
    arrays["meta"] = {
        "case_id": case.case_id,
        "image_file": str(case.image),
        "label_file": str(case.label) if case.label else None,
        "shape": list(norm.shape),
        "spacing_zyx": read.spacing_zyx,
        "kept_slices": kept,
        "regions_per_slice": {
            "min": int(n_regions.min()),
            "median": float(np.median(n_regions)),
            "max": int(n_regions.max()),
        },
    }
    return arrays


class VolumeCache:
    """The cache folder for one :class:`PreprocessConfig` (see the module docstring)."""

    def __init__(
        self, cache_dir: str | Path, config: PreprocessConfig, hash_content: bool = False
    ) -> None:
        self.root = Path(cache_dir).expanduser()
        self.config = config
        self.hash_content = hash_content

    # ---------------------------------------------------------------- keys and paths
    def key(self, case: Case) -> str:
        payload = {
            "version": CACHE_VERSION,
            "config": asdict(self.config),
            "case_id": case.case_id,
            "image": _file_identity(case.image, self.hash_content),
            "label": _file_identity(case.label, self.hash_content) if case.label else None,
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.blake2b(blob, digest_size=10).hexdigest()

    def entry_dir(self, case: Case) -> Path:
        return self.root / f"{case.case_id}-{self.key(case)}"

    # ---------------------------------------------------------------- integrity
    def is_valid(self, entry: Path, checksum: bool = True) -> bool:
        """True if ``entry`` is complete: meta present, sizes (and digests) as recorded."""
        try:
            meta = json.loads((entry / "meta.json").read_text())
            for name, info in meta["files"].items():
                path = entry / name
                if path.stat().st_size != info["bytes"]:
                    return False
                if checksum and _digest(path) != info["blake2b"]:
                    return False
        except (OSError, KeyError, ValueError, TypeError):
            return False
        return True

    # ---------------------------------------------------------------- writing
    def _write(self, case: Case, arrays: dict[str, Any]) -> Path:
        final = self.entry_dir(case)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            files = {}
            for name in ("image", "superpixels", "label"):
                if name in arrays:
                    path = tmp / f"{name}.npy"
                    np.save(path, arrays[name])
                    files[path.name] = {"bytes": path.stat().st_size, "blake2b": _digest(path)}
            meta = dict(arrays["meta"])
            meta.update(
                files=files, key=final.name, config=asdict(self.config), version=CACHE_VERSION
            )
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            for path in tmp.iterdir():  # data on disk before the rename makes it visible
                with path.open("rb") as fh:
                    os.fsync(fh.fileno())
            try:
                os.rename(tmp, final)
            except OSError:
                if not self.is_valid(final, checksum=False):
                    raise
                # Another process finished the same entry first: keep theirs.
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _discard(self, entry: Path) -> None:
        trash = entry.with_name(f"{_TMP_PREFIX}corrupt-{entry.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(entry, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _clean_stale_tmp(self) -> None:
        if not self.root.exists():
            return
        now = time.time()
        for p in self.root.glob(f"{_TMP_PREFIX}*"):
            try:
                if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass

    def ensure(self, case: Case, checksum: bool = False) -> Path:
        """The entry of ``case``, built now if missing or invalid."""
        entry = self.entry_dir(case)
        if entry.exists():
            if self.is_valid(entry, checksum=checksum):
                return entry
            warnings.warn(f"cache entry {entry} is incomplete or corrupt: rebuilding", stacklevel=2)
            self._discard(entry)
        return self._write(case, build_entry(case, self.config))

    def prepare(
        self,
        cases: Sequence[Case],
        processes: int = 1,
        shard: str | tuple[int, int] | None = None,
        progress: bool = True,
    ) -> dict[str, int]:
        """Fill the cache for ``cases`` (this shard's share), verifying existing entries.

        Returns counts: ``{"cached": already valid, "built": computed now, "skipped": other
        shards' cases}``.
        """
        index, count = parse_shard(shard)
        mine = [c for i, c in enumerate(cases) if i % count == index]
        self._clean_stale_tmp()
        todo: list[Case] = []
        for case in mine:
            entry = self.entry_dir(case)
            if entry.exists():
                if self.is_valid(entry, checksum=True):
                    continue
                warnings.warn(
                    f"cache entry {entry} is incomplete or corrupt: rebuilding", stacklevel=2
                )
                self._discard(entry)
            todo.append(case)
        stats = {
            "cached": len(mine) - len(todo),
            "built": len(todo),
            "skipped": len(cases) - len(mine),
        }
        if not todo:
            return stats
        bar = tqdm(total=len(todo), desc="LRC super-pixel cache", unit="case", disable=not progress)
        try:
            # One case goes through the pool too: its slices (and DICOM files) are split.
            if processes <= 1:
                for case in todo:
                    self._write(case, build_entry(case, self.config))
                    bar.update(1)
            else:
                self._prepare_pipelined(todo, processes, bar)
        finally:
            bar.close()
        return stats

    def _prepare_pipelined(self, todo: list[Case], processes: int, bar: Any) -> None:
        """This process reads, normalises and writes; ``processes`` workers compute
        super-pixels by blocks of slices, for up to two cases in flight. Parallel by slice,
        so one large volume (a CT) scales too, not just many small ones. DICOM series are
        also decoded by the workers, in blocks of files (decoding is serial inside ITK).

        Workers run numba code or ITK's single-threaded DICOM decoding only, never torch
        or OpenMP: forking them from a process that has used those is safe and costs no
        interpreter start-up.
        """
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        _felzenszwalb(np.zeros((8, 8), np.float32), self.config)  # compiled once, inherited
        in_flight: deque[tuple[_ReadCase, list[Future]]] = deque()

        def finish_oldest() -> None:
            read, futures = in_flight.popleft()
            superpixels = np.concatenate([f.result() for f in futures])
            self._write(read.case, _assemble(read, superpixels, self.config))
            bar.update(1)

        with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:

            def read_image(path: Path) -> sitk.Image:
                if not path.is_dir():
                    return read_volume(path)
                blocks = dicom_blocks(dicom_series_files(path), 2 * processes)
                if len(blocks) == 1:
                    return read_volume(path)
                futures = [pool.submit(read_dicom_block, str(path), b) for b in blocks]
                image = assemble_dicom_blocks([f.result() for f in futures])
                return read_volume(path) if image is None else checked_volume(image, path)

            for case in todo:
                read = _read_case(case, self.config, read_image)
                block = max(1, -(-len(read.image) // (4 * processes)))  # ~4 blocks per worker
                futures = [
                    pool.submit(_felzenszwalb_slices, read.image[i : i + block], self.config)
                    for i in range(0, len(read.image), block)
                ]
                in_flight.append((read, futures))
                if len(in_flight) > 1:
                    finish_oldest()
            while in_flight:
                finish_oldest()

    # ---------------------------------------------------------------- reading
    def load(self, case: Case) -> CachedVolume:
        entry = self.entry_dir(case)
        if not self.is_valid(entry, checksum=False):
            raise DataError(
                f"{case.image}: no valid cache entry at {entry}; run prepare_data() "
                "(or `lrc-lightning precompute`) first"
            )
        meta = json.loads((entry / "meta.json").read_text())
        label_path = entry / "label.npy"
        return CachedVolume(
            case_id=case.case_id,
            image=np.load(entry / "image.npy", mmap_mode="r"),
            superpixels=np.load(entry / "superpixels.npy", mmap_mode="r"),
            label=np.load(label_path, mmap_mode="r") if label_path.exists() else None,
            kept_slices=list(meta["kept_slices"]),
            meta=meta,
        )


def cases_in(cache: VolumeCache, cases: Iterable[Case]) -> list[CachedVolume]:
    return [cache.load(c) for c in cases]
