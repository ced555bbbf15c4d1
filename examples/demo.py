"""The README's main job: MoCo v2 + LRC pre-training, export, fine-tuning with one labelled
patient, and 3D Dice per organ on a held-out patient, on the CHAOS volumes in data/ (CPU).

    python examples/demo.py [--pretrain-epochs 10] [--finetune-epochs 30] [--size 96]

It drives the example configs through the `lrc-lightning` CLI (in-process), exactly as you
would from a shell; every run's logs, checkpoints and config land under --out.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from lrc_lightning.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
ORGANS = ["liver", "right_kidney", "left_kidney", "spleen"]


def run_args(config: str, out: Path, args: argparse.Namespace, epochs: int) -> list[str]:
    return [
        "--config", str(CONFIGS / f"{config}.yaml"),
        "--data.data", args.data,
        "--data.cache_dir", args.cache_dir,
        "--data.image_size", str(args.size),
        "--data.batch_size", str(args.batch_size),
        "--model.init_args.backbone.init_args.width", str(args.width),
        "--trainer.max_epochs", str(epochs),
        "--trainer.max_steps", str(args.max_steps),
        "--trainer.accelerator", "cpu",
        "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out),
    ]  # fmt: skip


def newest(out: Path, pattern: str) -> Path:
    found = sorted(out.rglob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {pattern} under {out}")
    return found[-1]


def test_metrics(out: Path) -> dict[str, float]:
    with open(newest(out, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("test/") and v}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "chaos-t2-demo"))
    parser.add_argument("--cache-dir", default=".lrc_cache")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=30)
    parser.add_argument("--max-steps", type=int, default=-1, help="cap each run (smoke tests)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()

    print("== 1/4 pre-training: MoCo v2 + LRC", flush=True)
    cli(["fit", *run_args("moco_lrc", out / "pretrain", args, args.pretrain_epochs)])
    print("== 2/4 export of the pre-trained backbone", flush=True)
    backbone = out / "backbone.pt"
    cli(["export", "--ckpt", str(newest(out / "pretrain", "last.ckpt")), "--out", str(backbone)])
    print("== 3/4 fine-tuning with one labelled patient", flush=True)
    finetune = run_args("finetune", out / "finetune", args, args.finetune_epochs)
    cli(["fit", *finetune, "--model.init_args.pretrained", str(backbone)])
    print("== 4/4 test on the held-out patient (3D Dice)", flush=True)
    # The checkpoint of the best validation Dice (the last one if validation never ran).
    best = next(iter(sorted((out / "finetune").rglob("best*.ckpt"))), None)
    best = best or newest(out / "finetune", "last.ckpt")
    cli(["test", *run_args("finetune", out / "test", args, 1), "--ckpt_path", str(best),
         "--model.init_args.pretrained", str(backbone)])  # fmt: skip

    result = test_metrics(out / "test")
    print(f"\n3D Dice on the test patient after {time.perf_counter() - start:.0f} s:")
    for organ in [*ORGANS, "mean"]:
        value = result.get(f"test/dice_{organ}", float("nan"))
        print(f"  {organ:<13} {value:.3f}")
    print(f"logs, checkpoints and configs: {out}/")


if __name__ == "__main__":
    main()
