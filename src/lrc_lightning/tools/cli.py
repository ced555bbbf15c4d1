"""The ``lrc-lightning`` command: LightningCLI for fit/validate/test, plus precompute/export.

    lrc-lightning fit --config examples/configs/moco_lrc.yaml
    lrc-lightning precompute --config examples/configs/moco_lrc.yaml [--data.shard 0/4]
    lrc-lightning export --ckpt runs/moco_lrc/.../last.ckpt --out moco_lrc_backbone.pt
    lrc-lightning fit --config examples/configs/finetune.yaml \\
        --model.init_args.pretrained moco_lrc_backbone.pt
    lrc-lightning benchmark --data path/to/Task/dataset.json --size 128 --out results
    lrc-lightning preview --data path/to/Task/dataset.json --scales 50 100 200
    lrc-lightning nnunet-pretrain --dataset 901 --configuration 2d --out lrc_2d.pth
    lrc-lightning export --format nnunet --ckpt lrc_2d.pth.run/last.ckpt --out lrc_2d.pth
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

from lrc_lightning.data import LRCDataModule
from lrc_lightning.runtime.serialization import is_weights_only_refusal, unsafe_checkpoint_error

__all__ = ["LRCLightningCLI", "main"]

_TRUST_HELP = (
    "load the checkpoint with the unrestricted unpickler, which runs any code the file asks "
    "for; by default files are read with torch.load(weights_only=True). Only for files you "
    "made yourself."
)

_DESCRIPTION = (
    "LRC pre-training and fine-tuning (LightningCLI). Subcommands: fit, validate, test, "
    "predict; and `lrc-lightning precompute --config CFG` (fill the super-pixel cache), "
    "`lrc-lightning export --ckpt CKPT --out FILE` (backbone weights as a plain state_dict), "
    "`lrc-lightning benchmark --data DATASET` (does LRC help on this data? see --help), "
    "`lrc-lightning preview --data DATASET` (a PNG of slices and super-pixels), "
    "`lrc-lightning nnunet-pretrain --dataset ID --configuration 2d --out FILE` (pre-train "
    "nnU-Net's own network for nnUNetv2_train -pretrained_weights FILE). "
    "Checkpoints (--ckpt_path) are read with the safe loader; --trust-checkpoint: " + _TRUST_HELP
)


def _wandb_offline_without_key() -> None:
    """W&B is optional: with no API key (env or ~/.netrc) runs are logged offline."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"


class LRCLightningCLI(LightningCLI):
    """LightningCLI with any LightningModule (subclass mode: ``model.class_path``) and
    :class:`LRCDataModule` as ``data``. Configs: ``examples/configs``."""

    def __init__(self, *args: Any, trust_checkpoint: bool = False, **kwargs: Any) -> None:
        self.trust_checkpoint = trust_checkpoint
        given = kwargs.get("args")
        # The options given on the command line, which win over a checkpoint's.
        self._command_line = [str(a) for a in given] if isinstance(given, (list, tuple)) else []
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"description": _DESCRIPTION})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(pl.LightningModule, LRCDataModule, *args, **kwargs)

    def before_instantiate_classes(self) -> None:
        _wandb_offline_without_key()

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyper-parameters of --ckpt_path with weights_only=True. A
        # refused file gets our error (file and global named); a trusted one is loaded by the
        # Trainer unrestricted, without merging its hyper-parameters into the config.
        subcommand = self.config.get("subcommand")
        before = self.config.clone() if subcommand else None
        try:
            super()._parse_ckpt_path()
        except UnpicklingError as err:
            if not is_weights_only_refusal(err):
                raise
            path = Path(self.config[self.config.subcommand].get("ckpt_path"))
            if not self.trust_checkpoint:
                raise unsafe_checkpoint_error(path, err) from None
            warnings.warn(
                f"{path}: loaded as a trusted checkpoint (--trust-checkpoint); its "
                "hyper-parameters are not merged into the config",
                stacklevel=2,
            )
        if before is not None:
            self._command_line_wins(subcommand, before)

    def _command_line_wins(self, subcommand: str, before: Any) -> None:
        """LightningCLI applies the checkpoint's hyper-parameters over the parsed config:
        put back the model options given on the command line, and warn about each option
        that differs from the checkpoint (kept from the command line, or taken from the
        checkpoint over the config file), so that none is replaced silently."""
        model = before[subcommand].get("model")
        merged = self.config[subcommand].get("model")
        if model is None or merged is None:
            return
        old, new = dict(_leaves(model)), dict(_leaves(merged))
        given = {_short(a[2:].split("=", 1)[0]) for a in self._command_line
                 if a.startswith("--model.")}  # fmt: skip
        kept, taken = [], []
        for key in sorted(set(old) & set(new)):
            if old[key] == new[key]:
                continue
            short = _short(f"model.{key}")
            if any(short == g or short.startswith(g + ".") for g in given):
                self.config[f"{subcommand}.model.{key}"] = old[key]
                kept.append(f"--model.{key}={old[key]!r} (checkpoint: {new[key]!r})")
            else:
                taken.append(f"model.{key}={new[key]!r} (config: {old[key]!r})")
        if kept or taken:
            warnings.warn(
                "--ckpt_path: the checkpoint's hyper-parameters differ from the given ones. "
                + (f"Kept from the command line: {', '.join(kept)}. " if kept else "")
                + (f"Taken from the checkpoint: {', '.join(taken)}." if taken else ""),
                stacklevel=2,
            )

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        # `--ckpt_path` files are data: Lightning gets weights_only=True unless the user
        # said --trust-checkpoint (or gave --weights_only explicitly).
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") is not None and kwargs.get("weights_only") is None:
            kwargs["weights_only"] = not self.trust_checkpoint
        return kwargs


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of a jsonargparse Namespace."""
    if not _is_namespace(node):
        return [(prefix, node)]
    found: list[tuple[str, Any]] = []
    for key, value in vars(node).items():
        found += _leaves(value, f"{prefix}.{key}" if prefix else key)
    return found


def _is_namespace(node: Any) -> bool:
    from jsonargparse import Namespace

    return isinstance(node, Namespace)


def _short(key: str) -> str:
    """A model option's key without ``init_args`` (``--model.lrc.weight`` is accepted too)."""
    return ".".join(part for part in key.split(".") if part != "init_args")


