"""Why does (or doesn't) LRC help? Diagnostics of finished label-efficiency pre-trainings.

    python benchmarks/lrc_diagnostics.py --data ../shared/data/chaos-t2 --size 128 --width 8 \\
        --depth 4 --pretrain-steps 400 --finetune-steps 150 --seeds 0 1 2 \\
        --arms random moco moco_lrc --work-dir .lrc_bench --tag _cpu128

Takes the same options as ``benchmarks/label_efficiency.py`` (so that it finds the same
pre-trained weights, which it never trains) and measures, on the *validation* patients only
(never the test patients):

1. **What each pre-training trains**: the frozen-feature linear probe (k=1 labelled
   patient of each seed) on the encoder's bottleneck and on every decoder level. MoCo's
   loss reaches the encoder only, LRC's the decoder level it is applied to; the probe per
   level shows where each arm's representation is.
2. **Regions per image at each feature level**: on real pre-training batches (augmented
   paired views), the valid regions (present in both views, >= ``min_pixels`` pixels)
   that LRC's sampler finds per image, capped by ``num_regions`` and uncapped.

Writes ``lrc_diagnostics{tag}.{md,json}`` in ``--out``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrc_lightning.evaluation.label_efficiency import (
    Benchmark,
    Variant,
    atomic_json,
    build_parser,
)
from lrc_lightning.objective.regions import downsample_superpixels, select_regions
from lrc_lightning.objective.term import LRCConfig

ROOT = Path(__file__).resolve().parents[1]


def probe_levels(bench: Benchmark, arm: str, seed: int, levels: list[Any]) -> dict[str, float]:
    """Validation Dice of the linear probe on each feature level of one pre-trained arm."""
    variant = Variant(arm, LRCConfig(weight=bench.args.lrc_weight, schedule="linear",
                                     warmup_steps=bench.args.pretrain_steps // 5))  # fmt: skip
    labelled = bench.labelled(seed, 1)
    weights = None
    if arm != "random":
        weights = bench.weights_path(variant, seed, labelled)
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: run benchmarks/label_efficiency.py first")
    out = {}
    for level in levels:
        per_volume = bench.probe(weights, seed, labelled, stage="val", level=level)
        rows = np.array(list(per_volume.values()), dtype=float)
        out[str(level)] = float(np.nanmean(np.nanmean(rows, axis=0)))
    return out


def regions_per_level(bench: Benchmark, batches: int, levels: list[int]) -> dict[str, Any]:
    """Valid LRC regions per image at each decoder level's resolution, on real batches."""
    torch.manual_seed(0)
    lrc = LRCConfig()
    datamodule = bench.datamodule(Variant("moco_lrc", lrc), bench.labelled(0, 1))
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = iter(datamodule.train_dataloader())
    size, depth = bench.args.size, bench.args.depth
    counts: dict[str, dict[str, list[float]]] = {}
    for _ in range(batches):
        batch = next(loader)
        for level in levels:
            side = size // 2 ** (depth - 1 - (level % depth))
            m1 = downsample_superpixels(batch["superpixels_v1"], (side, side), lrc.downsample)
            m2 = downsample_superpixels(batch["superpixels_v2"], (side, side), lrc.downsample)
            _, capped = select_regions(m1, m2, lrc.num_regions, lrc.min_pixels)
            _, uncapped = select_regions(m1, m2, side * side, lrc.min_pixels)
            entry = counts.setdefault(f"{level} ({side}x{side})", {"capped": [], "all": []})
            entry["capped"] += capped.sum(1).float().tolist()
            entry["all"] += uncapped.sum(1).float().tolist()
    return {
        level: {"mean_valid": statistics.fmean(v["capped"]), "min_valid": min(v["capped"]),
                "mean_present_in_both": statistics.fmean(v["all"]),
                "images_below_2": sum(c < 2 for c in v["capped"]) / len(v["capped"])}
        for level, v in counts.items()
    }  # fmt: skip


def main() -> None:
    parser = build_parser({"data": str(ROOT.parent / "shared" / "data" / "chaos-t2"),
                           "out": str(ROOT / "benchmarks" / "results")})  # fmt: skip
    parser.add_argument("--region-batches", type=int, default=8)
    args = parser.parse_args()
    bench = Benchmark(args)
    levels: list[Any] = ["bottleneck", *range(-args.depth, 0)]
    probes: dict[str, dict[str, list[float]]] = {}
    for arm in args.arms:
        for seed in args.seeds:
            for level, dice in probe_levels(bench, arm, seed, levels).items():
                probes.setdefault(arm, {}).setdefault(level, []).append(dice)
            print(f"{arm} seed {seed}: " + ", ".join(
                f"{lv} {v[-1]:.3f}" for lv, v in probes[arm].items()), flush=True)  # fmt: skip
    regions = regions_per_level(bench, args.region_batches, list(range(-args.depth, 0)))
    command = "python " + " ".join(sys.argv)
    lines = [f"# LRC diagnostics{args.tag}: validation patients, k=1", "", f"`{command}`", "",
             "## Linear probe per feature level (mean 3D Dice over organs; mean ± sd over "
             f"{len(args.seeds)} seeds)", "",
             "| arm | " + " | ".join(str(lv) for lv in levels) + " |",
             "|---|" + "---|" * len(levels)]  # fmt: skip
    for arm, per_level in probes.items():
        cells = [f"{statistics.fmean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}"
                 for v in per_level.values()]  # fmt: skip
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", f"## Regions per image ({args.region_batches} pre-training batches of "
              f"{args.batch_size}, N = {LRCConfig.num_regions} slots, min_pixels = "
              f"{LRCConfig.min_pixels})", "",
              "| decoder level | valid slots (mean) | min | regions in both views (mean) | "
              "images with < 2 |", "|---|---|---|---|---|"]  # fmt: skip
    for level, r in regions.items():
        below = 100 * r["images_below_2"]
        lines.append(f"| {level} | {r['mean_valid']:.1f} | {r['min_valid']:.0f} | "
                     f"{r['mean_present_in_both']:.1f} | {below:.0f}% |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    (out / f"lrc_diagnostics{args.tag}.md").write_text(text)
    atomic_json(out / f"lrc_diagnostics{args.tag}.json",
                {"command": command, "probe_per_level": probes, "regions": regions})  # fmt: skip
    print(text)


if __name__ == "__main__":
    main()
