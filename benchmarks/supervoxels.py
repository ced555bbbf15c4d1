"""3D supervoxels vs per-slice 2D super-pixels on a CT at clinical size: time and memory.

    python benchmarks/supervoxels.py [--ct ../shared/data/totalseg-example/example_ct.nii.gz]
        [--shape 200 512 512] [--connectivity 6 26] [--out benchmarks/results/supervoxels_cpu.txt]

The CT is resampled (linear) onto a (z, y, x) grid of ``--shape`` covering the same body,
windowed (abdomen, -160..240 HU) to [0, 1], and handed to each method in a fresh process
on one core (``NUMBA_NUM_THREADS=1``, ``OMP_NUM_THREADS=1``): ``felzenszwalb_3d`` (6- and,
if asked, 26-connected, spacing-aware smoothing) and ``felzenszwalb_volume`` (2D per slice,
one process). Each process reports the wall time of the call (numba compiled beforehand on
a small volume) and its peak resident memory (``ru_maxrss``), also above what it held
before the call. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CT = ROOT.parent / "shared" / "data" / "totalseg-example" / "example_ct.nii.gz"
PARAMS = {"scale": 100.0, "sigma": 0.8, "min_size": 50}


def resampled_ct(path: Path, shape: tuple[int, int, int]) -> tuple[np.ndarray, tuple]:
    """The CT on a (z, y, x) grid of ``shape`` over the same extent, windowed to [0, 1]."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    size = np.array(image.GetSize(), dtype=float)  # (x, y, z)
    spacing = np.array(image.GetSpacing()) * size / np.array(shape[::-1], dtype=float)
    resampled = sitk.Resample(image, [int(s) for s in shape[::-1]], sitk.Transform(),
                              sitk.sitkLinear, image.GetOrigin(), spacing.tolist(),
                              image.GetDirection(), -1024.0, image.GetPixelID())  # fmt: skip
    hu = sitk.GetArrayFromImage(resampled).astype(np.float32)
    return np.clip((hu + 160.0) / 400.0, 0.0, 1.0), tuple(float(s) for s in spacing[::-1])


def _child(method: str, volume_path: str, spacing: list[float]) -> None:
    """Runs in a fresh process: one method on the saved volume; prints a JSON line."""
    from lrc_lightning.superpixels import felzenszwalb_3d, felzenszwalb_volume

    small = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    felzenszwalb_3d(small, connectivity=26 if method == "3d-26" else 6)  # compile
    felzenszwalb_volume(small, processes=1)
    volume = np.load(volume_path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "2d":
        labels = felzenszwalb_volume(volume, processes=1, **PARAMS)
    else:
        labels = felzenszwalb_3d(volume, spacing=tuple(spacing), **PARAMS,
                                 connectivity=int(method.split("-")[1]))  # fmt: skip
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    regions = int(labels.max()) + 1 if method != "2d" else int(
        sum(int(s.max()) + 1 for s in labels))  # fmt: skip
    print(json.dumps({"method": method, "seconds": seconds, "peak_gib": peak / 2**20,
                      "peak_above_input_gib": (peak - before) / 2**20,
                      "regions": regions}))  # fmt: skip


def _source_state() -> str:
    """The commit the code was at, and whether src/ differed from it."""

    def git(*words: str) -> str:
        done = subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "?"

    dirty = git("status", "--porcelain", "src")
    return f"commit {git('rev-parse', '--short', 'HEAD')}" + (" + changes in src/" if dirty else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=Path, default=DEFAULT_CT)
    parser.add_argument("--shape", type=int, nargs=3, default=[200, 512, 512])
    parser.add_argument("--connectivity", type=int, nargs="+", default=[6])
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1], json.loads(args.child[2]))
        return
    if not args.ct.is_file():
        parser.exit(2, f"supervoxels: error: no CT at {args.ct} (give --ct)\n")
    volume, spacing = resampled_ct(args.ct, tuple(args.shape))
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "ct.npy")
        np.save(path, volume)
        for method in [*(f"3d-{c}" for c in args.connectivity), "2d"]:
            done = subprocess.run(
                [sys.executable, __file__, "--child", method, path, json.dumps(spacing)],
                capture_output=True, text=True, env=env, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                parser.exit(1, f"{method} failed:\n{done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    voxels = volume.size
    lines = [
        f"CT {args.ct.name} resampled to {tuple(args.shape)} (z, y, x), spacing "
        f"{tuple(round(s, 3) for s in spacing)} mm, {voxels / 1e6:.1f} M voxels; one core; "
        f"scale={PARAMS['scale']}, sigma={PARAMS['sigma']}, min_size={PARAMS['min_size']}",
        "| method | seconds | M voxels/s | peak RSS GiB | above input GiB | regions |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seconds']:.1f} | {voxels / r['seconds'] / 1e6:.2f} "
                     f"| {r['peak_gib']:.2f} | {r['peak_above_input_gib']:.2f} "
                     f"| {r['regions']} |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        command = " ".join(argv if argv is not None else sys.argv[1:])
        args.out.write_text(f"{text}\n\ncommand: python benchmarks/supervoxels.py {command}\n"
                            f"code: {_source_state()}\n")  # fmt: skip
    print(json.dumps({"shape": args.shape, "voxels": voxels, "rows": rows}))


if __name__ == "__main__":
    main()
