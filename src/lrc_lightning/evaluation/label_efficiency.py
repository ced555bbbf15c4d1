"""Label efficiency: does LRC improve segmentation from few labelled patients, on your data?

    lrc-lightning benchmark --data path/to/Task/dataset.json --out results \\
        [--size 128] [--arms random moco moco_lrc] [--seeds 0 1 2] [--ks 1 2 4]

Protocol (LRC_SPEC.md §2): a fixed split by patient (``--split-seed``): ``--test-cases``
test patients, ``--val-cases`` validation patients, the rest the pre-training pool (images
only). Per seed, the k labelled patients are the first k of a seeded permutation of the
pool (nested: k=1 inside k=2 inside k=4), so seeds vary initialisation, sampling *and*
which patients are labelled.

Arms (same U-Net): ``random`` (no pre-training), ``moco`` (MoCo v2 with shuffle-BN),
``moco_lrc`` (MoCo v2 + LRC), ``lrc_only`` (LRC, no global branch), ``supervised_lrc``
(CE + Dice + LRC pre-training on the k labelled patients only). Pre-training runs once per
arm and seed (it never sees labels, so it does not depend on k), except ``supervised_lrc``.

Two readouts of every pre-trained network, both scored as 3D Dice per organ on each test
volume (:mod:`lrc_lightning.models.metrics`):

* ``finetune``: the whole network fine-tuned on the k labelled patients
  (``--finetune-steps``), the paper's protocol. Chaotic: one run carries noise of its own.
* ``probe``: a frozen-feature dense linear probe (:func:`lrc_lightning.probe.linear_probe_dice`):
  a fixed class-balanced pixel sample of the k labelled patients, a logistic regression
  solved to convergence. Deterministic given the pre-trained weights.

``--noise-floor`` measures each readout's own noise: the readouts of one arm are repeated
from the same pre-trained weights with another readout seed (fine-tuning seed; pixel
sample), and the paired differences of the repeat are reported. ``--finetune-repeats N``
(at ``--finetune-repeat-ks``) makes a cell, and its noise-floor repeat, the mean of N
fine-tunings of the same weights: the fine-tuning's own noise shrinks, the seed stays the
unit. Each fine-tuning is a run file of its own.

Classes come from ``dataset.json``'s ``labels`` (or ``--classes``); a label value outside
them is an error naming the file. Every finished run is a JSON file under
``<out>/label_efficiency_runs``, named with a hash of the options that change results (and,
for arms with LRC, of the LRC and super-pixel recipe): a rerun skips it (resumable), other
options never reuse it. ``--report-only`` writes the tables from the finished runs and names
the missing ones. Outputs: ``label_efficiency{tag}.{md,json,png}`` (and
``label_efficiency_ablations{tag}.*`` with ``--ablations``, and
``label_efficiency_readout_pilot{tag}.*`` with ``--readout-pilot``, both scored on the
*validation* patients, never the test patients).

``--readout-pilot`` is how the fine-tuning readout is checked or tuned before a protocol
scores test patients: the ``--pilot-arms`` (default: random init, the arm that needs the
readout most) fine-tuned at ``--pilot-ks`` for ``--pilot-seeds`` and scored on the
validation patients, with each organ's validation curve and the validity checks (mean
Dice, organs below 0.02) per run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping

from lrc_lightning._version import __version__
from lrc_lightning.data import LRCDataModule, discover_cases
from lrc_lightning.data.cases import DataError, read_json
from lrc_lightning.data.splits import split_cases
from lrc_lightning.evaluation.decision import Decision, decide
from lrc_lightning.evaluation.probe import FeatureLevel, linear_probe_dice
from lrc_lightning.evaluation.statistics import paired_differences, paired_table
from lrc_lightning.models import (
    FineTuneSegmentation,
    MoCoV2,
    MoCoV2LRC,
    SupervisedSegmentationLRC,
    UNet2d,
)
from lrc_lightning.models.weights import load_backbone_weights
from lrc_lightning.objective.term import LRCConfig

__all__ = ["ARMS", "READOUTS", "Benchmark", "Variant", "class_names", "main"]

#: The pre-training arms that ``--arms`` chooses from.
ARMS = ("random", "moco", "moco_lrc", "moco_lrc_grid", "lrc_only", "supervised_lrc")
#: The readouts: ``finetune`` (the headline) and ``probe`` (a diagnostic).
READOUTS = ("finetune", "probe")
#: Offset of the readout seed in the noise-floor repeat.
NOISE_SEED_OFFSET = 1000
#: ``--finetune-repeats``: fine-tuning j of a cell uses the readout seed of its first plus
#: j times this, far from the noise floor's offset, so no two fine-tunings share a seed.
FINETUNE_REPEAT_STRIDE = 10000


@dataclass(frozen=True)
class Variant:
    """One pre-training recipe (arm + LRC options + super-pixel scale)."""

    arm: str
    lrc: LRCConfig = field(default_factory=LRCConfig)
    superpixel_scale: float = 100.0
    superpixel_min_size: int = 50
    name: str = ""
    #: "grid": LRC on square regions of ``grid_cell`` pixels (the ``moco_lrc_grid`` arm).
    regions: str = "felzenszwalb"
    grid_cell: int = 16

    @property
    def label(self) -> str:
        return self.name or self.arm

    @property
    def key(self) -> str:
        """Hash of the recipe's LRC and super-pixel options ("" for arms without LRC), so
        that a changed default never reuses runs made with the old one."""
        if self.arm in ("random", "moco"):
            return ""
        recipe: dict[str, Any] = {"lrc": asdict(self.lrc),
                                   "superpixel_scale": self.superpixel_scale,
                                   "superpixel_min_size": self.superpixel_min_size}  # fmt: skip
        if self.regions != "felzenszwalb":  # hashed only when set: earlier keys stay
            recipe.update(regions=self.regions, grid_cell=self.grid_cell)
        blob = json.dumps(recipe, sort_keys=True).encode()
        return "-" + hashlib.blake2b(blob, digest_size=3).hexdigest()


def class_names(data: str, classes: Sequence[str] | None) -> list[str]:
    """Organ names (background excluded), label value i + 1 = ``names[i]``.

    From ``classes`` when given, else from the MSD ``dataset.json`` ``labels``
    (``{"0": "background", "1": "liver", ...}``), which must number 0..C-1.

    Raises:
        DataError: no names can be found, the json is unreadable, or its label values are not
            0..C-1, naming the file.
    """
    path = Path(data)
    path = path / "dataset.json" if path.is_dir() else path
    declared: dict[int, str] | None = None
    if path.suffix == ".json" and path.is_file():
        labels = read_json(path).get("labels")
        if isinstance(labels, dict):
            try:
                declared = {int(k): str(v) for k, v in labels.items()}
            except ValueError as err:
                raise DataError(f"{path}: 'labels' keys must be integers ({err})") from err
            if sorted(declared) != list(range(len(declared))) or len(declared) < 2:
                raise DataError(
                    f"{path}: 'labels' must number 0..C-1 with C >= 2 (0 = background), got "
                    f"{sorted(declared)}"
                )
    if classes:
        if declared is not None and len(declared) - 1 != len(classes):
            raise DataError(
                f"{path} declares {len(declared) - 1} classes "
                f"({[declared[i] for i in range(1, len(declared))]}), --classes gives "
                f"{len(classes)} ({list(classes)})"
            )
        return list(classes)
    if declared is None:
        raise DataError(
            f"{data}: no dataset.json with 'labels' to name the classes: give --classes "
            "NAME [NAME ...] (label 1, 2, ...; background 0 is implied)"
        )
    return [declared[i] for i in range(1, len(declared))]


def atomic_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from the group
    os.replace(tmp, path)


#: The options that change results; finished runs and weights are keyed by their hash.
RESULT_OPTIONS = (
    "size", "width", "depth", "batch_size", "lr", "queue_size", "pretrain_steps",
    "finetune_steps", "test_cases", "val_cases", "split_seed", "precision", "key_bn_groups",
    "probe_pixels", "probe_l2", "modality", "ct_window", "slice_axis", "classes",
)  # fmt: skip


#: Options added later, hashed only when they differ from these values (what the runs made
#: before each option did), so that earlier runs keep their keys. A default that differs
#: (``finetune_head_channels``: 32) is therefore always hashed.
OPTIONAL_RESULT_OPTIONS = {"spacing": None, "device_batches": False, "channels_last": False,
                           "test_ids": None, "val_ids": None, "not_labelled": None,
                           "finetune_lr": None, "finetune_head_channels": 0,
                           "finetune_intensity_scale": [1.0, 1.0],
                           "checkpoint_min_organ": 0.0}  # fmt: skip

#: Version 2 of the readouts: fine-tuning until the validation patients plateau with the
#: checkpoint they choose, foreground-biased slices, flips only with mirror-label swaps,
#: the probe on several levels. Its options always enter the key: no run of version 1 (a
#: readout that did not train) is ever reused.
READOUT_OPTIONS = ("val_every", "patience", "foreground_ratio", "mirror_labels",
                   "probe_levels")  # fmt: skip


#: Options that only ``Benchmark.finetune`` and ``Benchmark.probe`` read: changing them
#: changes the runs' key but never the pre-trained weights' (no pre-training is redone).
#: Options that also reach pre-training's data module (``foreground_ratio``,
#: ``mirror_labels``: the labelled views of ``supervised_lrc``) are not among them.
READOUT_ONLY_OPTIONS = ("finetune_steps", "val_every", "patience", "probe_levels",
                        "probe_pixels", "probe_l2", "finetune_lr", "finetune_head_channels",
                        "finetune_intensity_scale", "checkpoint_min_organ")  # fmt: skip


#: Options that change how a table is formed from the same runs (never a run: not in the
#: key), with their values before each existed.
TABLE_OPTIONS = {"finetune_repeats": 1, "finetune_repeat_ks": None, "noise_floor": False,
                 "noise_arm": "moco", "noise_seeds": None}  # fmt: skip

#: Options that choose which cells a table holds (also never in the key).
CELL_OPTIONS = ("seeds", "ks", "arms", "skip_main", "readout_pilot", "pilot_seeds", "pilot_ks",
                "pilot_arms", "pilot_readout_offsets")  # fmt: skip


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = {k: getattr(args, k) for k in RESULT_OPTIONS}
    settings["readout"] = {k: getattr(args, k) for k in READOUT_OPTIONS}
    settings.update({k: getattr(args, k) for k, default in OPTIONAL_RESULT_OPTIONS.items()
                     if getattr(args, k, default) != default})  # fmt: skip
    settings["data"] = Path(args.data).name
    return settings


def _hash(settings: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=4).hexdigest()


def settings_key(args: argparse.Namespace) -> str:
    """The runs' key: a hash of every option that changes a result."""
    return _hash(_settings(args))


