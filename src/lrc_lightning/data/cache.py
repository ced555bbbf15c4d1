"""Persistent, memory-mappable cache of normalised slices and their super-pixels.

One entry per case: a folder ``<name>-<key>`` holding ``image.npy`` (float16, [0, 1]),
``superpixels.npy`` (int16, or int32 when a slice has more than 32767 regions),
``label.npy`` (uint8, when the case has labels) and ``meta.json``. All slices of the volume
are stored; ``meta["kept_slices"]`` lists the non-empty ones used for pre-training.
``<name>`` is the case id made safe as one file name (characters other than letters,
digits, ``.``, ``_`` and ``-`` become ``_``, no leading dot, at most 80 characters): ids
are not paths (a BIDS ``sub-01/ses-01``, a CSV's ``../x``), and the key, which hashes
the exact id, keeps two ids that sanitise alike apart.

**Key.** A BLAKE2 hash of the cache format version, every pre-processing parameter that
changes the result, and the inputs' identity: by default each input file's resolved path,
size, modification time and status-change time (cheap; ``ctime`` cannot be set by a
user, so a corrected label copied over the old one with ``cp -p`` or ``rsync -a``, same
size and preserved mtime, still makes a new entry; metadata-only changes such as
``chmod`` cause a needless rebuild), or with ``hash_content=True`` the bytes of the
files (no rebuild after a copy to a new path or a ``chmod``; reads every input once per
run).

**Safety.** An entry is built in a temporary folder and renamed into place (atomic on one
filesystem), so a crash leaves no half-written entry and two processes filling the same
cache never corrupt it (the second rename loses and is discarded). ``meta.json`` records
each array's byte size and BLAKE2 digest; a truncated or corrupt entry is detected, removed
and rebuilt. Work is per case, so an interrupted run resumes with the missing cases only.
A temporary folder names its writer (pid, host and pid namespace): one left by a process
of this machine that is gone (killed, out of memory) is removed when ``prepare`` starts;
others' after 6 hours. A failed write (disk full, quota, file-size limit) raises
:class:`CacheWriteError` naming the cache and removes the partial entry.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lrc_lightning.data.cases import Case, DataError
from lrc_lightning.data.precompute import precompute_in_pool
from lrc_lightning.data.preprocess import IGNORE_LABEL, PreprocessConfig, build_entry

__all__ = [
    "CACHE_VERSION",
    "CacheWriteError",
    "CachedVolume",
    "PreprocessConfig",
    "VolumeCache",
    "parse_shard",
]

#: PreprocessConfig options added after CACHE_VERSION 2, hashed only when set.
_ADDED_LATER = {"supervoxels": False, "slice_spacing": None, "regions": "felzenszwalb",
                "grid_cell": 16}  # fmt: skip

CACHE_VERSION = 2  # 2: aspect-preserving image_size (padding), slice_axis "auto"
_TMP_PREFIX = ".tmp-"
#: Temporary folders of writers that cannot be checked (another host) count as stale after.
_STALE_TMP_SECONDS = 6 * 3600
#: The writer's "<pid>@<host>+<pid namespace>" and a random suffix, at the end of a tmp name.
_TMP_OWNER = re.compile(r"-(\d+)@([A-Za-z0-9.]+)\+(\d+)-[0-9a-f]{8}$")


class CacheWriteError(OSError):
    """A cache entry could not be written (disk full, quota, file-size limit); the message
    names the cache folder and the file."""


def _machine() -> str:
    """"<host>+<pid namespace inode>": where a pid means one process. The namespace tells
    containers that share a host name (and a cache folder) apart."""
    host = re.sub(r"[^A-Za-z0-9.]", ".", socket.gethostname())[:40] or "host"
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{host}+{namespace}"


def _tmp_name(base: str) -> str:
    return f"{_TMP_PREFIX}{base}-{os.getpid()}@{_machine()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


@dataclass
class CachedVolume:
    """Memory-mapped arrays of one cached case."""

    case_id: str
    image: np.ndarray  # (S, H, W) float16
    superpixels: np.ndarray  # (S, H, W) int16/int32
    label: np.ndarray | None  # (S, H, W) uint8, IGNORE_LABEL where padded
    kept_slices: list[int]
    meta: dict[str, Any]

    def label_ids(self, index: Any = slice(None)) -> np.ndarray:
        """``label[index]`` as int64 with padded and ignored pixels as -1 (the value the
        losses and Dice ignore)."""
        if self.label is None:
            raise ValueError(f"case {self.case_id} has no label")
        out = np.asarray(self.label[index], dtype=np.int64)
        out[out == IGNORE_LABEL] = -1
        return out


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


def _entry_name(case_id: str) -> str:
    """``case_id`` as a single, visible file name (see the module docstring)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", case_id)[:80]
    name = re.sub(r"^\.+", lambda m: "_" * len(m.group()), name)  # no hidden name, no ..
    return name or "case"


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
            out.append([str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return out


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
        config = asdict(self.config)
        for name, default in _ADDED_LATER.items():
            if config[name] == default:
                del config[name]  # the keys of caches made before the option stay as they were
        payload = {
            "version": CACHE_VERSION,
            "config": config,
            "case_id": case.case_id,
            "image": _file_identity(case.image, self.hash_content),
            "label": _file_identity(case.label, self.hash_content) if case.label else None,
        }
        if case.series is not None:  # only then: keys of single-series folders stay as they were
            payload["series"] = case.series
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.blake2b(blob, digest_size=10).hexdigest()

    def entry_dir(self, case: Case) -> Path:
        return self.root / f"{_entry_name(case.case_id)}-{self.key(case)}"

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
        tmp = self.root / _tmp_name(final.name)
        path = tmp
        try:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                tmp.mkdir()
                files = {}
                for name in ("image", "superpixels", "label"):
                    if name in arrays:
                        path = tmp / f"{name}.npy"
                        np.save(path, arrays[name])
                        files[path.name] = {"bytes": path.stat().st_size,
                                            "blake2b": _digest(path)}  # fmt: skip
                meta = dict(arrays["meta"])
                meta.update(
                    files=files, key=final.name, config=asdict(self.config), version=CACHE_VERSION
                )
                path = tmp / "meta.json"
                path.write_text(json.dumps(meta, indent=1, default=str))
                for path in tmp.iterdir():  # data on disk before the rename makes it visible
                    with path.open("rb") as fh:
                        os.fsync(fh.fileno())
            except OSError as err:
                raise self._write_error(path, final, err) from err
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

    def _write_error(self, path: Path, final: Path, err: OSError) -> CacheWriteError:
        """The error of a failed write, naming the cache and the file. numpy reports a
        short write as "N requested and M written" without errno or path: the free space
        tells a full disk from other causes."""
        try:
            free = f"{shutil.disk_usage(self.root).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        if err.errno in (None, errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            cause = (
                "the disk is full, or a quota or file-size limit was hit. Free space or set "
                "cache_dir to a larger disk"
            )
        else:
            cause = "check that cache_dir is a writable folder"
        return CacheWriteError(
            f"LRC cache {self.root}: could not write {path.name} of entry {final.name} "
            f"({err}; {free}): {cause}; the partial entry is removed and finished entries "
            "are kept, so a rerun resumes."
        )

    def _discard(self, entry: Path) -> None:
        trash = entry.with_name(_tmp_name(f"corrupt-{entry.name}"))
        try:
            os.rename(entry, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _clean_stale_tmp(self) -> None:
        """Remove temporary folders of dead writers of this machine (at once) and any older
        than 6 hours (writers elsewhere: their pids cannot be checked from here)."""
        if not self.root.exists():
            return
        now, machine = time.time(), _machine()
        for p in self.root.glob(f"{_TMP_PREFIX}*"):
            owner = _TMP_OWNER.search(p.name)
            try:
                if owner is not None and f"{owner[2]}+{owner[3]}" == machine:
                    stale = not _pid_alive(int(owner[1]))
                else:
                    stale = now - p.stat().st_mtime > _STALE_TMP_SECONDS
                if stale:
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
                precompute_in_pool(todo, self.config, processes, self._write, bar.update)
        finally:
            bar.close()
        return stats

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