def _ignored_sections(parser: Any) -> None:
    # A fit config also holds trainer/model sections: accepted, not used.
    for key in ("model", "trainer", "optimizer", "lr_scheduler"):
        parser.add_argument(f"--{key}", type=Any, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed_everything", type=Any, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt_path", type=Any, default=None, help=argparse.SUPPRESS)


def precompute(argv: list[str]) -> int:
    """Fill the super-pixel cache of a config's ``data`` section (shardable)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="lrc-lightning precompute",
        description="Read, normalise and super-pixel every case of the config's data section "
        "into its cache. Rerun-safe: finished cases are skipped. For a job array give "
        "--data.shard i/n to each task.",
    )
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(LRCDataModule, "data")
    _ignored_sections(parser)
    cfg = parser.parse_args(argv)
    datamodule: LRCDataModule = parser.instantiate_classes(cfg).data
    start = time.perf_counter()
    cases = datamodule.cases()
    datamodule.prepare_data()
    print(
        f"cache {datamodule.cache.root}: {len(cases)} case(s) ready "
        f"(shard {datamodule.shard or 'all'}) in {time.perf_counter() - start:.1f} s"
    )
    return 0


def preview(argv: list[str]) -> int:
    """Write a PNG of a few slices per case with their super-pixels (before pre-training)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from lrc_lightning.tools.preview import write_preview

    parser = ArgumentParser(
        prog="lrc-lightning preview",
        description="Fill the cache of the config's data section (or of --data PATH) and "
        "write a PNG grid: slices per case with super-pixel boundaries, the slice axis, the "
        "in-plane spacing and the region count per slice; --scales adds columns with other "
        "Felzenszwalb scales side by side.",
    )
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(LRCDataModule, "data")
    parser.add_argument("--out", default="lrc_preview.png", help="the PNG to write")
    parser.add_argument("--cases", type=int, default=3, help="how many cases")
    parser.add_argument("--slices", type=int, default=4, help="slices per case")
    parser.add_argument("--scales", type=float, nargs="*", default=[], help="other scales to show")
    _ignored_sections(parser)
    # `--data PATH` as a shorthand of `--data.data PATH`.
    argv = [("--data.data" if a == "--data" else a) for a in argv]
    cfg = parser.parse_args(argv)
    datamodule: LRCDataModule = parser.instantiate_classes(cfg).data
    summary = write_preview(datamodule, cfg.out, cfg.cases, cfg.slices, cfg.scales)
    for row in summary:
        extra = "".join(f", {k[len('regions_') :]}: {v}" for k, v in row.items()
                        if str(k).startswith("regions_scale"))  # fmt: skip
        print(f"{row['case']} slice {row['slice']}: axis {row['slice_axis']}, "
              f"{row['size'][0]}x{row['size'][1]} px at "  # type: ignore[index]
              f"{row['spacing_mm'][0]:.3g}x{row['spacing_mm'][1]:.3g} mm, "  # type: ignore[index]
              f"{row['regions']} regions{extra}")  # fmt: skip
    print(f"wrote {cfg.out}")
    return 0