def pretraining_key(args: argparse.Namespace) -> str:
    """The pre-trained weights' key: :func:`settings_key` without the readout-only options
    (:data:`READOUT_ONLY_OPTIONS`), so that a new readout reuses the pre-trainings."""
    settings = _settings(args)
    for name in READOUT_ONLY_OPTIONS:
        settings.pop(name, None)
        settings["readout"].pop(name, None)
    settings["weights"] = "pretraining"  # never equal to a runs' key
    return _hash(settings)


class BenchmarkStopped(Exception):
    """SIGINT or SIGTERM: stop now; every finished run is already on disk."""


class StepTimer(pl.Callback):
    """Wall time spent inside training steps (forward, backward, optimizer), and a line of
    progress every ``every`` seconds (a phase of a long run is minutes on a CPU)."""

    def __init__(self, phase: str = "", every: float = 60.0) -> None:
        self.seconds = 0.0
        self._start = 0.0
        self.phase = phase
        self.every = every
        self._began = self._last = time.perf_counter()

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        now = time.perf_counter()
        self.seconds += now - self._start
        if self.phase and now - self._last >= self.every:
            self._last = now
            print(f"    {self.phase}: step {trainer.global_step}/{trainer.max_steps} "
                  f"({now - self._began:.0f} s)", flush=True)  # fmt: skip


class BestOnValidation(pl.Callback):
    """Keeps the weights of the best validation Dice (in memory) and the validation curve
    (the mean, and each organ's Dice: a collapsed organ shows as a row of zeros); the
    readout is then scored with those weights. Chosen on the validation patients only.

    With ``min_organ`` > 0 the best is chosen among the validations at which every organ's
    Dice is at least ``min_organ``; only while there is none does the best mean of all
    count (``best_every_organ`` says which). A mean that is high because three organs are
    good and the fourth is absent then never beats a checkpoint that segments all four.
    """

    def __init__(
        self, monitor: str = "val/dice_mean", verbose: bool = True, min_organ: float = 0.0
    ) -> None:
        self.monitor = monitor
        self.verbose = verbose
        self.min_organ = min_organ
        self.best = -float("inf")
        self.best_step = -1
        self.best_every_organ = False
        self.state: dict[str, torch.Tensor] | None = None
        self.curve: list[tuple[int, float]] = []
        self.organ_curve: list[tuple[int, dict[str, float]]] = []

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or trainer.sanity_checking:
            return
        score = float(value)
        self.curve.append((trainer.global_step, round(score, 4)))
        prefix = self.monitor.rsplit("_", 1)[0] + "_"  # "val/dice_"
        organs = {name[len(prefix):]: float(v) for name, v in trainer.callback_metrics.items()
                  if name.startswith(prefix) and name != self.monitor}  # fmt: skip
        self.organ_curve.append((trainer.global_step, {k: round(v, 4) for k, v in organs.items()}))
        if self.min_organ > 0 and not organs:
            raise ValueError(
                f"min_organ={self.min_organ} needs each organ's Dice logged as "
                f"'{prefix}<organ>' beside '{self.monitor}'; none was"
            )
        if score != score:  # NaN: no organ scored at all; never a checkpoint
            return
        # NaN: an organ absent from every validation volume; it cannot disqualify a step.
        every = all(not v < self.min_organ for v in organs.values())
        if (every, score) > (self.best_every_organ, self.best):
            self.best, self.best_step, self.best_every_organ = score, trainer.global_step, every
            self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if self.verbose:
            low = "" if every else f", an organ below {self.min_organ:g}"
            print(f"    validation Dice {score:.3f} at step {trainer.global_step}{low} (best "
                  f"{self.best:.3f} at step {self.best_step})", flush=True)  # fmt: skip


def lowest_organ(per_organ: dict[str, float] | Iterable[float]) -> float:
    """The lowest Dice over the organs that were scored (NaN: an organ absent from every test
    volume); NaN if none was. Python's ``min`` would return NaN or not depending on the
    organs' order, hiding a low organ."""
    values = per_organ.values() if isinstance(per_organ, dict) else per_organ
    scored = [v for v in values if v == v]
    return min(scored) if scored else float("nan")


def _volume_means(per_volume: dict[str, list[float]]) -> dict[str, float]:
    return {case: float(np.nanmean(row)) if not np.all(np.isnan(row)) else float("nan")
            for case, row in per_volume.items()}  # fmt: skip


def _readout_record(per_volume: dict[str, list[float]], organs: list[str]) -> dict[str, Any]:
    rows = np.array(list(per_volume.values()), dtype=float)
    per_organ = np.nanmean(rows, axis=0)
    return {
        "per_volume": per_volume,
        "per_volume_mean": _volume_means(per_volume),
        "per_organ": dict(zip(organs, per_organ.tolist(), strict=True)),
        "mean_dice": float(np.nanmean(per_organ)),
    }


def cell_offsets(args: argparse.Namespace, k: int, base: int = 0) -> list[int]:
    """The readout offsets of one cell's fine-tunings: ``base`` (0, or the noise floor's
    :data:`NOISE_SEED_OFFSET`), then ``FINETUNE_REPEAT_STRIDE`` apart while
    ``--finetune-repeats`` asks for more at this ``k``."""
    repeat_ks = getattr(args, "finetune_repeat_ks", None)
    repeats = getattr(args, "finetune_repeats", 1)
    n = repeats if repeat_ks is None or k in repeat_ks else 1
    return [base + j * FINETUNE_REPEAT_STRIDE for j in range(n)]


def is_noise_floor(offset: int) -> bool:
    """Whether a run with this readout offset belongs to a noise-floor repeat."""
    return offset % FINETUNE_REPEAT_STRIDE == NOISE_SEED_OFFSET


