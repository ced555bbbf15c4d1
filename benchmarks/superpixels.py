"""Fast Felzenszwalb vs skimage on real slices: agreement (ARI) and speed, side by side.

    python benchmarks/superpixels.py [--data ../shared/data] [--repeats 7]

Times one core (numba and numpy single-threaded), alternating the two implementations on
the same slice; prints the median of the repeats and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import SimpleITK as sitk
from skimage.segmentation import felzenszwalb as sk_felzenszwalb

from lrc_lightning.superpixels import felzenszwalb

ROOT = Path(__file__).resolve().parents[1]


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """ARI from the contingency table (Hubert & Arabie), no sklearn needed."""
    a, b = a.ravel(), b.ravel()
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)

    def comb2(x: np.ndarray) -> float:
        return float((x * (x - 1) // 2).sum())

    index = comb2(table)
    rows, cols, n = comb2(table.sum(1)), comb2(table.sum(0)), comb2(np.array([a.size]))
    expected = rows * cols / n
    maximum = 0.5 * (rows + cols)
    return 1.0 if maximum == expected else (index - expected) / (maximum - expected)


def load_slices(data: Path) -> dict[str, list[np.ndarray]]:
    chaos = data / "chaos-t2" / "imagesTr"
    if not chaos.exists():
        chaos = ROOT / "data" / "chaos-t2-demo" / "imagesTr"
    mr = []
    for path in sorted(chaos.glob("*.nii.gz"))[:3]:
        vol = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
        lo, hi = np.percentile(vol, [0.5, 99.5])
        vol = np.clip((vol - lo) / (hi - lo), 0, 1).astype(np.float32)
        mr += [vol[len(vol) // 2], vol[len(vol) // 3]]
    out = {"mr_256": mr}
    dicom = data / "totalseg-example" / "example_ct_dicom"
    if dicom.exists():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom)))
        hu = sitk.GetArrayFromImage(reader.Execute()).astype(np.float32)
        out["ct_512"] = [np.clip((hu[z] + 175) / 425, 0, 1) for z in (3, 10, 16)]
    else:
        print(f"[skip] {dicom} not found: no 512x512 CT figures")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--scale", type=float, default=100.0)
    parser.add_argument("--sigma", type=float, default=0.8)
    parser.add_argument("--min-size", type=int, default=50)
    args = parser.parse_args()
    kw = dict(scale=args.scale, sigma=args.sigma, min_size=args.min_size)
    felzenszwalb(np.random.rand(16, 16).astype(np.float32))  # compile outside the timing

    headline: dict[str, float] = {}
    print(
        f"{'set':8s} {'slices':>6s} {'ARI min':>8s} {'regions':>8s} "
        f"{'skimage ms':>10s} {'ours ms':>8s} {'ratio':>6s}"
    )
    for name, slices in load_slices(args.data).items():
        aris, ratios, t_sk, t_ours, regions = [], [], [], [], []
        for image in slices:
            ref = sk_felzenszwalb(image, **kw)
            ours = felzenszwalb(image, **kw)
            aris.append(adjusted_rand_index(ref, ours))
            regions.append(int(ours.max()) + 1)
            sk_times, our_times = [], []
            for _ in range(args.repeats):  # alternate so that drift hits both alike
                t0 = time.perf_counter()
                sk_felzenszwalb(image, **kw)
                t1 = time.perf_counter()
                felzenszwalb(image, **kw)
                t2 = time.perf_counter()
                sk_times.append(t1 - t0)
                our_times.append(t2 - t1)
            a, b = statistics.median(sk_times), statistics.median(our_times)
            t_sk.append(a)
            t_ours.append(b)
            ratios.append(a / b)
        print(
            f"{name:8s} {len(slices):6d} {min(aris):8.4f} {statistics.median(regions):8.0f} "
            f"{1e3 * statistics.median(t_sk):10.1f} {1e3 * statistics.median(t_ours):8.1f} "
            f"{statistics.median(ratios):6.1f}"
        )
        headline[f"{name}_ari_min"] = round(min(aris), 5)
        headline[f"{name}_speed_ratio"] = round(statistics.median(ratios), 2)
        headline[f"{name}_ours_ms"] = round(1e3 * statistics.median(t_ours), 2)
        headline[f"{name}_skimage_ms"] = round(1e3 * statistics.median(t_sk), 2)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
