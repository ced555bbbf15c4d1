"""Crashes lose nothing: SIGKILL mid-epoch resumes with its full state; SIGKILL during
precompute leaves no corrupt cache entry; two "nodes" can fill one cache at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lrc_lightning import LRCDataModule
from lrc_lightning.data import PreprocessConfig, VolumeCache, discover_cases
from lrc_lightning.data.cases import Case
from tests.conftest import DEMO_CT, DEMO_MR

ROOT = Path(__file__).resolve().parents[1]
CT = DEMO_CT / "example_ct_sm.nii.gz"


def _sum(state: dict[str, torch.Tensor], prefix: str) -> float:
    return float(sum(v.double().sum() for k, v in state.items() if k.startswith(prefix)))


def test_sigkill_mid_epoch_resumes_queue_momentum_schedule_and_optimizer(tmp_path: Path) -> None:
    worker = [sys.executable, str(ROOT / "tests" / "resume_worker.py"), "--out", str(tmp_path)]
    killed = subprocess.run(
        [*worker, "--kill-at", "5"],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4  # checkpoints every 2 steps; killed after step 5
    state = ckpt["state_dict"]

    resumed = subprocess.run(
        [*worker, "--resume"], capture_output=True, encoding="utf-8", errors="replace", timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = json.loads((tmp_path / "start_state.json").read_text())
    assert start["global_step"] == 4
    assert start["queue_ptr"] == int(state["queue_ptr"]) == 4 * 2 * 4  # steps x views x batch
    assert start["queue_sum"] == float(state["queue"].double().sum())
    assert start["key_sum"] == _sum(state, "key_backbone.")  # momentum encoder
    assert start["backbone_sum"] == _sum(state, "backbone.")
    assert start["momentum_updates"] == 4  # one per optimizer step, none lost
    # lambda comes from the restored global_step (LRCConfig.weight_at), no callback state.
    assert start["lrc_current_weight"] == pytest.approx(0.4)
    assert start["optimizer_steps"] == [4]

    rows = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # step 5 was lost with the kill and redone
    resumed_rows = rows[5:]
    # The linear warm-up goes on where it stopped (lambda = step / 10), not from 0.
    assert [r["lrc_weight"] for r in resumed_rows] == pytest.approx([0.4, 0.5, 0.6, 0.7])
    assert all(np.isfinite(r["lrc_loss"]) and np.isfinite(r["moco_loss"]) for r in resumed_rows)


def _precompute(cache: Path, size: int = 256) -> list[str]:
    return [sys.executable, "-m", "lrc_lightning.cli", "precompute",
            "--config", str(ROOT / "examples" / "configs" / "moco_lrc.yaml"),
            "--data.data", str(DEMO_MR), "--data.cache_dir", str(cache),
            "--data.image_size", str(size)]  # fmt: skip


def _cache_of_config(cache_dir: Path, size: int) -> VolumeCache:
    """The cache that `_precompute` fills (the config's data section, as the CLI builds it)."""
    return LRCDataModule(str(DEMO_MR), cache_dir=str(cache_dir), image_size=size).cache


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_sigkill_during_precompute_leaves_no_corrupt_entry(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    process = subprocess.Popen(_precompute(cache_dir), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if cache_dir.exists() and _entries(cache_dir):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    done_before = _entries(cache_dir)
    assert 1 <= len(done_before) < 4, "the kill should land between two cases"
    cache = _cache_of_config(cache_dir, 256)
    for entry in done_before:  # what is visible is complete and verifies
        assert cache.is_valid(entry, checksum=True)
    mtimes = {p.name: (p / "meta.json").stat().st_mtime for p in done_before}

    stats = cache.prepare(discover_cases(DEMO_MR), progress=False)
    assert stats == {"cached": len(done_before), "built": 4 - len(done_before), "skipped": 0}
    after = _entries(cache_dir)
    assert len(after) == 4 and all(cache.is_valid(p, checksum=True) for p in after)
    for name, mtime in mtimes.items():  # finished work was kept, not redone
        assert (cache_dir / name / "meta.json").stat().st_mtime == mtime


def test_two_processes_filling_one_cache_concurrently(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    nodes = [
        subprocess.Popen(
            _precompute(shared, size=64),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            encoding="utf-8",
            errors="replace",
        )
        for _ in range(2)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    cache = _cache_of_config(shared, 64)
    config = cache.config
    entries = _entries(shared)
    assert len(entries) == 4 and all(cache.is_valid(p, checksum=True) for p in entries)
    serial = VolumeCache(tmp_path / "serial", config)
    serial.prepare(discover_cases(DEMO_MR), progress=False)
    for case in discover_cases(DEMO_MR):
        a, b = cache.load(case), serial.load(case)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.superpixels, b.superpixels)


# ---------------------------------------------------------------- dead and failing writers
WORKER = ROOT / "tests" / "cache_worker.py"


#: Bytes the cache workers may write per file (RLIMIT_FSIZE): the CT entry's image.npy
#: (30 x 122 x 122 float16, 893 KB) does not fit, its header does.
FILE_SIZE_LIMIT = 100_000


def _cache_worker(cache_dir: Path, mode: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(cache_dir), mode,
                             str(FILE_SIZE_LIMIT)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            encoding="utf-8", errors="replace", **kwargs)  # fmt: skip


def _ct_cache(cache_dir: Path) -> VolumeCache:
    return VolumeCache(cache_dir, PreprocessConfig(modality="ct", image_size=122))


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_precompute_workers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    parent = _cache_worker(tmp_path / "cache", "hold")
    workers: list[int] = []
    try:
        assert parent.stdout.readline().strip() == "writing", parent.stderr.read()[-3000:]
        workers = _children(parent.pid)
        assert len(workers) == 2 and all(_running(w) for w in workers)
        parent.send_signal(signal.SIGKILL)  # as the OOM killer does
        parent.wait(timeout=30)
        deadline = time.time() + 5
        while time.time() < deadline and any(_running(w) for w in workers):
            time.sleep(0.05)
        assert not [w for w in workers if _running(w)], "orphaned pool workers survived"
    finally:
        parent.kill()
        for w in workers:  # only the pids this test started
            if _running(w):
                os.kill(w, signal.SIGKILL)


def test_tmp_folder_of_a_killed_writer_is_removed_at_the_next_start(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    killed = _cache_worker(cache_dir, "kill")
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGXFSZ  # killed in the middle of np.save
    (left,) = cache_dir.glob(".tmp-*")
    assert (left / "image.npy").stat().st_size == FILE_SIZE_LIMIT  # half-written
    cache = _ct_cache(cache_dir)
    assert cache.prepare([Case("ct", CT)], progress=False)["built"] == 1
    assert not list(cache_dir.glob(".tmp-*"))  # not kept for hours to fill the disk
    # Folders of live writers, and of writers on other machines (pid unknown), are kept.
    from lrc_lightning.data.cache import _tmp_name

    live = cache_dir / _tmp_name("writer-alive")  # this process's
    elsewhere = cache_dir / ".tmp-x-1234@otherhost+1-0123abcd"
    live.mkdir()
    elsewhere.mkdir()
    assert cache.prepare([Case("ct", CT)], progress=False)["cached"] == 1
    assert sorted(p.name for p in cache_dir.glob(".tmp-*")) == sorted([live.name, elsewhere.name])


def test_full_disk_while_caching_names_the_cache_and_keeps_nothing_partial(
    tmp_path: Path,
) -> None:
    cache_dir = tmp_path / "cache"
    failed = _cache_worker(cache_dir, "limit")
    out, err = failed.communicate(timeout=120)
    assert failed.returncode == 3, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["type"] == "CacheWriteError"
    assert report["message"].startswith(f"LRC cache {cache_dir}: could not write image.npy of ")
    assert "requested and" in report["message"]  # numpy's own words, kept
    assert "the disk is full, or a quota or file-size limit was hit" in report["message"]
    assert list(cache_dir.iterdir()) == []  # no partial entry, no tmp folder
    # A rerun with room to write resumes.
    assert _ct_cache(cache_dir).prepare([Case("ct", CT)], progress=False)["built"] == 1
