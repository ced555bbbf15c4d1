"""Data pipeline figures: precompute throughput, cached-slice loads, DataLoader vs training.

    python benchmarks/data_pipeline.py [--data ../shared/data] [--cases 8] [--size 256]

1. Precompute (read, normalise, resize, super-pixels, write) slices/s with 1 and 2
   processes, on chaos-t2 and on the DICOM CT, each into a fresh cache.
2. Load time of one cached slice and its map from the memory map (median of 2000).
3. DataLoader batches/s (paired views, batch 8) against the batches/s that one training
   step of MoCo v2 + LRC (UNet2d width 16, depth 4) consumes on this CPU.
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
    args = parser.parse_args()
    headline: dict[str, float] = {}

    chaos = args.data / "chaos-t2"
    if not chaos.exists():
        chaos = ROOT / "data" / "chaos-t2-demo"
    sets = {"chaos_t2": (discover_cases(chaos)[: args.cases], PreprocessConfig(modality="mr"))}
    dicom = args.data / "totalseg-example" / "example_ct_dicom"
    if dicom.exists():
        sets["dicom_ct_512"] = (discover_cases(dicom), PreprocessConfig(modality="ct"))
    else:
        print(f"[skip] {dicom} not found", file=sys.stderr)
    print("precompute (read + normalise + super-pixels + write)")
    for name, (cases, config) in sets.items():
        rates = {}
        for processes in (1, 2):
            rate, slices = precompute_rate(cases, config, processes)
            rates[processes] = rate
            print(
                f"  {name:13s} {len(cases):3d} cases {slices:5d} slices  {processes} proc: "
                f"{rate:7.1f} slices/s"
            )
        headline[f"{name}_slices_per_s_1proc"] = round(rates[1], 1)
        headline[f"{name}_slices_per_s_2proc"] = round(rates[2], 1)
        headline[f"{name}_scaling_2proc"] = round(rates[2] / rates[1], 2)
        print(f"  {name:13s} scaling with 2 processes: {rates[2] / rates[1]:.2f}x")
    if dicom.exists():
        ratio, cached, raw = cache_size_ratio(dicom)
        print(f"cache size, 512x512x200 CT: image + super-pixels {cached / 2**20:.1f} MiB vs "
              f"raw int16 {raw / 2**20:.1f} MiB = {ratio:.2f}x")  # fmt: skip
        headline["ct_512x512x200_cache_over_raw"] = round(ratio, 3)

    with tempfile.TemporaryDirectory() as tmp:
        cases, _ = sets["chaos_t2"]
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
            num_workers=1,
            persistent_workers=True,
        )
        it = iter(loader)
        next(it)
        t0 = time.perf_counter()
        n = 20
        for _ in range(n):
            batch = next(it)
        loader_rate = n / (time.perf_counter() - t0)

        from lrc_lightning.models import MoCoV2LRC, UNet2d

        model = MoCoV2LRC(UNet2d(width=16, depth=4), queue_size=1024)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for i in range(6):
            if i == 1:
                t0 = time.perf_counter()
            opt.zero_grad()
            loss = model.training_step(batch, 0)
            loss.backward()
            opt.step()
        step_rate = 5 / (time.perf_counter() - t0)
        print(
            f"DataLoader (1 worker): {loader_rate:.2f} batches/s; training step consumes "
            f"{step_rate:.2f} batches/s; ratio {loader_rate / step_rate:.1f}"
        )
        headline["loader_batches_per_s_1worker"] = round(loader_rate, 2)
        headline["train_steps_per_s"] = round(step_rate, 2)
        headline["loader_over_step"] = round(loader_rate / step_rate, 2)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