def _mean_readouts(records: Sequence[dict[str, Any]], organs: list[str]) -> dict[str, Any]:
    """One readout averaged over fine-tunings: each organ's Dice, each test volume's mean
    and the mean Dice, each the mean of the fine-tunings' own (NaN only where all are).

    Scores of whole runs are averaged, not per-volume tables: where a test volume lacks an
    organ, one fine-tuning may score it NaN (nothing predicted) and another 0 (a false
    positive), and a per-volume mean would give that 0 the weight of all of them."""
    volumes = list(records[0]["per_volume_mean"])
    if any(list(r["per_volume_mean"]) != volumes for r in records[1:]):
        raise ValueError("the fine-tunings of one cell scored different volumes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: the organ is absent
        return {
            "per_organ": {o: float(np.nanmean([r["per_organ"][o] for r in records]))
                          for o in organs},
            "per_volume_mean": {v: float(np.nanmean([r["per_volume_mean"][v] for r in records]))
                                for v in volumes},
            "mean_dice": float(np.nanmean([r["mean_dice"] for r in records])),
        }  # fmt: skip


def combine_finetunings(runs: Sequence[dict[str, Any]], organs: list[str]) -> dict[str, Any]:
    """One cell from the run records of its fine-tunings (``--finetune-repeats``).

    Each readout (fine-tuned; every probe level) is the mean of the fine-tunings' own: per
    organ, per test volume and the mean Dice (:func:`_mean_readouts`). The record keeps a
    run's layout (``seed``, ``mean_dice``, ``per_organ``, ``per_volume_mean``, ``probe``;
    the per-volume, per-organ tables stay in the run files) and lists its fine-tunings under
    ``finetunings``, so that the organ check can judge each. A single run is returned
    unchanged.

    Raises:
        ValueError: the runs are not of one cell (arm, k, seed, labelled patients), scored
            different volumes, or lack the probe's levels (run files older than them).
    """
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    cell = ("arm", "k", "seed", "stage", "labelled")
    if any(tuple(r[f] for f in cell) != tuple(first[f] for f in cell) for r in runs[1:]):
        raise ValueError(f"combine_finetunings: {[r['run'] for r in runs]} are not one cell")
    if not all(r.get("probe_levels") for r in runs):
        raise ValueError(f"combine_finetunings: {[r['run'] for r in runs]}: a run file "
                         "without 'probe_levels' (written before them) cannot be averaged")
    levels = {level: _mean_readouts([r["probe_levels"][level] for r in runs], organs)
              for level in first["probe_levels"]}  # fmt: skip
    skip = ("finetune_validation", "seconds", "per_volume")
    combined = {k: v for k, v in first.items() if k not in skip}
    combined.update(_mean_readouts(runs, organs))
    combined.update({
        "probe_levels": levels,
        "probe": levels.get("-1") or next(iter(levels.values())),
        "seconds": round(sum(r.get("seconds", 0.0) for r in runs), 1),
        "finetunings": [{"run": r["run"], "readout_offset": r.get("readout_offset", 0),
                         "mean_dice": r["mean_dice"], "per_organ": r["per_organ"],
                         "best_val_dice": (r.get("finetune_validation") or {})
                         .get("best_val_dice")} for r in runs],
    })  # fmt: skip
    return combined


class Benchmark:
    """One benchmark run of ``lrc-lightning benchmark``: its data, split and resumable runs."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.organs = class_names(args.data, args.classes)
        self.key = settings_key(args)
        self.weights_key = pretraining_key(args)
        self.out = Path(args.out)
        self.runs = self.out / "label_efficiency_runs"
        self.work = Path(args.work_dir)
        self.train_seconds = 0.0
        self.run_seconds = 0.0
        self.finished_seconds: list[float] = []
        self.total = self.done_before = self.started = 0
        self.mirror_labels = [tuple(args.mirror_labels[i : i + 2])
                              for i in range(0, len(args.mirror_labels or []), 2)]  # fmt: skip
        if args.mirror_labels and len(args.mirror_labels) % 2:
            raise DataError(f"--mirror-labels takes pairs, got {args.mirror_labels}")
        cases = discover_cases(args.data, dicom_series=args.dicom_series)
        known = {c.case_id for c in cases}
        for option, ids in (("--test-ids", args.test_ids), ("--val-ids", args.val_ids),
                            ("--not-labelled", getattr(args, "not_labelled", None))):
            unknown = sorted(set(ids or []) - known)
            if unknown:
                raise DataError(f"{args.data}: {option} names unknown cases {unknown}; the "
                                f"cases are {sorted(known)}")  # fmt: skip
        if args.test_ids and args.val_ids and set(args.test_ids) & set(args.val_ids):
            raise DataError(f"--test-ids and --val-ids share "
                            f"{sorted(set(args.test_ids) & set(args.val_ids))}")  # fmt: skip
        test_spec = list(args.test_ids) if args.test_ids else args.test_cases
        val_spec = list(args.val_ids) if args.val_ids else args.val_cases
        n_test = len(args.test_ids) if args.test_ids else args.test_cases
        n_val = len(args.val_ids) if args.val_ids else args.val_cases
        largest_k = _largest_k(args)
        needed = n_test + n_val + largest_k
        if len(cases) < needed:
            raise DataError(
                f"{args.data}: {len(cases)} cases, but {n_test} test + "
                f"{n_val} validation + k={largest_k} labelled patients need "
                f"{needed}; lower --test-cases, --val-cases or --ks"
            )
        if n_val < 1:
            raise DataError("--val-cases must be >= 1: the validation patients choose the "
                            "fine-tuned checkpoint (the test patients never do)")  # fmt: skip
        split = split_cases(cases, test_spec, val_spec, None, args.split_seed)
        unlabelled = [c.case_id for c in [*split.test, *split.val, *split.pool] if c.label is None]
        scored = {c.case_id for c in [*split.test, *split.val]}
        if scored & set(unlabelled) or len(split.pool) - len(unlabelled) < largest_k:
            raise DataError(
                f"{args.data}: cases without a label: {unlabelled}. Test and validation "
                f"patients need labels, and the pool needs k={largest_k} labelled ones: "
                "add the label files or leave the unlabelled cases out"
            )
        self.test = [c.case_id for c in split.test]
        self.val = [c.case_id for c in split.val]
        self.pool = sorted(c.case_id for c in split.pool)
        self.labelled_pool = sorted(c.case_id for c in split.pool if c.label is not None)
        self.not_labelled = sorted(getattr(args, "not_labelled", None) or [])
        misplaced = sorted(set(self.not_labelled) - set(self.pool))
        if misplaced:
            raise DataError(f"--not-labelled names {misplaced}, which are test or validation "
                            "patients, not pool patients")  # fmt: skip
        drawable = len(self.labelled_pool) - len(set(self.not_labelled) & set(self.labelled_pool))
        if largest_k > drawable:
            raise DataError(f"{args.data}: k={largest_k} labelled patients asked for, but only "
                            f"{drawable} pool patients can be drawn (--not-labelled "
                            f"{self.not_labelled})")  # fmt: skip
        if largest_k > len(self.pool):
            raise DataError(
                f"{args.data}: k={largest_k} labelled patients asked for, but the pool "
                f"holds {len(self.pool)} after {len(self.test)} test and {len(self.val)} "
                "validation patients"
            )
        print(f"classes {self.organs}\ntest patients {self.test}\nvalidation patients "
              f"{self.val}\npool ({len(self.pool)}) {self.pool}", flush=True)  # fmt: skip

    def check_data(self, variants: Any) -> None:
        """Read every case once before any training: a bad file or label value is a
        DataError now, not after hours of pre-training (fills the caches the runs use)."""
        self.phase("checking and caching every case (labels against the classes)")
        self.datamodule(None, []).prepare_data()
        for variant in variants:
            if variant.regions != "felzenszwalb":
                self.datamodule(variant, []).prepare_data()

    # ------------------------------------------------------------------ building blocks
    @property
    def num_classes(self) -> int:
        return len(self.organs) + 1

    def labelled(self, seed: int, k: int) -> list[str]:
        """The k labelled patients of ``seed``: the first k of a seeded permutation of the
        pool's labelled cases (nested in k), skipping ``--not-labelled`` cases."""
        order = np.random.default_rng(1000 + seed).permutation(len(self.labelled_pool))
        # --not-labelled cases are skipped in the seed's order: the other draws stay.
        drawn = [self.labelled_pool[i] for i in order]
        return [case for case in drawn if case not in self.not_labelled][:k]

    def datamodule(self, variant: Variant | None, labelled: list[str], **kw: Any) -> LRCDataModule:
        a = self.args
        window: Any = a.ct_window
        if isinstance(window, list):
            window = tuple(window)
        return LRCDataModule(
            a.data, cache_dir=a.cache_dir, image_size=a.size, batch_size=a.batch_size,
            modality=a.modality, ct_window=window, slice_axis=a.slice_axis, spacing=a.spacing,
            device_batches=a.device_batches, channels_last=a.channels_last,
            labels=list(range(self.num_classes)),  # a value outside the classes is an error
            test_cases=self.test, val_cases=self.val, labelled_cases=labelled,
            superpixel_scale=variant.superpixel_scale if variant else 100.0,
            superpixel_min_size=variant.superpixel_min_size if variant else 50,
            regions=variant.regions if variant else "felzenszwalb",  # type: ignore[arg-type]
            grid_cell=variant.grid_cell if variant else 16,
            mirror_labels=self.mirror_labels, foreground_ratio=a.foreground_ratio,
            num_workers=a.num_workers, persistent_workers=a.num_workers > 0,
            precompute_workers=a.precompute_workers, dicom_series=a.dicom_series, **kw,
        )  # fmt: skip

    def backbone(self) -> UNet2d:
        return UNet2d(width=self.args.width, depth=self.args.depth)

    def trainer(
        self, steps: int, callbacks: Sequence[pl.Callback] = (), val_every: int = 0
    ) -> pl.Trainer:
        validate = dict(val_check_interval=val_every, check_val_every_n_epoch=None)
        return pl.Trainer(
            accelerator=self.args.accelerator, devices=1, max_steps=steps, max_epochs=-1,
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0,
            precision=self.args.precision, callbacks=list(callbacks),
            **(validate if val_every else {"limit_val_batches": 0}),  # type: ignore[arg-type]
        )  # fmt: skip

    def _fit(
        self,
        steps: int,
        model: pl.LightningModule,
        datamodule: LRCDataModule,
        phase: str = "",
        callbacks: Sequence[pl.Callback] = (),
        val_every: int = 0,
    ) -> None:
        if self.args.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.phase(phase)
        timer = StepTimer(phase)
        self.trainer(steps, [timer, *callbacks], val_every).fit(model, datamodule)
        self.train_seconds += timer.seconds

    def phase(self, text: str) -> None:
        if text:
            print(f"  {text}", flush=True)

    def weights_path(self, variant: Variant, seed: int, labelled: list[str]) -> Path:
        """Where the pre-trained backbone of ``variant`` and ``seed`` is kept: named by the
        pre-training key; a file of an earlier version, named by the runs' key, is still
        found (and used) when it exists."""
        suffix = f"_k{len(labelled)}" if variant.arm == "supervised_lrc" else ""
        stem = f"pretrain_{variant.label}_s{seed}{suffix}"
        path = self.work / f"{stem}-w{self.weights_key}{variant.key}.pt"
        earlier = self.work / f"{stem}-{self.key}{variant.key}.pt"
        return earlier if not path.is_file() and earlier.is_file() else path

    def pretrain(self, variant: Variant, seed: int, labelled: list[str]) -> Path:
        """Pre-train (or reuse) and return the backbone weights file."""
        path = self.weights_path(variant, seed, labelled)
        if path.is_file():
            return path
        pl.seed_everything(seed, workers=True)
        a = self.args
        common = dict(lr=a.lr, warmup_steps=a.pretrain_steps // 10)
        if variant.arm == "moco":
            model: pl.LightningModule = MoCoV2(self.backbone(), queue_size=a.queue_size,
                                               key_bn_groups=a.key_bn_groups, **common)  # fmt: skip
        elif variant.arm in ("moco_lrc", "moco_lrc_grid", "lrc_only"):
            model = MoCoV2LRC(self.backbone(), lrc=variant.lrc, queue_size=a.queue_size,
                              global_weight=0.0 if variant.arm == "lrc_only" else 1.0,
                              key_bn_groups=a.key_bn_groups, **common)  # fmt: skip
        elif variant.arm == "supervised_lrc":
            model = SupervisedSegmentationLRC(self.backbone(), lrc=variant.lrc,
                                              num_classes=self.num_classes, **common)  # fmt: skip
        else:
            raise ValueError(variant.arm)
        extra = ({"pretrain_with_labels": True, "pretrain_on": "labelled"}
                 if variant.arm == "supervised_lrc" else {})  # fmt: skip
        start = time.perf_counter()
        self._fit(a.pretrain_steps, model, self.datamodule(variant, labelled, **extra),
                  phase=f"pre-training {variant.label} seed {seed} ({a.pretrain_steps} steps)")
        self.work.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.backbone.state_dict(), tmp)  # type: ignore[union-attr]
        os.replace(tmp, path)
        print(f"  pre-trained {path.name} in {time.perf_counter() - start:.0f} s", flush=True)
        return path

    def finetune(
        self, weights: Path | None, seed: int, labelled: list[str], stage: str
    ) -> tuple[dict[str, list[float]], dict[str, Any]]:
        """Fine-tune on the labelled patients and score ``stage``'s volumes with the weights
        that the *validation* patients choose (Dice + CE, foreground-biased slices, flips
        only with mirror-label swaps, validation every ``--val-every`` steps, stopped after
        ``--patience`` validations without a better Dice or at ``--finetune-steps``).

        Returns the per-volume Dice table and the validation record (curve, best step).
        """
        pl.seed_everything(seed, workers=True)
        a = self.args
        model = FineTuneSegmentation(
            self.backbone(), pretrained=str(weights) if weights else None,
            num_classes=self.num_classes, class_names=self.organs,
            lr=a.finetune_lr if a.finetune_lr is not None else a.lr,
            warmup_steps=a.finetune_steps // 10, head_channels=a.finetune_head_channels,
        )  # fmt: skip
        datamodule = self.datamodule(None, labelled, mode="finetune",
                                     intensity_scale=tuple(a.finetune_intensity_scale))
        best = BestOnValidation(min_organ=a.checkpoint_min_organ)
        callbacks: list[pl.Callback] = [best]
        if a.patience:
            callbacks.append(EarlyStopping("val/dice_mean", mode="max", patience=a.patience,
                                           check_on_train_epoch_end=False))  # fmt: skip
        self._fit(a.finetune_steps, model, datamodule, callbacks=callbacks,
                  phase=f"fine-tuning on {len(labelled)} patient(s), seed {seed} (up to "
                        f"{a.finetune_steps} steps, validation every {a.val_every})",
                  val_every=a.val_every)  # fmt: skip
        stopped = int(model.global_step)
        if best.state is not None:
            model.load_state_dict(best.state)
        self.phase(f"scoring the {stage} patients (weights of step {best.best_step}, "
                   f"validation Dice {best.best:.3f})")  # fmt: skip
        evaluator = pl.Trainer(accelerator=a.accelerator, devices=1, logger=False,
                               enable_progress_bar=False, enable_model_summary=False,
                               precision=a.precision)  # fmt: skip
        evaluate = evaluator.test if stage == "test" else evaluator.validate
        evaluate(model, datamodule, verbose=False)
        if not model.last_dice_table:
            raise RuntimeError(f"no {stage} volume was evaluated")
        record = {"best_step": best.best_step, "best_val_dice": round(best.best, 4),
                  "best_every_organ": best.best_every_organ, "stopped_step": stopped,
                  "curve": best.curve, "organ_curve": best.organ_curve}  # fmt: skip
        return dict(model.last_dice_table), record

    def probe(
        self,
        weights: Path | None,
        seed: int,
        labelled: list[str],
        stage: str,
        level: FeatureLevel = -1,
    ) -> dict[str, list[float]]:
        """Linear-probe Dice of the frozen backbone's ``level`` features; random init is
        seeded by ``seed``."""
        torch.manual_seed(seed)
        backbone = self.backbone()
        if weights is not None:
            load_backbone_weights(backbone, weights)
        datamodule = self.datamodule(None, labelled, mode="finetune")
        datamodule.prepare_data()
        datamodule.setup("fit")
        split = datamodule.split
        assert split is not None
        scored = split.test if stage == "test" else split.val
        train = [(v.image, v.label_ids()) for v in datamodule.volumes(split.labelled)]
        test = {v.case_id: (v.image, v.label_ids()) for v in datamodule.volumes(scored)}
        if self.args.accelerator == "gpu" or (
            self.args.accelerator == "auto" and torch.cuda.is_available()
        ):
            backbone = backbone.cuda()
        return linear_probe_dice(
            backbone, train, test, self.num_classes,  # type: ignore[arg-type]
            pixels_per_class=self.args.probe_pixels, seed=seed, l2=self.args.probe_l2,
            level=level,
        )  # fmt: skip

    def run(
        self, variant: Variant, k: int, seed: int, stage: str = "test", readout_offset: int = 0
    ) -> dict[str, Any] | None:
        """One finished run (computed now unless saved); None if missing in report-only mode.

        ``readout_offset`` shifts the readouts' seeds (fine-tuning, pixel sample) while the
        pre-trained weights and labelled patients stay: the noise-floor repeat.
        """
        repeat = f"_r{readout_offset}" if readout_offset else ""
        run_id = f"{stage}_{variant.label}_k{k}_s{seed}{repeat}"
        path = self.runs / f"{run_id}-{self.key}{variant.key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        if self.args.report_only:
            print(f"[missing] {run_id}", file=sys.stderr)
            return None
        labelled = self.labelled(seed, k)
        self.started += 1
        print(f"[{self.done_before + self.started}/{self.total}] {run_id}{self.eta()}",
              flush=True)  # fmt: skip
        start = time.perf_counter()
        weights = None if variant.arm == "random" else self.pretrain(variant, seed, labelled)
        readout_seed = seed + readout_offset
        table, validation = self.finetune(weights, readout_seed, labelled, stage)
        finetuned = _readout_record(table, self.organs)
        levels = {}
        for level in self.args.probe_levels:
            self.phase(f"linear probe on level {level}")
            levels[str(level)] = _readout_record(
                self.probe(weights, readout_seed, labelled, stage, level), self.organs
            )
        # "probe" stays the finest decoder level (-1), as in the earlier run files.
        probed = levels.get("-1") or next(iter(levels.values()))
        seconds = time.perf_counter() - start
        self.run_seconds += seconds
        self.finished_seconds.append(seconds)
        result = {
            "run": run_id, "arm": variant.label, "k": k, "seed": seed, "stage": stage,
            "readout_offset": readout_offset, "labelled": labelled, "classes": self.organs,
            **finetuned, "finetune_validation": validation, "probe": probed,
            "probe_levels": levels,
            "variant": {"arm": variant.arm, "lrc": asdict(variant.lrc),
                        "superpixel_scale": variant.superpixel_scale,
                        "superpixel_min_size": variant.superpixel_min_size,
                        "regions": variant.regions, "grid_cell": variant.grid_cell},
            "seconds": round(seconds, 1),
        }  # fmt: skip
        atomic_json(path, result)
        low = lowest_organ(finetuned["per_organ"])
        print(f"{run_id}: mean Dice fine-tuned {result['mean_dice']:.3f} (lowest organ "
              f"{low:.3f}, best validation step {validation['best_step']}), probe "
              f"{probed['mean_dice']:.3f} ({result['seconds']:.0f} s)", flush=True)  # fmt: skip
        return result

    def eta(self) -> str:
        """' (about N min left)' from the runs finished in this invocation."""
        return time_left(self.total - self.done_before - self.started + 1,
                         self.finished_seconds)  # fmt: skip

    def missing(self, planned: Sequence[tuple[Variant, int, int, str, int]]) -> int:
        """How many of ``planned`` (variant, k, seed, stage, offset) runs are not on disk."""
        count = 0
        for variant, k, seed, stage, offset in planned:
            repeat = f"_r{offset}" if offset else ""
            run_id = f"{stage}_{variant.label}_k{k}_s{seed}{repeat}"
            count += not (self.runs / f"{run_id}-{self.key}{variant.key}.json").is_file()
        return count


def _run_label(run: dict[str, Any], with_id: bool) -> str:
    """'<arm> k=<k> seed <s>' of a test run ('repeat' for the noise floor's arm, as its
    summary names it), with the run's id where its cell has several fine-tunings."""
    arm = "repeat" if is_noise_floor(run.get("readout_offset", 0)) else run["arm"]
    return f"{arm} k={run['k']} seed {run['seed']}" + (f" ({run['run']})" if with_id else "")


def summarise(
    results: Sequence[dict[str, Any] | None], organs: list[str], readout: str = "finetune"
) -> dict[str, Any]:
    """Per (arm, k): mean ± std over seeds of one readout, and the runs behind it.

    ``readout``: ``"finetune"``, ``"probe"`` (the finest level) or ``"probe@LEVEL"``.
    """
    table: dict[str, Any] = {}
    for r in filter(None, results):
        if readout.startswith("probe@"):
            record = (r.get("probe_levels") or {}).get(readout.split("@", 1)[1])
        else:
            record = r if readout == "finetune" else r.get(readout)
        if record is not None:
            table.setdefault(f"{r['arm']}|{r['k']}", []).append((r, record))
    summary = {}
    for key, runs in table.items():
        arm, k = key.split("|")
        means = [rec["mean_dice"] for _, rec in runs]
        summary[key] = {
            "arm": arm, "k": int(k), "n_seeds": len(runs),
            "mean": statistics.fmean(means),
            "std": statistics.stdev(means) if len(means) > 1 else 0.0,
            "per_organ": {o: float(np.nanmean([rec["per_organ"][o] for _, rec in runs]))
                          for o in organs},
            # With --finetune-repeats, the lowest organ of any single fine-tuning.
            "lowest_organ": lowest_organ(
                lowest_organ(part["per_organ"]) for r, rec in runs
                for part in ((r.get("finetunings") or [rec]) if readout == "finetune" else [rec])),
            "runs": [{"seed": r["seed"], "mean_dice": rec["mean_dice"], "labelled": r["labelled"],
                      "per_organ": rec["per_organ"],
                      "per_volume_mean": rec.get("per_volume_mean"),
                      **({"finetunings": r["finetunings"]}
                         if readout == "finetune" and "finetunings" in r else {})}
                     for r, rec in runs],
        }  # fmt: skip
    return summary


def _git(*args: str) -> str | None:
    import subprocess

    root = Path(__file__).resolve().parents[3]
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def source_commit() -> str | None:
    """The git commit of this package's checkout (``+dirty`` with local changes), if any.
    Taken when the benchmark starts: the code the runs are made with."""
    commit = _git("rev-parse", "--short", "HEAD")
    if not commit:
        return None
    return commit + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def header(
    args: argparse.Namespace,
    command: str,
    commit: str | None = None,
    seconds: dict[str, float] | None = None,
) -> dict[str, Any]:
    return {
        "command": command,
        "commit": commit,
        "versions": {"lrc_lightning": __version__, "torch": torch.__version__,
                     "pytorch_lightning": pl.__version__, "python": platform.python_version()},
        "hardware": {"machine": platform.machine(), "cpus": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(),
                     "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "key": settings_key(args),
        "seconds": seconds or {},
    }  # fmt: skip


#: Printed beside every probe table: what the probe can and cannot say.
PROBE_CAVEAT = (
    "Diagnostic, not the headline. MoCo's loss never reaches the decoder (its decoder stays "
    "at random init, BatchNorm statistics included), so on decoder levels 'MoCo+LRC - MoCo' "
    "largely measures whether the decoder was trained at all. The bottleneck is the one "
    "level that both arms train."
)


def markdown(
    summaries: dict[str, dict[str, Any]],
    head: dict[str, Any],
    title: str,
    arms: list[str],
    organs: list[str],
    noise: dict[str, dict[str, Any] | None] | None = None,
    ks: Sequence[int] | None = None,
    decision: Decision | None = None,
) -> str:
    """The tables of one benchmark: the declared decision and validity checks (when the
    primary arms ran), the fine-tuned readout (the headline), then the probe on each level
    with its caveat, then the noise floor. Paired differences count a seed only when it has
    every k of ``ks`` (the protocol's)."""
    protocol_ks = list(ks) if ks is not None else None
    lines = [f"# {title}", "", f"`{head['command']}`", "",
             f"versions: {head['versions']}  ", f"hardware: {head['hardware']}", ""]  # fmt: skip
    if decision is not None:
        mark = {True: "passes", False: "**FAILS**", None: "not judged yet"}
        lines += [f"## Declared decision ({PRIMARY[0]} - {PRIMARY[1]}, fine-tuned)", "",
                  f"**{decision.text}**", "", "Validity checks of the readout:", "",
                  *[f"- {c.name}: {mark[c.passed]} ({c.detail})"
                    + ("" if c.declared else "; reported, outside the verdict")
                    for c in decision.checks],
                  ""]  # fmt: skip
    # Without a verdict, the paired rows are interim numbers: each table says so beside
    # them, so that no row (an interval that excludes 0 on 2 seeds, say) reads as evidence.
    caution = (
        f"**{decision.verdict.capitalize()}** ({decision.n_seeds} seed(s) so far): no "
        "paired row below is evidence, not the primary, not a secondary row, not an "
        "interval that excludes 0."
        if decision is not None and decision.verdict in ("no result yet", "not interpretable")
        else None
    )
    for readout, summary in summaries.items():
        shown = sorted({v["k"] for v in summary.values()})
        if not shown:
            continue
        if readout == "finetune":
            what = ("fine-tuned; weights chosen on the validation patients; the headline: "
                    "seed-level paired differences")  # fmt: skip
        elif readout == "probe":
            what = "frozen features, linear probe on the finest decoder level"
        else:
            what = f"frozen features, linear probe on level {readout.split('@', 1)[1]}"
        lines += [f"## Readout: {readout} ({what})", ""]
        if readout.startswith("probe"):
            lines += [PROBE_CAVEAT, ""]
        lines += ["Mean 3D Dice over organs, mean ± std over seeds (n seeds in brackets); "
                  "the lowest organ Dice of any run in the last column.", "",
                  "| arm | " + " | ".join(f"k={k}" for k in shown) + " | lowest organ |",
                  "|---|" + "---|" * (len(shown) + 1)]  # fmt: skip
        for arm in arms:
            cells = []
            lowest = [s["lowest_organ"] for k in shown if (s := summary.get(f"{arm}|{k}"))
                      and "lowest_organ" in s]  # fmt: skip
            for k in shown:
                s = summary.get(f"{arm}|{k}")
                spread = f"{s['std']:.3f}" if s and s["n_seeds"] > 1 else "-"
                cells.append(f"{s['mean']:.3f} ± {spread} ({s['n_seeds']})" if s else "-")
            low = f"{min(lowest):.3f}" if lowest else "-"
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {low} |")
        lines += ["", "Per organ (mean over seeds):", "",
                  "| arm | k | " + " | ".join(organs) + " |",
                  "|---|---|" + "---|" * len(organs)]  # fmt: skip
        for arm in arms:
            for k in shown:
                s = summary.get(f"{arm}|{k}")
                if s:
                    cells_o = " | ".join(f"{s['per_organ'][o]:.3f}" for o in organs)
                    lines.append(f"| {arm} | {k} | {cells_o} |")
        if caution:
            lines += ["", caution]
        # The protocol's ks, not the ones with runs so far: a seed counts only with all.
        lines += paired_section(summary, arms, primary=readout == "finetune",
                                ks=protocol_ks or shown)  # fmt: skip
        lines.append("")
    if noise:
        lines += ["## Noise floor of each readout", "",
                  "The same pre-trained weights and labelled patients read out twice with "
                  "another readout seed (fine-tuning seed; probe pixel sample); a readout "
                  "that trains to its plateau centres on 0:", "",
                  *paired_table([(f"{readout}: repeat - original", d)
                                 for readout, d in noise.items()]), ""]  # fmt: skip
    return "\n".join(lines) + "\n"


#: The declared primary comparison (on the fine-tuned readout); every other row is a
#: secondary estimate with an unadjusted interval.
PRIMARY = ("moco_lrc", "moco")


def paired_rows(
    summary: dict[str, Any],
    arms: list[str],
    primary: bool = False,
    ks: Sequence[int] | None = None,
) -> list[tuple[str, dict[str, Any] | None]]:
    """Each arm against random init and against MoCo (and the grid arm against MoCo+LRC:
    do the super-pixels themselves matter?), with the seed as the unit; ``primary`` marks
    the declared primary row."""
    pairs = [(arm, ref) for ref in ("random", "moco") for arm in arms if arm not in (ref, "random")]
    if "moco_lrc_grid" in arms and "moco_lrc" in arms:
        pairs.append(("moco_lrc", "moco_lrc_grid"))
    rows = [(f"{a} - {r}" + (" **(primary)**" if primary and (a, r) == PRIMARY else ""),
             paired_differences(summary, a, summary, r, ks)) for a, r in pairs]  # fmt: skip
    if ks is not None and len(ks) > 1 and all(arm in arms for arm in PRIMARY):
        # Declared descriptive row (Evidence II, amendment 1): the same statistic without the
        # smallest k, on the same seeds; no decision attaches to it.
        rest = sorted(ks)[1:]
        rows.append((f"{PRIMARY[0]} - {PRIMARY[1]}, k = {', '.join(map(str, rest))} only "
                     "(descriptive)", paired_differences(summary, PRIMARY[0], summary,
                                                         PRIMARY[1], rest)))  # fmt: skip
    return rows


def paired_section(
    summary: dict[str, Any],
    arms: list[str],
    primary: bool = False,
    ks: Sequence[int] | None = None,
) -> list[str]:
    """Markdown of :func:`paired_rows` (a seed counts when it has every k of ``ks``)."""
    rows = paired_rows(summary, arms, primary, ks)
    if not any(d for _, d in rows):
        wanted = f" (k = {', '.join(map(str, ks))})" if ks else ""
        return ["", f"Paired differences: no seed has every k{wanted} of two arms yet."]
    return ["", "Paired differences of mean Dice with the seed as the unit: per seed, the mean "
            "over k of the difference (same labelled patients and test volumes); mean over "
            "seeds with a t interval on seeds - 1 degrees of freedom; the bootstrap resamples "
            "whole seeds and the shared test patients:", "", *paired_table(rows)]  # fmt: skip


def plot(summaries: dict[str, dict[str, Any]], arms: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[skip] matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(summaries), figsize=(6 * len(summaries), 4), squeeze=False)
    for ax, (readout, summary) in zip(axes[0], summaries.items(), strict=True):
        for arm in arms:
            points = sorted((v["k"], v["mean"], v["std"])
                            for v in summary.values() if v["arm"] == arm)  # fmt: skip
            if points:
                k, mean, std = zip(*points, strict=True)
                ax.errorbar(k, mean, yerr=std, marker="o", capsize=3, label=arm)
        ax.set_title(readout)
        ax.set_xlabel("labelled patients (k)")
        ax.set_ylabel("mean 3D Dice (test)")
        ax.set_xticks(sorted({v["k"] for v in summary.values()}))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ablation_variants(base: LRCConfig) -> list[Variant]:
    """One change at a time around the reference recipe (lambda = 1: the default when the
    first ablation was run; its winner, lambda = 0.3, is the default now)."""
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


def _probe_level(value: str) -> FeatureLevel:
    return "bottleneck" if value == "bottleneck" else int(value)


def _slice_axis(value: str) -> int | str:
    return value if value == "auto" else int(value)


def build_parser(defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The benchmark's options (``defaults`` overrides some, e.g. the repository's paths)."""
    parser = argparse.ArgumentParser(
        prog="lrc-lightning benchmark",
        description="Label efficiency: does LRC improve segmentation from few labelled "
        "patients on this data set? Pre-trains each arm, reads it out by fine-tuning and by "
        "a frozen linear probe, and reports paired differences with standard errors and "
        "bootstrap intervals.",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="MSD dataset.json (or its folder), a CSV or a folder of volumes",
    )
    parser.add_argument("--out", default="lrc_benchmark", help="tables and run files")
    parser.add_argument("--work-dir", default=".lrc_bench", help="pre-trained weights")
    parser.add_argument("--cache-dir", default=".lrc_cache")
    parser.add_argument(
        "--classes",
        nargs="+",
        default=None,
        help="organ names for label values 1, 2, ... (default: dataset.json)",
    )
    parser.add_argument("--modality", default="mr", choices=("mr", "ct"))
    parser.add_argument("--dicom-series", default=None,
                        help="DICOM folders with several series: 'largest', 'all' or a "
                             "SeriesInstanceUID (default: such a folder is an error)")
    parser.add_argument(
        "--ct-window", nargs="+", default="abdomen", help="CT window preset or 'a_min a_max'"
    )
    parser.add_argument(
        "--slice-axis",
        type=_slice_axis,
        default="auto",
        help="'auto' (the acquisition plane) or 0, 1, 2 (0: axial)",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=2,
        default=None,
        metavar=("ROW", "COL"),
        help="in-plane target spacing in mm (default: each file's)",
    )
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument("--key-bn-groups", type=int, default=2, help="MoCo shuffle-BN groups")
    parser.add_argument("--pretrain-steps", type=int, default=250)
    parser.add_argument("--finetune-steps", type=int, default=1500,
                        help="most fine-tuning steps (early stopping may end sooner)")
    parser.add_argument("--val-every", type=int, default=100,
                        help="fine-tuning: validation Dice every N steps; its best weights "
                             "are the readout's")
    parser.add_argument("--patience", type=int, default=5,
                        help="fine-tuning: stop after N validations without a better Dice "
                             "(0: run all steps)")
    parser.add_argument("--checkpoint-min-organ", type=float, default=0.0,
                        help="fine-tuning: choose the weights among the validations at "
                             "which every organ's Dice is at least this (the best mean of "
                             "all while none is); 0: the best mean")
    parser.add_argument("--finetune-repeats", type=int, default=1, metavar="N",
                        help="each cell of --finetune-repeat-ks (and its noise-floor repeat) "
                             "is the mean of N fine-tunings of the same weights, with "
                             f"readout seeds {FINETUNE_REPEAT_STRIDE} apart (Dice averaged "
                             "over the runs' own scores; the seed stays the unit; ablations "
                             "stay single runs); in a readout pilot: --pilot-readout-offsets "
                             "grouped N at a time, in order")
    parser.add_argument("--finetune-repeat-ks", type=int, nargs="+", default=None,
                        metavar="K", help="the k of --finetune-repeats (default: every k)")
    parser.add_argument("--foreground-ratio", type=float, default=0.5,
                        help="fine-tuning: share of slices drawn from those with an organ")
    parser.add_argument("--finetune-lr", type=float, default=None,
                        help="learning rate of the fine-tuning readout (default: --lr)")
    parser.add_argument("--finetune-head-channels", type=int, default=32, metavar="N",
                        help="fine-tuning head: a 3x3 convolution to N channels + batch norm "
                             "+ ReLU before the 1x1 classifier (default 32); 0: the 1x1 head "
                             "alone (the head of runs before this option; on CHAOS with "
                             "width 8 it failed to learn the kidneys)")
    parser.add_argument("--finetune-intensity-scale", type=float, nargs=2, default=[1.0, 1.0],
                        metavar=("LOW", "HIGH"),
                        help="fine-tuning augmentation: a multiplicative intensity scale drawn "
                             "log-uniformly from [LOW, HIGH] per slice (MR intensities differ "
                             "between patients; default off)")
    parser.add_argument("--not-labelled", nargs="+", default=None, metavar="CASE",
                        help="pool cases never drawn as labelled patients (their images stay "
                             "in pre-training), e.g. intensity outliers found by "
                             "benchmarks/organ_intensities.py; declare it before the runs")
    parser.add_argument("--mirror-labels", nargs="+", default=None, metavar="NAME",
                        help="pairs of mirror-image labels swapped on flips, e.g. "
                             "right_kidney left_kidney (without: no flips when fine-tuning)")
    parser.add_argument("--probe-levels", type=_probe_level, nargs="+", default=[-1],
                        help="linear probe on these levels: 'bottleneck' and/or decoder "
                             "levels -1 (finest), -2, ...")
    parser.add_argument("--grid-cell", type=int, default=16,
                        help="moco_lrc_grid: side of the square regions in pixels")
    parser.add_argument(
        "--probe-pixels",
        type=int,
        default=4096,
        help="linear probe: pixels per class from the labelled patients",
    )
    parser.add_argument("--probe-l2", type=float, default=1e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--test-cases", type=int, default=5)
    parser.add_argument("--val-cases", type=int, default=2)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--test-ids", nargs="+", default=None, metavar="CASE",
                        help="the test patients by id (instead of --test-cases drawn by "
                             "--split-seed), e.g. patients never scored before")
    parser.add_argument("--val-ids", nargs="+", default=None, metavar="CASE",
                        help="the validation patients by id (instead of --val-cases)")
    parser.add_argument(
        "--lrc-weight",
        type=float,
        default=LRCConfig.weight,
        help="lambda of the LRC arms (default: the library's)",
    )
    parser.add_argument(
        "--noise-floor",
        action="store_true",
        help="repeat the readouts of --noise-arm with another readout seed",
    )
    parser.add_argument("--noise-arm", default="moco", choices=ARMS)
    parser.add_argument("--noise-seeds", type=int, nargs="+", default=None,
                        help="seeds of the noise-floor repeat (default: all)")
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--ablation-k", type=int, default=1)
    parser.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--readout-pilot", action="store_true",
                        help="fine-tune --pilot-arms on the validation patients (never the "
                             "test patients) to check the readout before a protocol")
    parser.add_argument("--pilot-arms", nargs="+", default=["random"], choices=ARMS)
    parser.add_argument("--pilot-ks", type=int, nargs="+", default=[1])
    parser.add_argument("--pilot-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pilot-readout-offsets", type=int, nargs="+", default=[0],
                        metavar="OFFSET",
                        help="readout pilot: fine-tuning seeds seed + OFFSET, from the same "
                             "weights and labelled patients (1000: the noise floor's)")
    parser.add_argument("--skip-main", action="store_true",
                        help="run only the ablations and/or the readout pilot")
    parser.add_argument(
        "--report-only", action="store_true", help="tables from the finished runs only; run nothing"
    )
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--device-batches", action="store_true",
                        help="training slices held and augmented on the training device")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels-last images and model (GPU convolution speed)")
    parser.add_argument("--precompute-workers", type=int, default=1, help="super-pixel cache")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.set_defaults(**(defaults or {}))
    return parser  # fmt: skip


def time_left(runs_left: int, finished_seconds: Sequence[float]) -> str:
    """' (about N min left for the rest)': ``runs_left`` runs at the mean of the finished
    ones (empty before the first run has finished)."""
    if not finished_seconds:
        return ""
    left = runs_left * statistics.fmean(finished_seconds)
    return f" (about {left / 60:.0f} min left for the rest)"


def _largest_k(args: argparse.Namespace) -> int:
    """The largest k that this invocation runs (main protocol, ablations, readout pilot)."""
    ks = [] if getattr(args, "skip_main", False) else list(args.ks)
    ks += [args.ablation_k] if getattr(args, "ablations", False) else []
    ks += list(args.pilot_ks) if getattr(args, "readout_pilot", False) else []
    return max(ks or args.ks)


#: The pilot table's "every organ" cell: did some validation qualify under the organ rule?
_EVERY = {True: "yes", False: "**no** (best mean kept)"}


def pilot_markdown(runs: Sequence[dict[str, Any]], head: dict[str, Any], organs: list[str],
                   groups: Sequence[Sequence[int]] | None = None) -> str:
    """The readout pilot's table: one row per run (validation patients), the lowest organ
    and the validity counts the protocol checks. "best step" is the checkpoint scored;
    "every organ" says whether it met the organ rule (``--checkpoint-min-organ``; always
    "yes" without it); "best mean" is the step that the validation mean alone would have
    chosen, with its Dice and its lowest organ.

    ``groups`` (readout offsets, e.g. ``[[0, 1000, 2000], [3000, 4000, 5000]]``): per draw,
    the mean checkpoint validation Dice of each group whose runs are all finished, and the
    range of those means: what a cell of ``--finetune-repeats`` fine-tunings would vary by."""
    lines = ["# Readout pilot: fine-tuning scored on the validation patients", "",
             f"Command: `{head.get('command', '')}`", "",
             "| arm | k | seed (fine-tuning seed) | labelled | mean Dice | "
             + " | ".join(organs) + " | best step | every organ | best mean | stopped |",
             "|" + "---|" * (len(organs) + 9)]  # fmt: skip
    for r in runs:
        organ = " | ".join(f"{r['per_organ'][o]:.3f}" for o in organs)
        v = r.get("finetune_validation", {})
        seed = f"{r['seed']} ({r['seed'] + r.get('readout_offset', 0)})"
        lines.append(f"| {r['arm']} | {r['k']} | {seed} | {' '.join(r['labelled'])} | "
                     f"{r['mean_dice']:.3f} | {organ} | {v.get('best_step', '')} | "
                     f"{_EVERY.get(v.get('best_every_organ'), '')} | {_best_mean(v)} | "
                     f"{v.get('stopped_step', '')} |")  # fmt: skip
    if not runs:
        return "\n".join([*lines, "", "no finished run"]) + "\n"
    low = [r for r in runs if lowest_organ(r["per_organ"]) < 0.02]
    means = [r["mean_dice"] for r in runs]
    lines += ["", f"{len(runs)} runs; mean Dice {np.mean(means):.3f} (lowest "
              f"{min(means):.3f}); runs with an organ below 0.02: {len(low)}"
              + (f" ({', '.join(r['run'] for r in low)})" if low else "")]  # fmt: skip
    # The readout's own noise: one draw (arm, k, seed) fine-tuned with several seeds.
    draws: dict[tuple[str, int, int], list[float]] = {}
    for r in runs:
        best = (r.get("finetune_validation") or {}).get("best_val_dice")
        if best is not None:
            draws.setdefault((r["arm"], r["k"], r["seed"]), []).append(best)
    repeated = {g: v for g, v in draws.items() if len(v) > 1}
    if repeated:
        lines += ["", "Validation Dice at the checkpoint (`best_val_dice`) over fine-tuning "
                  "seeds of one draw (sd: sample sd, n - 1):", "", "| arm | k | seed | "
                  "fine-tuning seeds | mean | sd | range (max - min) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {arm} | {k} | {seed} | {len(v)} | {np.mean(v):.3f} | "
                  f"{statistics.stdev(v):.3f} | {max(v) - min(v):.3f} ({min(v):.3f}-"
                  f"{max(v):.3f}) |" for (arm, k, seed), v in repeated.items()]  # fmt: skip
    if groups:
        lines += _group_means(runs, groups)
    return "\n".join(lines) + "\n"


def _group_means(runs: Sequence[dict[str, Any]], groups: Sequence[Sequence[int]]) -> list[str]:
    """The pilot's section on groups of fine-tunings (see :func:`pilot_markdown`)."""
    best: dict[tuple[str, int, int], dict[int, float]] = {}
    for r in runs:
        value = (r.get("finetune_validation") or {}).get("best_val_dice")
        if value is not None:
            best.setdefault((r["arm"], r["k"], r["seed"]), {})[r.get("readout_offset", 0)] = value
    size = len(groups[0])
    lines = ["", f"Means of {size} fine-tunings (`best_val_dice`; groups of readout offsets "
             "in the order given, a group only when all its runs are finished):", "",
             "| arm | k | seed | " + " | ".join(f"offsets {' '.join(map(str, g))}"
                                              for g in groups)
             + " | finished groups | mean | range of the means |",
             "|" + "---|" * (len(groups) + 6)]  # fmt: skip
    for (arm, k, seed), values in best.items():
        means = [float(np.mean([values[o] for o in g])) if all(o in values for o in g)
                 else None for g in groups]  # fmt: skip
        done = [m for m in means if m is not None]
        cells = " | ".join("-" if m is None else f"{m:.3f}" for m in means)
        summary = (f"{np.mean(done):.3f} | {max(done) - min(done):.3f}" if len(done) > 1
                   else (f"{done[0]:.3f} | -" if done else "- | -"))  # fmt: skip
        lines.append(f"| {arm} | {k} | {seed} | {cells} | {len(done)} of {len(groups)} | "
                     f"{summary} |")
    return lines


def checkpoint_rule_section(results: Sequence[dict[str, Any] | None], min_organ: float) -> str:
    """Per arm (noise-floor repeats apart): the runs whose checkpoint the organ rule
    (``--checkpoint-min-organ``) moved away from the best validation mean, and those where
    no validation qualified (the best mean of all kept). The rule could favour an arm whose
    organs appear sooner; these counts show whether it acted at all."""
    rows: dict[str, list[int]] = {}
    for r in filter(None, results):
        v = r.get("finetune_validation") or {}
        arm = _table_arm(r)
        row = rows.setdefault(arm, [0, 0, 0])
        row[0] += 1
        curve = v.get("curve") or []
        if curve and v.get("best_step") != _best_mean_point(curve)[0]:
            row[1] += 1
        row[2] += v.get("best_every_organ") is False
    lines = ["", f"## The checkpoint rule (every organ >= {min_organ:g} on the validation "
             "patients)", "", "| arm | runs | checkpoint moved by the rule | no validation "
             "qualified (best mean kept) |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {arm} | {n} | {moved} | {fell} |" for arm, (n, moved, fell) in rows.items()]
    return "\n".join(lines) + "\n"


def _table_arm(run: dict[str, Any]) -> str:
    """A run's or cell's arm as the tables name it: '<arm> (noise-floor repeat)' for one."""
    noise = is_noise_floor(run.get("readout_offset", 0))
    return run["arm"] + (" (noise-floor repeat)" if noise else "")


def finetunings_section(cells: Sequence[dict[str, Any] | None]) -> str:
    """The single fine-tunings behind each cell that averages several (``--finetune-repeats``):
    their mean Dice and lowest organ, beside the cell's mean."""
    lines = ["", "## Cells that are the mean of several fine-tunings", "",
             "| arm | k | seed | cell mean Dice | fine-tunings: mean Dice (lowest organ) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for cell in filter(None, cells):
        if "finetunings" not in cell:
            continue
        arm = _table_arm(cell)
        parts = ", ".join(f"{f['mean_dice']:.3f} ({lowest_organ(f['per_organ']):.3f})"
                          for f in cell["finetunings"])  # fmt: skip
        lines.append(f"| {arm} | {cell['k']} | {cell['seed']} | {cell['mean_dice']:.3f} | "
                     f"{parts} |")
    return "\n".join(lines) + "\n"


def _best_mean_point(curve: Sequence[Sequence[float]]) -> tuple[int, float]:
    """(step, Dice) that the validation mean alone picks: the highest, the earliest on ties
    (as ``BestOnValidation``, which replaces the best only on a strictly higher mean)."""
    step, score = max(curve, key=lambda point: (point[1], -point[0]))
    return int(step), float(score)


def _best_mean(validation: dict[str, Any]) -> str:
    """'step (Dice, lowest organ)' of the best validation mean alone ('' without a curve)."""
    curve = validation.get("curve") or []
    if not curve:
        return ""
    step, score = _best_mean_point(curve)
    organs = dict(validation.get("organ_curve") or []).get(step) or {}
    low = f", {lowest_organ(organs):.3f}" if organs else ""
    return f"{step} ({score:.3f}{low})"


def _stop(signum: int, frame: Any) -> None:
    raise BenchmarkStopped(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None, defaults: dict[str, Any] | None = None) -> int:
    """Run the protocol; bad data exits with status 2 and a message naming the file.

    SIGINT (Ctrl-C) and SIGTERM stop it within seconds: the run in progress is dropped,
    every finished run is on disk (written atomically), and the same command resumes.
    Exit status 128 + the signal's number.
    """
    parser = build_parser(defaults)
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signals reach it only
        previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(parser, argv)
    except DataError as err:
        parser.exit(2, f"lrc-lightning benchmark: error: {err}\n")
    except BenchmarkStopped as stop:
        name = str(stop)
        print(f"\nlrc-lightning benchmark: stopped by {name}; every finished run is saved "
              "under the output folder: run the same command again to resume", file=sys.stderr,
              flush=True)  # fmt: skip
        return 128 + int(getattr(signal, name))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    command = ("python " + " ".join(sys.argv) if argv is None
               else "lrc-lightning benchmark " + " ".join(argv))  # fmt: skip
    if isinstance(args.ct_window, list):
        args.ct_window = (
            args.ct_window[0] if len(args.ct_window) == 1 else [float(v) for v in args.ct_window]
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.data).exists():
        parser.exit(2, f"data not found: {args.data}\n")
    if args.finetune_repeats < 1:
        parser.error(f"--finetune-repeats must be at least 1, not {args.finetune_repeats}")
    unknown = sorted(set(args.finetune_repeat_ks or ()) - set(args.ks))
    if unknown and not args.skip_main:
        parser.error(f"--finetune-repeat-ks {' '.join(map(str, unknown))}: not among --ks "
                     f"{' '.join(map(str, args.ks))}")  # fmt: skip
    if args.finetune_repeat_ks is not None and args.finetune_repeats == 1:
        parser.error("--finetune-repeat-ks without --finetune-repeats N (N > 1) repeats nothing")
    for option in ("seeds", "ks", "arms", "noise_seeds", "pilot_seeds", "pilot_ks",
                   "pilot_arms", "pilot_readout_offsets"):  # fmt: skip
        values = getattr(args, option) or []
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            parser.error(f"--{option.replace('_', '-')}: {' '.join(twice)} given twice would "
                         "count twice")
    if args.readout_pilot and len(args.pilot_readout_offsets) % args.finetune_repeats:
        parser.error(f"--pilot-readout-offsets: {len(args.pilot_readout_offsets)} offsets do "
                     f"not form groups of --finetune-repeats {args.finetune_repeats}")
    wall = time.perf_counter()
    commit = source_commit()
    bench = Benchmark(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = LRCConfig(
        weight=args.lrc_weight, schedule="linear", warmup_steps=args.pretrain_steps // 5
    )

    def header_of(name: str) -> dict[str, Any]:
        # A report rebuilt from finished runs keeps the command and hardware of the runs.
        saved = out / f"{name}.json"
        earlier = json.loads(saved.read_text()) if args.report_only and saved.is_file() else {}
        # Only a table of the same runs (the same key) and the same cells: another key's
        # command, another choice of cells (seeds, ks, arms, a pilot's offsets and their
        # order) or another way of forming cells from them would misdescribe it.
        saved_settings = earlier.get("settings") or {}
        same_cells = all(saved_settings.get(option, default) == getattr(args, option)
                         for option, default in TABLE_OPTIONS.items()) and all(
            saved_settings.get(option) == getattr(args, option) for option in CELL_OPTIONS)
        if earlier.get("key") == bench.key and same_cells:
            return {k: v for k, v in earlier.items()
                    if k not in ("summary", "probe_summary", "noise_floor",
                                 "probe_levels_summary", "comparisons", "decision")}  # fmt: skip
        seconds = {"wall": round(time.perf_counter() - wall, 1),
                   "training_steps": round(bench.train_seconds, 1)}  # fmt: skip
        return header(args, command, commit, seconds)

    variants = {arm: Variant(arm, base) for arm in ARMS}
    variants["moco_lrc_grid"] = Variant("moco_lrc_grid", base, regions="grid",
                                        grid_cell=args.grid_cell)  # fmt: skip
    noise_seeds = args.noise_seeds if args.noise_seeds is not None else args.seeds
    planned: list[tuple[Variant, int, int, str, int]] = []
    if not args.skip_main:
        # Seed by seed, so that an interrupted run leaves whole seeds (the unit) behind.
        for seed in args.seeds:
            planned += [(variants[arm], k, seed, "test", offset) for k in args.ks
                        for arm in args.arms for offset in cell_offsets(args, k)]  # fmt: skip
            if args.noise_floor and seed in noise_seeds:
                planned += [(variants[args.noise_arm], k, seed, "test", offset) for k in args.ks
                            for offset in cell_offsets(args, k, NOISE_SEED_OFFSET)]  # fmt: skip
    if args.ablations:
        planned += [(v, args.ablation_k, seed, "val", 0)
                    for seed in args.ablation_seeds for v in ablation_variants(base)]  # fmt: skip
    if args.readout_pilot:
        planned += [(variants[arm], k, seed, "val", offset) for seed in args.pilot_seeds
                    for k in args.pilot_ks for arm in args.pilot_arms
                    for offset in args.pilot_readout_offsets]  # fmt: skip
    bench.total = len(planned)
    bench.done_before = bench.total - bench.missing(planned)
    if not args.report_only:
        print(f"{bench.done_before} of {bench.total} runs already done; "
              f"{bench.total - bench.done_before} to run", flush=True)  # fmt: skip
        if bench.done_before < bench.total:
            bench.check_data(variants[a] for a in args.arms)

    if not args.skip_main:
        results: list[dict[str, Any] | None] = []  # one per cell (a mean of its fine-tunings)
        repeats: list[dict[str, Any] | None] = []
        finetunings: list[dict[str, Any] | None] = []  # every run
        cells: dict[tuple[str, int, int, bool], list[dict[str, Any] | None]] = {}
        for variant, k, seed, stage, offset in planned:
            if stage == "test":
                run = bench.run(variant, k, seed, stage, readout_offset=offset)
                finetunings.append(run)
                cells.setdefault((variant.label, k, seed, is_noise_floor(offset)), []).append(run)
        incomplete: set[int] = set()
        for (_, _, seed, noise_floor), runs in cells.items():
            # A cell is reported only when all its fine-tunings are finished.
            cell = None if None in runs else combine_finetunings(runs, bench.organs)
            if cell is None:
                incomplete.add(seed)
            (repeats if noise_floor else results).append(cell)
        level_readouts = [f"probe@{lv}" for lv in args.probe_levels if str(lv) != "-1"]
        summaries = {r: summarise(results, bench.organs, r)
                     for r in (*READOUTS, *level_readouts)}  # fmt: skip
        noise = None
        if args.noise_floor:
            noise = {}
            for readout in READOUTS:
                rep = summarise([dict(r, arm="repeat") for r in repeats if r], bench.organs,
                                readout)  # fmt: skip
                noise[readout] = paired_differences(rep, "repeat", summaries[readout],
                                                    args.noise_arm, args.ks)  # fmt: skip
        decision = None
        if all(arm in args.arms for arm in PRIMARY):
            primary = paired_differences(summaries["finetune"], PRIMARY[0],
                                         summaries["finetune"], PRIMARY[1], args.ks)  # fmt: skip
            repeated = summarise([dict(r, arm="repeat") for r in repeats if r], bench.organs,
                                 "finetune")  # fmt: skip
            # Every finished fine-tuning, so that one below the floor counts before the
            # other fine-tunings of its cell have finished.
            organ_runs = [(_run_label(r, len(cell_offsets(args, r["k"])) > 1), r["per_organ"])
                          for r in finetunings if r]  # fmt: skip
            complete = [seed for seed in args.seeds if seed not in incomplete]
            decision = decide(primary, summaries["finetune"],
                              noise.get("finetune") if noise else None, repeats=repeated,
                              organ_runs=organ_runs, seed_order=args.seeds,
                              complete_seeds=complete)  # fmt: skip
        name = f"label_efficiency{args.tag}"
        main_head = header_of(name)
        payload = {**main_head, "classes": bench.organs, "summary": summaries["finetune"],
                   "probe_summary": summaries["probe"],
                   "probe_levels_summary": {r.split("@", 1)[1]: summaries[r]
                                            for r in level_readouts},
                   "comparisons": {r: dict(paired_rows(summaries[r], args.arms, ks=args.ks))
                                   for r in summaries},
                   "noise_floor": noise,
                   "decision": decision.as_dict() if decision else None}  # fmt: skip
        atomic_json(out / f"{name}.json", payload)
        title = f"Label efficiency on {Path(args.data).name} (test patients)"
        text = markdown(summaries, main_head, title, args.arms, bench.organs, noise, args.ks,
                        decision)  # fmt: skip
        if args.checkpoint_min_organ > 0:
            text += checkpoint_rule_section(finetunings, args.checkpoint_min_organ)
        if args.finetune_repeats > 1:
            text += finetunings_section([*results, *repeats])
        (out / f"{name}.md").write_text(text)
        plot({r: summaries[r] for r in READOUTS}, args.arms, out / f"{name}.png")
        print(text)

    if args.ablations:
        variants_ab = ablation_variants(base)  # the same list as planned
        results = [bench.run(v, args.ablation_k, seed, stage="val")
                   for seed in args.ablation_seeds for v in variants_ab]  # fmt: skip
        summaries = {r: summarise(results, bench.organs, r) for r in READOUTS}
        title = (f"Ablations of MoCo + LRC [ours] choices: validation patients, "
                 f"k={args.ablation_k}")  # fmt: skip
        names = [v.label for v in variants_ab]
        name = f"label_efficiency_ablations{args.tag}"
        ablation_head = header_of(name)
        text = markdown(summaries, ablation_head, title, names, bench.organs,
                        ks=[args.ablation_k])
        (out / f"{name}.md").write_text(text)
        atomic_json(out / f"{name}.json", {**ablation_head, "classes": bench.organs,
                                           "summary": summaries["finetune"],
                                           "probe_summary": summaries["probe"]})  # fmt: skip
        print(text)
    if args.readout_pilot:
        pilot = [bench.run(variants[arm], k, seed, stage="val", readout_offset=offset)
                 for seed in args.pilot_seeds for k in args.pilot_ks for arm in args.pilot_arms
                 for offset in args.pilot_readout_offsets]  # fmt: skip
        name = f"label_efficiency_readout_pilot{args.tag}"
        pilot_head = header_of(name)
        repeats_of = args.finetune_repeats
        groups = [args.pilot_readout_offsets[i:i + repeats_of]
                  for i in range(0, len(args.pilot_readout_offsets), repeats_of)]  # fmt: skip
        text = pilot_markdown([r for r in pilot if r], pilot_head, bench.organs,
                              groups=groups if repeats_of > 1 else None)  # fmt: skip
        (out / f"{name}.md").write_text(text)
        atomic_json(out / f"{name}.json", {**pilot_head, "classes": bench.organs,
                                           "runs": [r for r in pilot if r]})  # fmt: skip
        print(text)
    if bench.run_seconds > 0:
        share = bench.train_seconds / bench.run_seconds
        print(f"time in training steps: {bench.train_seconds:.0f} s of {bench.run_seconds:.0f} s "
              f"spent on runs ({100 * share:.0f}%)", flush=True)  # fmt: skip
    return 0
