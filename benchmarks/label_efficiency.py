"""Label efficiency on real MRI: does LRC improve segmentation from few labelled patients?

    python benchmarks/label_efficiency.py --data ../shared/data/chaos-t2 [--size 64]
        [--width 8] [--pretrain-steps 250] [--finetune-steps 150] [--seeds 0 1 2]
        [--ks 1 2 4] [--arms random moco moco_lrc lrc_only supervised_lrc] [--ablations]
        [--lrc-weight 0.3] [--precision bf16-mixed] [--report-only] [--tag _gpu]

Protocol (LRC_SPEC.md §2): a fixed split by patient (``--split-seed``): 5 test patients,
2 validation patients, the rest the pre-training pool (images only). Per seed, the k
labelled patients are the first k of a seeded permutation of the pool (nested: k=1 inside
k=2 inside k=4), so seeds vary initialisation, sampling *and* which patients are labelled.

Arms (same U-Net, same fine-tuning budget): ``random`` (no pre-training), ``moco`` (MoCo v2),
``moco_lrc`` (MoCo v2 + LRC), ``lrc_only`` (LRC, no global branch), ``supervised_lrc``
(CE + Dice + LRC pre-training on the k labelled patients only, then fine-tuning on them:
the only labels this setting may use). Pre-training runs once per arm and seed (it never
sees labels, so it does not depend on k), except ``supervised_lrc``.

Reported: 3D Dice per organ on each test volume (lrc_lightning.metrics), mean over
organs per run, then mean +- std over seeds. Ablations (``--ablations``) compare the [ours]
choices of MoCo + LRC on the *validation* patients (never the test patients) at k =
``--ablation-k``. Every finished run is a JSON file under ``<out>/label_efficiency_runs``,
named with a hash of the options that change results (and, for arms with LRC, of the LRC
and super-pixel recipe); a rerun with the same options skips it (resumable), other options
never reuse it. ``--report-only`` writes the tables from the finished runs and names the
missing ones. Outputs: ``label_efficiency{tag}.{md,json,png}`` and
``label_efficiency_ablations{tag}.{md,json}`` in ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from lrc_lightning import LRCConfig, LRCDataModule, __version__
from lrc_lightning.data import discover_cases
from lrc_lightning.data.splits import split_cases
from lrc_lightning.models import (
    FineTuneSegmentation,
    MoCoV2,
    MoCoV2LRC,
    SupervisedSegmentationLRC,
    UNet2d,
)

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("random", "moco", "moco_lrc", "lrc_only", "supervised_lrc")
ORGANS = ["liver", "right_kidney", "left_kidney", "spleen"]


@dataclass(frozen=True)
class Variant:
    """One pre-training recipe (arm + LRC options + super-pixel scale)."""

    arm: str
    lrc: LRCConfig = field(default_factory=LRCConfig)
    superpixel_scale: float = 100.0
    superpixel_min_size: int = 50
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.arm

    @property
    def key(self) -> str:
        """Hash of the recipe's LRC and super-pixel options ("" for arms without LRC), so
        that a changed default never reuses runs made with the old one."""
        if self.arm in ("random", "moco"):
            return ""
        recipe = {"lrc": asdict(self.lrc), "superpixel_scale": self.superpixel_scale,
                  "superpixel_min_size": self.superpixel_min_size}  # fmt: skip
        blob = json.dumps(recipe, sort_keys=True).encode()
        return "-" + hashlib.blake2b(blob, digest_size=3).hexdigest()


def atomic_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


#: The options that change results; finished runs and weights are keyed by their hash.
RESULT_OPTIONS = (
    "size", "width", "depth", "batch_size", "lr", "queue_size", "pretrain_steps",
    "finetune_steps", "test_cases", "val_cases", "split_seed", "precision",
)  # fmt: skip


def settings_key(args: argparse.Namespace) -> str:
    settings = {k: getattr(args, k) for k in RESULT_OPTIONS}
    settings["data"] = Path(args.data).name
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=4).hexdigest()


class Benchmark:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.key = settings_key(args)
        self.out = Path(args.out)
        self.runs = self.out / "label_efficiency_runs"
        self.work = Path(args.work_dir)
        cases = discover_cases(args.data)
        split = split_cases(cases, args.test_cases, args.val_cases, None, args.split_seed)
        self.test = [c.case_id for c in split.test]
        self.val = [c.case_id for c in split.val]
        self.pool = sorted(c.case_id for c in split.pool)
        print(f"test patients {self.test}\nvalidation patients {self.val}\n"
              f"pool ({len(self.pool)}) {self.pool}", flush=True)  # fmt: skip

    # ------------------------------------------------------------------ building blocks
    def labelled(self, seed: int, k: int) -> list[str]:
        order = np.random.default_rng(1000 + seed).permutation(len(self.pool))
        return [self.pool[i] for i in order[:k]]

    def datamodule(self, variant: Variant | None, labelled: list[str], **kw: Any) -> LRCDataModule:
        a = self.args
        return LRCDataModule(
            a.data, cache_dir=a.cache_dir, image_size=a.size, batch_size=a.batch_size,
            modality="mr", test_cases=self.test, val_cases=self.val, labelled_cases=labelled,
            superpixel_scale=variant.superpixel_scale if variant else 100.0,
            superpixel_min_size=variant.superpixel_min_size if variant else 50,
            num_workers=a.num_workers, persistent_workers=a.num_workers > 0,
            precompute_workers=a.precompute_workers, **kw,
        )  # fmt: skip

    def backbone(self) -> UNet2d:
        return UNet2d(width=self.args.width, depth=self.args.depth)

    def trainer(self, steps: int) -> pl.Trainer:
        return pl.Trainer(
            accelerator=self.args.accelerator, devices=1, max_steps=steps, max_epochs=-1,
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            precision=self.args.precision,
        )  # fmt: skip

    def pretrain(self, variant: Variant, seed: int, labelled: list[str]) -> Path:
        """Pre-train (or reuse) and return the backbone weights file."""
        suffix = f"_k{len(labelled)}" if variant.arm == "supervised_lrc" else ""
        path = self.work / f"pretrain_{variant.label}_s{seed}{suffix}-{self.key}{variant.key}.pt"
        if path.is_file():
            return path
        pl.seed_everything(seed, workers=True)
        a = self.args
        common = dict(lr=a.lr, warmup_steps=a.pretrain_steps // 10)
        if variant.arm == "moco":
            model: pl.LightningModule = MoCoV2(self.backbone(), queue_size=a.queue_size, **common)
        elif variant.arm in ("moco_lrc", "lrc_only"):
            model = MoCoV2LRC(self.backbone(), lrc=variant.lrc, queue_size=a.queue_size,
                              global_weight=0.0 if variant.arm == "lrc_only" else 1.0,
                              **common)  # fmt: skip
        elif variant.arm == "supervised_lrc":
            model = SupervisedSegmentationLRC(self.backbone(), lrc=variant.lrc,
                                              num_classes=len(ORGANS) + 1, **common)  # fmt: skip
        else:
            raise ValueError(variant.arm)
        extra = ({"pretrain_with_labels": True, "pretrain_on": "labelled"}
                 if variant.arm == "supervised_lrc" else {})  # fmt: skip
        start = time.perf_counter()
        self.trainer(a.pretrain_steps).fit(model, self.datamodule(variant, labelled, **extra))
        self.work.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.backbone.state_dict(), tmp)  # type: ignore[union-attr]
        os.replace(tmp, path)
        print(f"  pre-trained {path.name} in {time.perf_counter() - start:.0f} s", flush=True)
        return path

    def finetune(self, weights: Path | None, seed: int, labelled: list[str], stage: str) -> dict:
        pl.seed_everything(seed, workers=True)
        a = self.args
        model = FineTuneSegmentation(
            self.backbone(), pretrained=str(weights) if weights else None,
            num_classes=len(ORGANS) + 1, class_names=ORGANS, lr=a.lr,
            warmup_steps=a.finetune_steps // 10,
        )  # fmt: skip
        datamodule = self.datamodule(None, labelled, mode="finetune")
        self.trainer(a.finetune_steps).fit(model, datamodule)
        evaluator = pl.Trainer(accelerator=a.accelerator, devices=1, logger=False,
                               enable_progress_bar=False, enable_model_summary=False,
                               precision=a.precision)  # fmt: skip
        evaluate = evaluator.test if stage == "test" else evaluator.validate
        evaluate(model, datamodule, verbose=False)
        if not model.last_dice_table:
            raise RuntimeError(f"no {stage} volume was evaluated")
        return dict(model.last_dice_table)

    def run(
        self, variant: Variant, k: int, seed: int, stage: str = "test"
    ) -> dict[str, Any] | None:
        """One finished run (computed now unless saved); None if missing in report-only mode."""
        run_id = f"{stage}_{variant.label}_k{k}_s{seed}"
        path = self.runs / f"{run_id}-{self.key}{variant.key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        if self.args.report_only:
            print(f"[missing] {run_id}", file=sys.stderr)
            return None
        labelled = self.labelled(seed, k)
        start = time.perf_counter()
        weights = None if variant.arm == "random" else self.pretrain(variant, seed, labelled)
        per_volume = self.finetune(weights, seed, labelled, stage)
        rows = np.array(list(per_volume.values()), dtype=float)
        per_organ = np.nanmean(rows, axis=0)
        result = {
            "run": run_id, "arm": variant.label, "k": k, "seed": seed, "stage": stage,
            "labelled": labelled, "per_volume": per_volume,
            "per_organ": dict(zip(ORGANS, per_organ.tolist(), strict=True)),
            "mean_dice": float(np.nanmean(per_organ)),
            "variant": {"arm": variant.arm, "lrc": asdict(variant.lrc),
                        "superpixel_scale": variant.superpixel_scale,
                        "superpixel_min_size": variant.superpixel_min_size},
            "seconds": round(time.perf_counter() - start, 1),
        }  # fmt: skip
        atomic_json(path, result)
        print(f"{run_id}: mean Dice {result['mean_dice']:.3f} "
              f"({result['seconds']:.0f} s)", flush=True)  # fmt: skip
        return result


def summarise(results: list[dict[str, Any] | None], by: str = "arm") -> dict[str, Any]:
    table: dict[str, Any] = {}
    for r in filter(None, results):
        table.setdefault(f"{r[by]}|{r['k']}", []).append(r)
    summary = {}
    for key, runs in table.items():
        arm, k = key.split("|")
        means = [r["mean_dice"] for r in runs]
        summary[key] = {
            "arm": arm, "k": int(k), "n_seeds": len(runs),
            "mean": statistics.fmean(means),
            "std": statistics.stdev(means) if len(means) > 1 else 0.0,
            "per_organ": {o: float(np.nanmean([r["per_organ"][o] for r in runs])) for o in ORGANS},
            "runs": [{"seed": r["seed"], "mean_dice": r["mean_dice"], "labelled": r["labelled"],
                      "per_organ": r["per_organ"]} for r in runs],
        }  # fmt: skip
    return summary


def header(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "command": "python " + " ".join(sys.argv),
        "versions": {"lrc_lightning": __version__, "torch": torch.__version__,
                     "pytorch_lightning": pl.__version__, "python": platform.python_version()},
        "hardware": {"machine": platform.machine(), "cpus": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(),
                     "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
    }  # fmt: skip


def markdown(summary: dict[str, Any], head: dict[str, Any], title: str, arms: list[str]) -> str:
    ks = sorted({v["k"] for v in summary.values()})
    lines = [f"# {title}", "", f"`{head['command']}`", "",
             f"versions: {head['versions']}  ", f"hardware: {head['hardware']}", "",
             "Mean 3D Dice over organs, mean ± std over seeds (n seeds in brackets).", "",
             "| arm | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---|" + "---|" * len(ks)]  # fmt: skip
    for arm in arms:
        cells = []
        for k in ks:
            s = summary.get(f"{arm}|{k}")
            cells.append(f"{s['mean']:.3f} ± {s['std']:.3f} ({s['n_seeds']})" if s else "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per organ (mean over seeds):",
        "",
        "| arm | k | " + " | ".join(ORGANS) + " |",
        "|---|---|" + "---|" * len(ORGANS),
    ]
    for arm in arms:
        for k in ks:
            s = summary.get(f"{arm}|{k}")
            if s:
                organs = " | ".join(f"{s['per_organ'][o]:.3f}" for o in ORGANS)
                lines.append(f"| {arm} | {k} | {organs} |")
    lines += paired_section(summary, arms)
    return "\n".join(lines) + "\n"


def paired_differences(
    summary_a: dict[str, Any], arm_a: str, summary_b: dict[str, Any], arm_b: str
) -> dict[str, Any] | None:
    """Mean Dice of ``arm_a`` minus ``arm_b`` over the (k, seed) pairs both have: mean, per
    k, pairs won, sd and standard error of the mean (None without a common pair)."""

    def runs(summary: dict[str, Any], arm: str) -> dict[tuple[int, int], float]:
        return {(v["k"], r["seed"]): r["mean_dice"]
                for v in summary.values() if v["arm"] == arm for r in v["runs"]}  # fmt: skip

    a, b = runs(summary_a, arm_a), runs(summary_b, arm_b)
    pairs = sorted(set(a) & set(b))
    if not pairs:
        return None
    diffs = [a[p] - b[p] for p in pairs]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    ks = sorted({k for k, _ in pairs})
    return {
        "mean": statistics.fmean(diffs),
        "per_k": {k: statistics.fmean([a[p] - b[p] for p in pairs if p[0] == k]) for k in ks},
        "won": sum(d > 0 for d in diffs), "n": len(diffs), "sd": sd,
        "se": sd / len(diffs) ** 0.5,
    }  # fmt: skip


def paired_table(rows: list[tuple[str, dict[str, Any] | None]]) -> list[str]:
    lines = ["| comparison | mean difference | per k | pairs won | sd | s.e. |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for label, d in rows:
        if d:
            per_k = ", ".join(f"k={k}: {v:+.3f}" for k, v in d["per_k"].items())
            lines.append(f"| {label} | {d['mean']:+.3f} | {per_k} | {d['won']}/{d['n']} | "
                         f"{d['sd']:.3f} | {d['se']:.3f} |")  # fmt: skip
    return lines


def paired_section(summary: dict[str, Any], arms: list[str]) -> list[str]:
    """Each arm against random init and against MoCo, paired by (k, seed)."""
    pairs = [(arm, ref) for ref in ("random", "moco") for arm in arms if arm not in (ref, "random")]
    rows = [(f"{a} - {r}", paired_differences(summary, a, summary, r)) for a, r in pairs]
    if not any(d for _, d in rows):
        return []
    return ["", "Paired differences of mean Dice (same k, seed and labelled patients):", "",
            *paired_table(rows)]  # fmt: skip


def plot(summary: dict[str, Any], arms: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[skip] matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        points = sorted((v["k"], v["mean"], v["std"]) for v in summary.values() if v["arm"] == arm)
        if points:
            k, mean, std = zip(*points, strict=True)
            ax.errorbar(k, mean, yerr=std, marker="o", capsize=3, label=arm)
    ax.set_xlabel("labelled patients (k)")
    ax.set_ylabel("mean 3D Dice (test)")
    ax.set_xticks(sorted({v["k"] for v in summary.values()}))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def ablation_variants(base: LRCConfig) -> list[Variant]:
    """One change at a time around the reference recipe (lambda = 1: the default when the
    ablation was run; its winner, lambda = 0.3, is the default now)."""
    ref = replace(base, weight=1.0)
    return [
        # References: the same validation protocol without LRC.
        Variant("random", base),
        Variant("moco", base),
        Variant("moco_lrc", ref, name="reference_lambda=1"),
        Variant("moco_lrc", replace(ref, samples_per_region=None), name="pooled(M=None)"),
        Variant("moco_lrc", replace(ref, downsample="majority", feature_level=-2),
                name="majority@level-2"),
        Variant("moco_lrc", replace(ref, feature_level=-2), name="nearest@level-2"),
        Variant("moco_lrc", replace(ref, weight=0.3), name="lambda=0.3"),
        Variant("moco_lrc", replace(ref, weight=3.0), name="lambda=3"),
        Variant("moco_lrc", ref, superpixel_scale=50.0, name="scale=50"),
        Variant("moco_lrc", ref, superpixel_scale=200.0, name="scale=200"),
        # min_size is in pixels: 50 suits 256x256; scaled by area it is ~12 at 128, ~3 at 64.
        Variant("moco_lrc", ref, superpixel_min_size=12, name="min_size=12"),
        Variant("moco_lrc", ref, superpixel_min_size=3, name="min_size=3"),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chaos-t2"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--work-dir", default=".lrc_bench", help="pre-trained weights")
    parser.add_argument("--cache-dir", default=".lrc_cache")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument("--pretrain-steps", type=int, default=250)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--test-cases", type=int, default=5)
    parser.add_argument("--val-cases", type=int, default=2)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--lrc-weight", type=float, default=LRCConfig.weight,
                        help="lambda of the LRC arms (default: the library's)")  # fmt: skip
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--ablation-k", type=int, default=1)
    parser.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--skip-main", action="store_true", help="run only the ablations")
    parser.add_argument(
        "--report-only", action="store_true", help="tables from the finished runs only; run nothing"
    )
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--precompute-workers", type=int, default=1, help="super-pixel cache")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.data).exists():
        parser.exit(2, f"data not found: {args.data} (give --data path/to/chaos-t2)\n")
    bench = Benchmark(args)
    head = header(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = LRCConfig(
        weight=args.lrc_weight, schedule="linear", warmup_steps=args.pretrain_steps // 5
    )

    def header_of(name: str) -> dict[str, Any]:
        # A report rebuilt from finished runs keeps the command and hardware of the runs.
        saved = out / f"{name}.json"
        if args.report_only and saved.is_file():
            return {k: v for k, v in json.loads(saved.read_text()).items() if k != "summary"}
        return head

    if not args.skip_main:
        variants = {arm: Variant(arm, base) for arm in args.arms}
        results = [bench.run(variants[arm], k, seed)
                   for seed in args.seeds for k in args.ks for arm in args.arms]  # fmt: skip
        summary = summarise(results)
        name = f"label_efficiency{args.tag}"
        main_head = header_of(name)
        atomic_json(out / f"{name}.json", {**main_head, "summary": summary})
        title = "Label efficiency on CHAOS T2 (test patients)"
        text = markdown(summary, main_head, title, args.arms)
        (out / f"{name}.md").write_text(text)
        plot(summary, args.arms, out / f"{name}.png")
        print(text)

    if args.ablations:
        variants_ab = ablation_variants(base)
        results = [bench.run(v, args.ablation_k, seed, stage="val")
                   for seed in args.ablation_seeds for v in variants_ab]  # fmt: skip
        summary = summarise(results)
        title = (f"Ablations of MoCo + LRC [ours] choices: validation patients, "
                 f"k={args.ablation_k}")  # fmt: skip
        names = [v.label for v in variants_ab]
        name = f"label_efficiency_ablations{args.tag}"
        ablation_head = header_of(name)
        text = markdown(summary, ablation_head, title, names)
        (out / f"{name}.md").write_text(text)
        atomic_json(out / f"{name}.json", {**ablation_head, "summary": summary})
        print(text)


if __name__ == "__main__":
    main()
