"""Data pipeline figures: precompute throughput, cached-slice loads, DataLoader vs training.

    python benchmarks/data_pipeline.py [--data ../shared/data] [--cases 20] [--size 256]
        [--processes 1 2] [--sets chaos_t2 dicom_ct_512] [--loader-workers 1]
        [--device auto|cpu|cuda]

1. Precompute (read, normalise, resize, super-pixels, write) slices/s with 1 and 2 (or
   ``--processes``) processes, on chaos-t2 and on the DICOM CT, each into a fresh cache.
   Scaling = rate with the last process count / rate with the first.
2. Load time of one cached slice and its map from the memory map (median of 2000).
3. DataLoader batches/s (paired views, ``--batch-size``, ``--loader-workers`` workers)
   against the batches/s that one training step of MoCo v2 + LRC (UNet2d width 16, depth
   4) consumes on ``--device``.
4. Cache size of a 512x512x200 CT (the real 512x512 DICOM CT slices tiled to 200 slices):
   image + super-pixels against the raw int16 volume.
Ends with one JSON line of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lrc_lightning.data import PreprocessConfig, VolumeCache, discover_cases
from lrc_lightning.data.datasets import PairedViewSlices

ROOT = Path(__file__).resolve().parents[1]


def precompute_rate(cases, config, processes: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        cache = VolumeCache(tmp, config)
        t0 = time.perf_counter()
        cache.prepare(cases, processes=processes, progress=False)
        elapsed = time.perf_counter() - t0
        slices = sum(cache.load(c).image.shape[0] for c in cases)
    return slices / elapsed, slices


def dicom_read_times(dicom: Path, repeats: int = 3) -> tuple[float, float]:
    """Median wall and CPU seconds (all threads of this process) of one whole series read."""
    from lrc_lightning.data.io import read_volume

    read_volume(dicom)  # file cache warm
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        read_volume(dicom)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def cache_size_ratio(dicom: Path) -> tuple[float, int, int]:
    """(cache / raw) for image + super-pixels of a 512x512x200 CT built from real slices."""
    import SimpleITK as sitk

    from lrc_lightning.data.io import read_volume

    real = sitk.GetArrayFromImage(read_volume(dicom)).astype(np.int16)  # (20, 512, 512) HU
    volume = np.concatenate([real] * (200 // len(real) + 1))[:200]
    raw_bytes = volume.nbytes  # int16, as a scanner writes it
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct_512x512x200.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(volume), str(path))
        cache = VolumeCache(Path(tmp) / "cache", PreprocessConfig(modality="ct"))
        case = discover_cases([str(path)])[0]
        cache.prepare([case], processes=2, progress=False)
        entry = cache.entry_dir(case)
        cached = sum((entry / f).stat().st_size for f in ("image.npy", "superpixels.npy"))
    return cached / raw_bytes, cached, raw_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--cases", type=int, default=20, help="chaos-t2 cases to precompute")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sets", nargs="+", default=["chaos_t2", "dicom_ct_512"],
                        choices=["chaos_t2", "dicom_ct_512"])  # fmt: skip
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json-out", type=Path, help="also write the JSON line to this file")
    args = parser.parse_args()
    device = torch.device(
        "cuda"
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    headline: dict[str, float] = {}

    chaos = args.data / "chaos-t2"
    if not chaos.exists():
        chaos = ROOT / "data" / "chaos-t2-demo"
    chaos_cases = discover_cases(chaos)[: args.cases]
    sets = {}
    if "chaos_t2" in args.sets:
        sets["chaos_t2"] = (chaos_cases, PreprocessConfig(modality="mr"))
    dicom = args.data / "totalseg-example" / "example_ct_dicom"
    if not dicom.exists():
        print(f"[skip] {dicom} not found", file=sys.stderr)
    elif "dicom_ct_512" in args.sets:
        sets["dicom_ct_512"] = (discover_cases(dicom), PreprocessConfig(modality="ct"))
    print("precompute (read + normalise + super-pixels + write)")
    first = args.processes[0]
    for name, (cases, config) in sets.items():
        precompute_rate(cases[:1], config, 1)  # warm-up: numba compilation, file cache
        rates = {}
        for processes in args.processes:
            rate, slices = precompute_rate(cases, config, processes)
            rates[processes] = rate
            print(
                f"  {name:13s} {len(cases):3d} cases {slices:5d} slices  {processes} proc: "
                f"{rate:7.1f} slices/s"
            )
        for processes, rate in rates.items():
            headline[f"{name}_slices_per_s_{processes}proc"] = round(rate, 1)
            if processes != first:
                scaling = rate / rates[first]
                headline[f"{name}_scaling_{processes}proc"] = round(scaling, 2)
                print(f"  {name:13s} scaling {first} -> {processes} processes: {scaling:.2f}x")
    if dicom.exists() and "dicom_ct_512" in args.sets:
        wall, cpu = dicom_read_times(dicom)
        print(f"DICOM series, one whole read: {wall:.3f} s wall, {cpu:.3f} s CPU "
              f"(the decoder's own threads: {cpu / wall:.2f} cores busy)")  # fmt: skip
        headline["dicom_read_cores_busy"] = round(cpu / wall, 2)
        ratio, cached, raw = cache_size_ratio(dicom)
        print(f"cache size, 512x512x200 CT: image + super-pixels {cached / 2**20:.1f} MiB vs "
              f"raw int16 {raw / 2**20:.1f} MiB = {ratio:.2f}x")  # fmt: skip
        headline["ct_512x512x200_cache_over_raw"] = round(ratio, 3)

    with tempfile.TemporaryDirectory() as tmp:
        cases = chaos_cases
        cache = VolumeCache(tmp, PreprocessConfig(modality="mr", image_size=args.size))
        cache.prepare(cases, processes=2, progress=False)
        vols = [cache.load(c) for c in cases]
        rng = np.random.default_rng(0)
        times = []
        for _ in range(2000):
            v = vols[rng.integers(len(vols))]
            s = int(rng.integers(v.image.shape[0]))
            t0 = time.perf_counter()
            img = np.asarray(v.image[s], dtype=np.float32)
            sp = np.asarray(v.superpixels[s], dtype=np.int64)
            times.append(time.perf_counter() - t0)
        assert img.shape == sp.shape
        load_us = 1e6 * statistics.median(times)
        size = f"{args.size}x{args.size}"
        print(f"cached slice + map load: {load_us:.0f} us (median of 2000, {size})")
        headline["cached_slice_load_us"] = round(load_us, 1)

        dataset = PairedViewSlices(vols)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.loader_workers,
            persistent_workers=args.loader_workers > 0,
        )

        def endless() -> Iterator[dict]:  # small data sets: go round the epochs
            while True:
                yield from loader

        it = endless()
        next(it)
        t0 = time.perf_counter()
        n = max(20, 10 * args.loader_workers)
        for _ in range(n):
            batch = next(it)
        loader_rate = n / (time.perf_counter() - t0)

        from lrc_lightning.models import MoCoV2LRC, UNet2d

        model = MoCoV2LRC(UNet2d(width=16, depth=4), queue_size=1024).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        steps = 5 if device.type == "cpu" else 50
        for i in range(steps + 3):
            if i == 3:  # after warm-up (cuDNN autotuning, allocator)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            opt.zero_grad()
            loss = model.training_step(batch, 0)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_rate = steps / (time.perf_counter() - t0)
        workers = args.loader_workers
        print(
            f"DataLoader ({workers} workers, batch {args.batch_size}): {loader_rate:.2f} "
            f"batches/s; a training step on {device.type} consumes {step_rate:.2f} batches/s; "
            f"ratio {loader_rate / step_rate:.1f}"
        )
        headline[f"loader_batches_per_s_{workers}worker"] = round(loader_rate, 2)
        headline["train_steps_per_s"] = round(step_rate, 2)
        headline["loader_over_step"] = round(loader_rate / step_rate, 2)
    if args.json_out:
        args.json_out.write_text(json.dumps(headline, indent=1))
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