def export(argv: list[str]) -> int:
    """Write a checkpoint's backbone weights as a plain PyTorch state_dict."""
    from lrc_lightning.models.weights import BACKBONE_PREFIX, export_backbone

    parser = argparse.ArgumentParser(
        prog="lrc-lightning export",
        description="Write the trained backbone of a checkpoint as a plain state_dict "
        "(torch.load + load_state_dict in plain PyTorch), with a .json describing it.",
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="output file, e.g. backbone.pt")
    parser.add_argument("--prefix", default=BACKBONE_PREFIX, help="state_dict key prefix")
    parser.add_argument(
        "--format",
        choices=("state_dict", "nnunet"),
        default="state_dict",
        help="state_dict: the backbone's plain state_dict (default); nnunet: the network of "
        "an `lrc-lightning nnunet-pretrain` checkpoint as nnUNetv2_train -pretrained_weights "
        "reads it",
    )
    parser.add_argument("--trust-checkpoint", action="store_true", help=_TRUST_HELP)
    args = parser.parse_args(argv)
    try:
        if args.format == "nnunet":
            from lrc_lightning.frameworks.nnunet import export_nnunet_weights

            path = export_nnunet_weights(args.ckpt, args.out, args.trust_checkpoint)
            print(f"wrote {path}: nnUNetv2_train DATASET CONFIGURATION FOLD "
                  f"-pretrained_weights {path}")  # fmt: skip
            return 0
        path = export_backbone(args.ckpt, args.out, args.prefix, args.trust_checkpoint)
    except (FileNotFoundError, ValueError, UnpicklingError) as err:
        parser.exit(2, f"lrc-lightning export: error: {err}\n")
    print(f"wrote {path} and {path.name}.json")
    return 0


def nnunet_pretrain(argv: list[str]) -> int:
    """Pre-train nnU-Net's own network with MoCo v2 + LRC; write its -pretrained_weights."""
    from lrc_lightning.objective.term import LRCConfig

    parser = argparse.ArgumentParser(
        prog="lrc-lightning nnunet-pretrain",
        description="Build the network nnUNetv2_train trains for a configuration (nnU-Net's "
        "own code, from the plans), pre-train it with MoCo v2 (bottleneck) + LRC (a decoder "
        "stage) on nnU-Net's preprocessed data, and write FILE for `nnUNetv2_train DATASET "
        "CONFIGURATION FOLD -pretrained_weights FILE`. Run nnUNetv2_plan_and_preprocess "
        "first. Needs the [nnunet] extra.",
    )
    parser.add_argument("--dataset", required=True,
                        help="preprocessed dataset: a folder, or an id/name under "
                        "$nnUNet_preprocessed")  # fmt: skip
    parser.add_argument("--configuration", default="2d", help="2d, 3d_fullres, ...")
    parser.add_argument("--out", required=True, help="the weights file to write (.pth)")
    parser.add_argument("--work-dir", default=None,
                        help="where the Lightning checkpoint goes (default: OUT.run)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the plans'")
    parser.add_argument("--patch-size", type=int, nargs="+", default=None,
                        help="default: the plans'")  # fmt: skip
    parser.add_argument("--samples-per-epoch", type=int, default=250)
    parser.add_argument("--workers", type=int, default=0, help="data loader processes")
    parser.add_argument("--feature-level", type=int, default=-1,
                        help="decoder stage for LRC, coarse to fine (-1: the finest)")  # fmt: skip
    parser.add_argument("--lrc-weight", type=float, default=LRCConfig.weight, help="lambda")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--queue-size", type=int, default=4096, help="MoCo negatives")
    parser.add_argument("--plans", default="nnUNetPlans", help="nnU-Net's plans (-p)")
    parser.add_argument("--trainer", default="nnUNetTrainer", help="nnU-Net's trainer (-tr)")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from lrc_lightning.frameworks.nnunet import pretrain

    lrc = LRCConfig(weight=args.lrc_weight, feature_level=args.feature_level)
    try:
        path = pretrain(args.dataset, args.configuration, args.out, args.work_dir, args.steps,
                        args.batch_size, args.patch_size, args.samples_per_epoch, args.workers,
                        lrc, args.plans, args.trainer, args.seed,
                        {"accelerator": args.accelerator, "devices": 1}, lr=args.lr,
                        queue_size=args.queue_size)  # fmt: skip
    except (FileNotFoundError, ValueError, ImportError) as err:
        parser.exit(2, f"lrc-lightning nnunet-pretrain: error: {err}\n")
    print(f"wrote {path}: nnUNetv2_train DATASET {args.configuration} FOLD "
          f"-pretrained_weights {path}")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "precompute":
        return precompute(args[1:])
    if args and args[0] == "export":
        return export(args[1:])
    if args and args[0] == "preview":
        return preview(args[1:])
    if args and args[0] == "nnunet-pretrain":
        return nnunet_pretrain(args[1:])
    if args and args[0] == "benchmark":
        from lrc_lightning.evaluation.label_efficiency import main as benchmark

        return benchmark(args[1:])
    trust = "--trust-checkpoint" in args
    args = [a for a in args if a != "--trust-checkpoint"]
    # Hide the caller's argv (a script with its own options, a test, or the flag removed
    # above), which LightningCLI would otherwise compare with `args` and warn about.
    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        LRCLightningCLI(args=args, trust_checkpoint=trust)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
