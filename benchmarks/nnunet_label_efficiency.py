"""nnU-Net label efficiency: nnU-Net's own fine-tuning from random init, from MoCo and from
MoCo + LRC pre-training (:mod:`lrc_lightning.nnunet`), with k labelled patients.

    python benchmarks/nnunet_label_efficiency.py --data ../shared/data/chaos-t2 \\
        [--configuration 2d] [--arms random moco moco_lrc] [--ks 1 2 4] [--seeds 0 1 2] \\
        [--pretrain-steps 2000] [--epochs 50] [--iterations-per-epoch 250] [--device cuda]

What runs, everything with nnU-Net's own code (nnunetv2, the ``[nnunet]`` extra):

1. Once per configuration (cached in ``--work-dir``): the non-test patients become an
   nnU-Net raw dataset (``imagesTr``/``labelsTr``, the test patients' images in
   ``imagesTs``, outside the dataset: they never enter its fingerprint or plans), and
   ``nnUNetv2_plan_and_preprocess`` plans and preprocesses it.
2. Once per pre-trained arm and seed (cached): MoCo v2 (``moco``) or MoCo v2 + LRC
   (``moco_lrc``) pre-training of the network nnU-Net planned, on nnU-Net's preprocessed
   images of every non-test patient (no labels), exported as ``-pretrained_weights``.
3. Per (arm, k, seed): nnU-Net's trainer (``--trainer``, its length set by ``--epochs`` and
   ``--iterations-per-epoch``) trains on the k labelled patients (the first k of a seeded
   permutation of the labelled pool, nested in k; the same rule as
   ``benchmarks/label_efficiency.py``) with the validation patients as its validation fold
   (a ``splits_final.json`` fold), from the exported weights (nnU-Net's own
   ``load_pretrained_weights``, as ``nnUNetv2_train -pretrained_weights``) or from nnU-Net's
   initialisation (``random``). nnU-Net's predictor segments the test patients from their
   original files (its preprocessing, sliding window and mirroring, resampled back), and
   the 3D Dice of every organ is scored in the original label space.

Each finished run is a JSON file under ``<out>/nnunet_label_efficiency_runs`` (the layout of
``label_efficiency``'s run files), named with a hash of the options that change results: a
rerun skips it (resumable), other options never reuse it. At the end the table (mean over
seeds per arm and k, per organ) and the paired differences with the seed as the unit
(:mod:`lrc_lightning.evaluation.statistics`) go to
``<out>/nnunet_label_efficiency_<configuration><tag>.{md,json}``. SIGINT/SIGTERM stop it
within seconds with every finished run kept.

``--tiny``: settings small enough to check the whole pipeline on a CPU in minutes (results
mean nothing; they are keyed apart). Every option: ``--help``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: The declared Evidence II split (benchmarks/results/README.md).
TEST_IDS = ["chaos_t2_001", "chaos_t2_002", "chaos_t2_015", "chaos_t2_021", "chaos_t2_033",
            "chaos_t2_038"]  # fmt: skip
VAL_IDS = ["chaos_t2_031", "chaos_t2_034", "chaos_t2_037"]
ARMS = ("random", "moco", "moco_lrc")
#: The nnU-Net dataset id of the raw dataset this script writes (in its own nnUNet_raw).
DATASET_ID = 950
RUNS_FOLDER = "nnunet_label_efficiency_runs"
#: What --tiny sets (options given explicitly still win).
TINY = {"pretrain_steps": 2, "pretrain_batch_size": 2, "queue_size": 16, "epochs": 1,
        "iterations_per_epoch": 2, "val_iterations": 1, "samples_per_epoch": 4,
        "processes": 1}  # fmt: skip
#: Options that change results: the runs are keyed by their hash.
PREPARE_OPTIONS = ("configuration", "test_ids", "val_ids", "channel_name")
PRETRAIN_OPTIONS = ("trainer", "pretrain_steps", "pretrain_batch_size", "pretrain_lr",
                    "queue_size", "lrc_weight", "feature_level", "precision")  # fmt: skip
FINETUNE_OPTIONS = ("epochs", "iterations_per_epoch", "val_iterations", "checkpoint",
                    "mirroring")  # fmt: skip


# ---------------------------------------------------------------------- options and keys
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet_label_efficiency.py",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="nnU-Net fine-tuning from random init vs MoCo vs MoCo + LRC pre-training "
        "(lrc_lightning.nnunet) with k labelled patients; nnU-Net plans, preprocesses, "
        "trains and predicts. Resumable: finished runs are skipped.",
    )
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chaos-t2"),
                        help="MSD-style dataset.json (or its folder) with a 'labels' map and "
                        "a 'training' list of image/label volumes (default: CHAOS T2)")  # fmt: skip
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                        help="tables and the run files (<out>/" + RUNS_FOLDER + ")")  # fmt: skip
    parser.add_argument("--work-dir", default=".nnunet_bench",
                        help="nnU-Net's raw/preprocessed/results folders and the pre-trained "
                        "weights (caches; large)")  # fmt: skip
    parser.add_argument("--configuration", default="2d", help="nnU-Net configuration: 2d, "
                        "3d_fullres, ...")  # fmt: skip
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4],
                        help="labelled patients per run")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-ids", nargs="+", default=TEST_IDS, metavar="CASE",
                        help="test patients (default: the Evidence II split)")  # fmt: skip
    parser.add_argument("--val-ids", nargs="+", default=VAL_IDS, metavar="CASE",
                        help="validation patients: nnU-Net's validation fold")  # fmt: skip
    parser.add_argument("--channel-name", default=None,
                        help="nnU-Net channel name of the images ('CT' selects its CT "
                        "normalisation, anything else z-score; default: the dataset.json's "
                        "channel_names/modality, else 'MR')")  # fmt: skip
    parser.add_argument("--trainer", default="nnUNetTrainer",
                        help="nnU-Net trainer class (-tr) to fine-tune with (its length set "
                        "by --epochs) and whose network is pre-trained")  # fmt: skip
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--pretrain-batch-size", type=int, default=None,
                        help="default: the plans' batch size")  # fmt: skip
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--queue-size", type=int, default=4096, help="MoCo negatives")
    parser.add_argument("--lrc-weight", type=float, default=None,
                        help="lambda of moco_lrc (default: the library's)")  # fmt: skip
    parser.add_argument("--feature-level", type=int, default=-1,
                        help="decoder stage LRC reads (-1: the finest)")  # fmt: skip
    parser.add_argument("--precision", default="32-true", help="pre-training precision")
    parser.add_argument("--samples-per-epoch", type=int, default=250,
                        help="pre-training items per Lightning epoch (no effect on results)")
    parser.add_argument("--pretrain-workers", type=int, default=0,
                        help="pre-training data loader processes (super-pixels are "
                        "computed per item: use several on a GPU)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=50, help="nnU-Net epochs per fine-tuning")
    parser.add_argument("--iterations-per-epoch", type=int, default=250,
                        help="nnU-Net training iterations per epoch (its default: 250)")
    parser.add_argument("--val-iterations", type=int, default=50,
                        help="nnU-Net validation iterations per epoch (its default: 50)")
    parser.add_argument("--checkpoint", choices=("final", "best"), default="final",
                        help="scored weights: nnU-Net's checkpoint_final (its default for "
                        "prediction) or checkpoint_best (best EMA pseudo-Dice on the "
                        "validation patients)")  # fmt: skip
    parser.add_argument("--no-mirroring", dest="mirroring", action="store_false",
                        help="predict without nnU-Net's test-time mirroring")  # fmt: skip
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--da-processes", type=int, default=None,
                        help="nnU-Net's data augmentation processes (nnUNet_n_proc_DA; "
                        "default: nnU-Net's choice, 0 with --device cpu)")  # fmt: skip
    parser.add_argument("--processes", type=int, default=4,
                        help="nnU-Net's fingerprint and preprocessing processes (-npfp, "
                        "-np)")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="let nnU-Net torch.compile its network (slow to start)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep nnU-Net's checkpoint files of every run and the "
                        "Lightning checkpoints of the pre-training (hundreds of MB each)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny settings to check the pipeline on a CPU (results mean "
                        "nothing): " + ", ".join(f"{k}={v}" for k, v in TINY.items()))
    parser.add_argument("--report-only", action="store_true",
                        help="the tables from the finished runs; run nothing")  # fmt: skip
    parser.add_argument("--tag", default="", help="suffix of the table file names")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Options, with ``--tiny``'s values for those not given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tiny:
        parser.set_defaults(**TINY)
        args = parser.parse_args(argv)
    return args


def _hash(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=4).hexdigest()


def data_name(data: str) -> str:
    """The data set's name: its folder's (also when ``data`` is its dataset.json)."""
    path = Path(data).resolve()
    return path.parent.name if path.suffix == ".json" else path.name


def lrc_config(args: argparse.Namespace) -> Any:
    """The LRC options of the moco_lrc arm (the library's defaults but --lrc-weight and
    --feature-level)."""
    from lrc_lightning import LRCConfig

    weight = args.lrc_weight if args.lrc_weight is not None else LRCConfig.weight
    return LRCConfig(weight=weight, feature_level=args.feature_level)


def settings_of(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The values of ``names``, the data set's name, and the whole LRC recipe in place of
    its two options (so that a changed library default never reuses older runs)."""
    settings = {name: getattr(args, name) for name in names}
    settings["data"] = data_name(args.data)
    settings["tiny"] = args.tiny
    if "pretrain_steps" in settings:
        settings["pretrain_on"] = "pool"  # once every training case: never reuse those
    if "lrc_weight" in settings:
        del settings["lrc_weight"], settings["feature_level"]
        settings["lrc"] = asdict(lrc_config(args))
    return settings


def run_key(args: argparse.Namespace) -> str:
    """The hash of every option that changes a run's result."""
    return _hash(settings_of(args, (*PREPARE_OPTIONS, *PRETRAIN_OPTIONS, *FINETUNE_OPTIONS)))


def labelled_patients(labelled_pool: Sequence[str], seed: int, k: int) -> list[str]:
    """The k labelled patients of ``seed``: the first k of a seeded permutation of the
    sorted labelled pool, nested in k. The rule of
    ``lrc_lightning.evaluation.label_efficiency.Benchmark.labelled``, so that a seed labels
    the same patients in both benchmarks."""
    import numpy as np

    order = np.random.default_rng(1000 + seed).permutation(len(labelled_pool))
    return [sorted(labelled_pool)[i] for i in order[:k]]


class BenchmarkStopped(Exception):
    """SIGINT or SIGTERM: stop now; every finished run is already on disk."""


def _stop(signum: int, frame: Any) -> None:
    raise BenchmarkStopped(signal.Signals(signum).name)


def _atomic_json(path: Path, payload: Any) -> None:
    from lrc_lightning.evaluation.label_efficiency import atomic_json

    atomic_json(path, payload)


# ---------------------------------------------------------------------- subprocesses
def run_logged(
    command: list[str], log: Path, env: dict[str, str], what: str, progress: Any = None
) -> None:
    """Run ``command`` with its output in ``log``; on SIGINT/SIGTERM (BenchmarkStopped) its
    whole process group (nnU-Net's workers too) is ended before the exception goes on.

    Raises:
        RuntimeError: a non-zero exit, with the end of the log.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)  # fmt: skip
        try:
            while child.poll() is None:
                time.sleep(1.0)
                if progress is not None:
                    progress()
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
    if child.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{what} failed (exit {child.returncode}); the end of {log}:\n{tail}")


# ---------------------------------------------------------------------- the benchmark
class NnUNetBenchmark:
    """The data, split, nnU-Net dataset and resumable runs of one invocation."""

    def __init__(self, args: argparse.Namespace) -> None:
        from lrc_lightning.data import discover_cases
        from lrc_lightning.data.cases import DataError
        from lrc_lightning.evaluation.label_efficiency import class_names

        self.args = args
        if not Path(args.data).exists():
            raise DataError(f"--data {args.data}: no such file or folder (give the folder of an "
                            "MSD-style dataset.json, e.g. data/chaos-t2-demo)")  # fmt: skip
        if not (Path(args.data) / "dataset.json").is_file() and not str(args.data).endswith(
            ".json"
        ):
            raise DataError(f"--data {args.data}: no dataset.json with a 'labels' map (nnU-Net "
                            "needs one; this script has no --classes)")  # fmt: skip
        self.organs = class_names(args.data, None)
        self.key = run_key(args)
        self.out = Path(args.out)
        self.runs = self.out / RUNS_FOLDER
        self.work = Path(args.work_dir).resolve()
        cases = discover_cases(args.data)
        self.cases = {c.case_id: c for c in cases}
        for option, ids in (("--test-ids", args.test_ids), ("--val-ids", args.val_ids)):
            unknown = sorted(set(ids) - set(self.cases))
            if unknown:
                raise DataError(f"{args.data}: {option} names unknown cases {unknown}; the "
                                f"cases are {sorted(self.cases)}")  # fmt: skip
            if len(set(ids)) != len(ids):
                raise DataError(f"{option} names a case twice: {ids}")
        shared = sorted(set(args.test_ids) & set(args.val_ids))
        if shared:
            raise DataError(f"--test-ids and --val-ids share {shared}")
        if not args.val_ids or not args.test_ids:
            raise DataError("--test-ids and --val-ids must each name at least one patient")
        self.test, self.val = list(args.test_ids), list(args.val_ids)
        unlabelled = sorted(c for c in [*self.test, *self.val] if self.cases[c].label is None)
        if unlabelled:
            raise DataError(f"{args.data}: test and validation patients need labels; "
                            f"{unlabelled} have none")  # fmt: skip
        self.pool = sorted(set(self.cases) - set(self.test) - set(self.val))
        self.labelled_pool = [c for c in self.pool if self.cases[c].label is not None]
        if min(args.ks) < 1 or max(args.ks) > len(self.labelled_pool):
            raise DataError(
                f"{args.data}: --ks {args.ks}: k must be 1..{len(self.labelled_pool)}, the "
                f"labelled patients left after {len(self.test)} test and {len(self.val)} "
                "validation patients"
            )
        self.total = self.done_before = self.started = 0
        self.finished_seconds: list[float] = []
        self._last_progress = 0.0

    # ------------------------------------------------------------------ paths
    @property
    def dataset_name(self) -> str:
        name = re.sub(r"[^A-Za-z0-9]+", "", data_name(self.args.data).title())
        return f"Dataset{DATASET_ID:03d}_{name or 'Data'}"

    def prepared_root(self) -> Path:
        """nnU-Net's raw and preprocessed folders of this data, split and configuration."""
        from importlib.metadata import version

        settings = settings_of(self.args, PREPARE_OPTIONS)
        settings["nnunetv2"] = version("nnunetv2")  # its preprocessed format changes
        settings["cases"] = self.training_cases()
        return self.work / f"nnunet_{self.args.configuration}-{_hash(settings)}"

    def training_cases(self) -> list[str]:
        """The cases of nnU-Net's dataset: every non-test case with a label file (its
        preprocessing needs one per case; unlabelled pool images are left out of it, and so
        out of the pre-training that reads it)."""
        return [c for c in [*self.pool, *self.val] if self.cases[c].label is not None]

    def pretraining_cases(self) -> list[str]:
        """The cases pre-training reads: the pool's, never the validation patients' (which
        choose nnU-Net's checkpoint) nor the test patients', as in label_efficiency."""
        return [c for c in self.training_cases() if c in set(self.pool)]

    def nnunet_env(self, results: Path | None = None) -> dict[str, str]:
        """nnU-Net's environment: its folders under the prepared root, and for training
        (``results`` given) its compile switch and augmentation processes."""
        root = self.prepared_root()
        env = dict(os.environ)
        env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
                   nnUNet_results=str(results or root / "results"))  # fmt: skip
        if results is None:
            return env  # planning: nnUNet_n_proc_DA=0 would make its planner fail
        env["nnUNet_compile"] = "true" if self.args.compile else "false"
        processes = self.args.da_processes
        if processes is None and self.args.device == "cpu":
            processes = 0  # augmentation in the training process: no worker start-up
        if processes is not None:
            env["nnUNet_n_proc_DA"] = str(processes)
        return env

    def phase(self, text: str) -> None:
        print(f"  {text}", flush=True)

    # ------------------------------------------------------------------ 1. nnU-Net dataset
    def channel_name(self) -> str:
        """nnU-Net's channel name for the images (it picks the normalisation)."""
        if self.args.channel_name:
            return str(self.args.channel_name)
        from lrc_lightning.data.cases import read_json

        path = Path(self.args.data)
        path = path / "dataset.json" if path.is_dir() else path
        meta = read_json(path) if path.suffix == ".json" else {}
        names = meta.get("channel_names") or meta.get("modality") or {}
        if isinstance(names, dict) and len(names) > 1:
            from lrc_lightning.data.cases import DataError

            raise DataError(f"{path}: {len(names)} channels ({names}); this benchmark reads "
                            "one image per case")  # fmt: skip
        return str(next(iter(names.values()))) if isinstance(names, dict) and names else "MR"

    def _place(self, source: Path, target: Path) -> None:
        """``source`` as ``target`` (.nii.gz): a link when it is one, else converted."""
        from lrc_lightning.data.cases import DataError

        if source.is_dir():
            raise DataError(f"{source}: a DICOM folder; convert the cases to NIfTI first "
                            "(nnU-Net reads volume files)")  # fmt: skip
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.name.endswith(".nii.gz"):
            target.symlink_to(source.resolve())
            return
        import SimpleITK as sitk

        sitk.WriteImage(sitk.ReadImage(str(source)), str(target))

    def prepare(self) -> Path:
        """nnU-Net's preprocessed dataset folder, planned and preprocessed once (cached;
        an interrupted preparation is redone)."""
        root = self.prepared_root()
        folder = root / "preprocessed" / self.dataset_name
        marker = root / "prepared.json"
        if marker.is_file():
            return folder
        training = self.training_cases()
        self.phase(f"nnU-Net dataset: {len(training)} patients, planned and preprocessed by "
                   f"nnU-Net ({self.args.configuration}) in {root}")  # fmt: skip
        left = sorted(set(self.pool) - set(training))
        if left:
            self.phase(f"left out (no label file, which nnU-Net's preprocessing needs): {left}")
        start = time.perf_counter()
        if root.exists():
            shutil.rmtree(root)
        raw = root / "raw" / self.dataset_name
        for case_id in training:
            case = self.cases[case_id]
            assert case.label is not None
            self._place(case.image, raw / "imagesTr" / f"{case_id}_0000.nii.gz")
            self._place(case.label, raw / "labelsTr" / f"{case_id}.nii.gz")
        for case_id in self.test:
            self._place(self.cases[case_id].image, raw / "imagesTs" / f"{case_id}_0000.nii.gz")
        labels = {"background": 0, **{o: i + 1 for i, o in enumerate(self.organs)}}
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "dataset.json").write_text(json.dumps({
            "name": self.dataset_name, "channel_names": {"0": self.channel_name()},
            "labels": labels, "numTraining": len(list((raw / "labelsTr").iterdir())),
            "file_ending": ".nii.gz",
            "description": f"written by benchmarks/nnunet_label_efficiency.py from "
                           f"{self.args.data}; test patients (imagesTs): {self.test}",
        }, indent=1))  # fmt: skip
        code = ("import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints "
                "import plan_and_preprocess_entry; plan_and_preprocess_entry()")  # fmt: skip
        command = [sys.executable, "-c", code, "-d", str(DATASET_ID), "-c",
                   self.args.configuration, "-np", str(self.args.processes),
                   "-npfp", str(self.args.processes),
                   "--verify_dataset_integrity"]  # fmt: skip
        run_logged(command, root / "plan_and_preprocess.log", self.nnunet_env(),
                   "nnUNetv2_plan_and_preprocess")  # fmt: skip
        plans = json.loads((folder / "nnUNetPlans.json").read_text())
        if self.args.configuration not in plans.get("configurations", {}):
            raise ValueError(f"{folder}/nnUNetPlans.json: no configuration "
                             f"{self.args.configuration!r}; nnU-Net planned "
                             f"{sorted(plans.get('configurations', {}))}")  # fmt: skip
        _atomic_json(marker, {"cases": training, "test": self.test,
                              "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
        self.phase(f"prepared in {time.perf_counter() - start:.0f} s")
        return folder

    def fold(self, preprocessed: Path, labelled: list[str]) -> int:
        """The fold of ``splits_final.json`` with ``labelled`` in train and the validation
        patients in val: found, or appended (folds are never reordered, so a fold number
        keeps its meaning across invocations)."""
        path = preprocessed / "splits_final.json"
        splits = json.loads(path.read_text()) if path.is_file() else []
        wanted = {"train": sorted(labelled), "val": sorted(self.val)}
        for index, split in enumerate(splits):
            if {"train": sorted(split["train"]), "val": sorted(split["val"])} == wanted:
                return index
        splits.append(wanted)
        _atomic_json(path, splits)
        return len(splits) - 1

    # ------------------------------------------------------------------ 2. pre-training
    def pretrained(self, preprocessed: Path, arm: str, seed: int) -> tuple[Path, float]:
        """The exported weights of ``arm`` and ``seed`` (pre-trained now unless cached) and
        the seconds spent now."""
        settings = settings_of(self.args, (*PREPARE_OPTIONS, *PRETRAIN_OPTIONS))
        path = self.work / "pretrained" / f"{arm}_s{seed}-{_hash(settings)}.pth"
        if path.is_file():
            return path, 0.0
        from lrc_lightning.evaluation.label_efficiency import StepTimer
        from lrc_lightning.nnunet import pretrain

        a = self.args
        self.phase(f"pre-training {arm} seed {seed} ({a.pretrain_steps} steps, nnU-Net's "
                   f"{a.configuration} network)")  # fmt: skip
        start = time.perf_counter()
        run_dir = path.with_name(path.name + ".run")
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted pre-training starts again
        options = {"accelerator": "gpu" if a.device == "cuda" else "cpu", "devices": 1,
                   "precision": a.precision, "enable_progress_bar": False,
                   "enable_model_summary": False,
                   "callbacks": [StepTimer(f"pre-training {arm}", every=60.0)]}  # fmt: skip
        pretrain(preprocessed, a.configuration, path, run_dir, max_steps=a.pretrain_steps,
                 batch_size=a.pretrain_batch_size, samples_per_epoch=a.samples_per_epoch,
                 num_workers=a.pretrain_workers, lrc=lrc_config(a),
                 trainer_class=a.trainer, seed=seed, trainer_options=options,
                 baseline=arm == "moco", lr=a.pretrain_lr, queue_size=a.queue_size,
                 cases=self.pretraining_cases())  # fmt: skip
        if not a.keep_checkpoints:
            shutil.rmtree(run_dir)  # its Lightning checkpoint: the export is what is used
        seconds = time.perf_counter() - start
        self.phase(f"pre-trained {path.name} in {seconds:.0f} s")
        return path, seconds

    # ------------------------------------------------------------------ 3. fine-tuning
    def finetune(
        self, run_id: str, weights: Path | None, fold: int, seed: int
    ) -> tuple[dict[str, Any], Path]:
        """nnU-Net's trainer on ``fold`` from ``weights`` (None: its own init), then its
        predictor on the test patients, in a child process with this run's nnUNet_results.

        Returns the child's record and the folder of the test predictions.
        """
        a = self.args
        run_dir = self.work / "finetune" / f"{run_id}-{self.key}"
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted fine-tuning starts again
        run_dir.mkdir(parents=True)
        raw = self.prepared_root() / "raw" / self.dataset_name
        spec = {
            "dataset": self.dataset_name, "configuration": a.configuration, "fold": fold,
            "trainer": a.trainer, "weights": str(weights) if weights else None,
            "device": a.device, "seed": seed, "epochs": a.epochs,
            "iterations_per_epoch": a.iterations_per_epoch, "val_iterations": a.val_iterations,
            "checkpoint": a.checkpoint, "mirroring": a.mirroring,
            "test_images": {c: str(raw / "imagesTs" / f"{c}_0000.nii.gz") for c in self.test},
            "predictions": str(run_dir / "predictions"), "result": str(run_dir / "result.json"),
            "keep_checkpoints": a.keep_checkpoints,
        }  # fmt: skip
        (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
        self.phase(f"fine-tuning with nnU-Net's {a.trainer} ({a.epochs} epochs x "
                   f"{a.iterations_per_epoch} iterations), fold {fold}, "
                   f"{'from ' + weights.name if weights else 'random init'}; then its "
                   f"predictor on {len(self.test)} test patients")  # fmt: skip
        log = run_dir / "nnunet.log"
        self._last_progress = time.perf_counter()
        command = [sys.executable, str(Path(__file__).resolve()), "--finetune-child",
                   str(run_dir / "spec.json")]  # fmt: skip
        run_logged(command, log, self.nnunet_env(run_dir / "nnUNet_results"),
                   f"nnU-Net fine-tuning of {run_id}", lambda: self._progress(log))  # fmt: skip
        return json.loads((run_dir / "result.json").read_text()), run_dir / "predictions"

    def _progress(self, log: Path) -> None:
        """A line every minute with nnU-Net's epoch, read from its log."""
        now = time.perf_counter()
        if now - self._last_progress < 60:
            return
        self._last_progress = now
        epochs = re.findall(r"Epoch (\d+)\s*$", log.read_text(errors="replace"), re.M)
        where = f"epoch {int(epochs[-1]) + 1}/{self.args.epochs}" if epochs else "starting"
        print(f"    nnU-Net: {where}", flush=True)

    # ------------------------------------------------------------------ scoring
    def score(self, predictions: Path) -> dict[str, list[float]]:
        """Per test patient, the 3D Dice of each organ (NaN where the organ is in neither
        map) of nnU-Net's prediction against the original label volume.

        Raises:
            RuntimeError: a prediction is missing or its grid differs from the label's.
            DataError: a label value outside the classes, naming the file.
        """
        import numpy as np
        import SimpleITK as sitk
        import torch

        from lrc_lightning.data.cases import DataError
        from lrc_lightning.models.metrics import dice_per_organ

        table = {}
        for case_id in self.test:
            label_path = self.cases[case_id].label
            assert label_path is not None
            file = predictions / f"{case_id}.nii.gz"
            if not file.is_file():
                raise RuntimeError(f"{file}: nnU-Net wrote no prediction for {case_id}")
            predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(file)))
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
            if predicted.shape != truth.shape:
                raise RuntimeError(f"{file}: shape {predicted.shape}, but the label "
                                   f"{label_path} is {truth.shape}")  # fmt: skip
            values = np.unique(truth)
            if values.min() < 0 or values.max() > len(self.organs):
                raise DataError(f"{label_path}: label values {values.tolist()} outside "
                                f"0..{len(self.organs)} ({self.organs})")  # fmt: skip
            dice = dice_per_organ(torch.from_numpy(predicted.astype(np.int64))[None],
                                  torch.from_numpy(truth.astype(np.int64))[None],
                                  len(self.organs) + 1)  # fmt: skip
            table[case_id] = [float(v) for v in dice[0]]
        return table

    def record(self, per_volume: dict[str, list[float]]) -> dict[str, Any]:
        import numpy as np

        rows = np.array(list(per_volume.values()), dtype=float)
        with np.errstate(invalid="ignore"):
            per_organ = [float(np.nanmean(c)) if not np.all(np.isnan(c)) else float("nan")
                         for c in rows.T]  # fmt: skip
            means = {c: float(np.nanmean(r)) if not np.all(np.isnan(r)) else float("nan")
                     for c, r in per_volume.items()}  # fmt: skip
        return {"per_volume": per_volume, "per_volume_mean": means,
                "per_organ": dict(zip(self.organs, per_organ, strict=True)),
                "mean_dice": float(np.nanmean(per_organ))}  # fmt: skip

    # ------------------------------------------------------------------ one run
    def run_path(self, arm: str, k: int, seed: int) -> Path:
        return self.runs / f"test_{arm}_k{k}_s{seed}-{self.key}.json"

    def run(self, arm: str, k: int, seed: int) -> dict[str, Any] | None:
        """One finished run: read when on disk, else computed now (None: missing with
        --report-only)."""
        path = self.run_path(arm, k, seed)
        run_id = path.name.split("-")[0]
        if path.is_file():
            return json.loads(path.read_text())
        if self.args.report_only:
            print(f"[missing] {run_id}", file=sys.stderr)
            return None
        self.started += 1
        print(f"[{self.done_before + self.started}/{self.total}] {run_id}{self.eta()}",
              flush=True)  # fmt: skip
        start = time.perf_counter()
        preprocessed = self.prepare()
        labelled = labelled_patients(self.labelled_pool, seed, k)
        fold = self.fold(preprocessed, labelled)
        weights, pretrain_seconds = (None, 0.0)
        if arm != "random":
            weights, pretrain_seconds = self.pretrained(preprocessed, arm, seed)
        child, predictions = self.finetune(run_id, weights, fold, seed)
        self.phase(f"scoring {len(self.test)} test patients in the original label space")
        scores = self.record(self.score(predictions))
        seconds = time.perf_counter() - start
        self.finished_seconds.append(seconds)
        a = self.args
        result = {
            "run": run_id, "arm": arm, "k": k, "seed": seed, "stage": "test",
            "labelled": labelled, "validation_patients": self.val, "classes": self.organs,
            **scores, "nnunet": {"fold": fold, **child},
            "variant": {"arm": arm, "pretrained": weights.name if weights else None,
                        "lrc": asdict(lrc_config(a)) if arm == "moco_lrc" else None},
            "settings": {**settings_of(a, (*PREPARE_OPTIONS, *PRETRAIN_OPTIONS,
                                           *FINETUNE_OPTIONS)), "device": a.device},
            "seconds": round(seconds, 1), "pretrain_seconds": round(pretrain_seconds, 1),
        }  # fmt: skip
        _atomic_json(path, result)
        low = min(scores["per_organ"].values())
        print(f"{run_id}: mean test Dice {result['mean_dice']:.3f} (lowest organ {low:.3f}; "
              f"nnU-Net's last validation pseudo-Dice "
              f"{_last(child['validation'].get('mean_fg_dice'))}) in {seconds:.0f} s",
              flush=True)  # fmt: skip
        return result

    def eta(self) -> str:
        from lrc_lightning.evaluation.label_efficiency import time_left

        return time_left(self.total - self.done_before - self.started + 1,
                         self.finished_seconds)  # fmt: skip


def _last(values: Any) -> str:
    return f"{values[-1]:.3f}" if isinstance(values, list) and values else "-"


# ---------------------------------------------------------------------- tables
#: Paired comparisons (a - b), the declared primary one first.
COMPARISONS = (("moco_lrc", "moco"), ("moco", "random"), ("moco_lrc", "random"))


def comparisons(summary: dict[str, Any], arms: Sequence[str], ks: Sequence[int]) -> list[Any]:
    """(label, paired_differences) with the seed as the unit, for the arms present."""
    from lrc_lightning.evaluation.statistics import paired_differences

    rows = []
    for a, b in COMPARISONS:
        if a in arms and b in arms:
            label = f"{a} - {b}" + (" **(primary)**" if (a, b) == COMPARISONS[0] else "")
            rows.append((label, paired_differences(summary, a, summary, b, ks)))
    return rows


def markdown(
    summary: dict[str, Any], head: dict[str, Any], args: argparse.Namespace, organs: list[str]
) -> str:
    from lrc_lightning.evaluation.statistics import paired_table

    ks = sorted(args.ks)
    lines = [f"# nnU-Net label efficiency on {data_name(args.data)} ({args.configuration}, "
             "test patients)", "", f"`{head['command']}`", "",
             f"versions: {head['versions']}  ", f"hardware: {head['hardware']}", "",
             f"nnU-Net's {args.trainer}: {args.epochs} epochs x {args.iterations_per_epoch} "
             f"iterations, scored with checkpoint_{args.checkpoint}; pre-training "
             f"{args.pretrain_steps} steps. Test patients {args.test_ids}, validation "
             f"patients {args.val_ids}.", "",
             "Mean 3D Dice over organs, mean ± sd over seeds (n seeds):", "",
             "| arm | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---|" + "---|" * len(ks)]  # fmt: skip
    for arm in args.arms:
        cells = []
        for k in ks:
            s = summary.get(f"{arm}|{k}")
            spread = f"{s['std']:.3f}" if s and s["n_seeds"] > 1 else "-"
            cells.append(f"{s['mean']:.3f} ± {spread} ({s['n_seeds']})" if s else "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Per organ (mean over seeds):", "",
              "| arm | k | " + " | ".join(organs) + " |", "|---|---|" + "---|" * len(organs)]
    for arm in args.arms:
        for k in ks:
            s = summary.get(f"{arm}|{k}")
            if s:
                lines.append(f"| {arm} | {k} | "
                             + " | ".join(f"{s['per_organ'][o]:.3f}" for o in organs) + " |")
    rows = comparisons(summary, args.arms, ks)
    if any(d for _, d in rows):
        lines += ["", "Paired differences of mean Dice with the seed as the unit (per seed, "
                  "the mean over k of the difference; a seed counts when it has every k):",
                  "", *paired_table(rows)]  # fmt: skip
    return "\n".join(lines) + "\n"


def header(args: argparse.Namespace, command: str, seconds: float) -> dict[str, Any]:
    import pytorch_lightning as pl
    import torch

    from lrc_lightning import __version__
    from lrc_lightning.evaluation.label_efficiency import source_commit

    try:
        from importlib.metadata import version

        nnunet = version("nnunetv2")
    except Exception:  # not installed: --report-only from run files
        nnunet = None
    return {
        "command": command, "commit": source_commit(),
        "versions": {"lrc_lightning": __version__, "nnunetv2": nnunet,
                     "torch": torch.__version__, "pytorch_lightning": pl.__version__,
                     "python": platform.python_version()},
        "hardware": {"machine": platform.machine(), "cpus": os.cpu_count(),
                     "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "seconds": round(seconds, 1),
    }  # fmt: skip


# ---------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; bad data exits with status 2 and a message naming the file.
    SIGINT/SIGTERM: exit 128 + the signal's number, every finished run kept."""
    from lrc_lightning.data.cases import DataError

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _main(argv)
    except DataError as err:
        print(f"nnunet_label_efficiency.py: error: {err}", file=sys.stderr)
        return 2
    except BenchmarkStopped as stop:
        name = str(stop)
        print(f"\nnnunet_label_efficiency.py: stopped by {name}; every finished run is saved "
              "under the output folder: run the same command again to resume",
              file=sys.stderr, flush=True)  # fmt: skip
        return 128 + int(getattr(signal, name))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_environment(args: argparse.Namespace) -> None:
    """Before any work: nnU-Net importable, and the device there.

    Raises:
        DataError: naming what is missing and what to do.
    """
    import importlib.util

    import torch

    from lrc_lightning.data.cases import DataError

    if importlib.util.find_spec("nnunetv2") is None:
        raise DataError("nnU-Net (nnunetv2) is not installed: pip install "
                        "'lrc-lightning[nnunet]' (--report-only needs no nnU-Net)")  # fmt: skip
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available here; use --device cpu "
                        "(with --tiny to check the pipeline)")  # fmt: skip


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/nnunet_label_efficiency.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    wall = time.perf_counter()
    bench = NnUNetBenchmark(args)
    print(f"classes {bench.organs}\ntest patients {bench.test}\nvalidation patients "
          f"{bench.val}\npool ({len(bench.pool)}) {bench.pool}", flush=True)  # fmt: skip
    # Seed by seed, so that an interrupted benchmark leaves whole seeds (the unit) behind.
    planned = [(arm, k, seed) for seed in args.seeds for k in args.ks for arm in args.arms]
    bench.total = len(planned)
    done = [p for p in planned if bench.run_path(*p).is_file()]
    bench.done_before = len(done)
    if not args.report_only:
        print(f"{len(done)} of {len(planned)} runs already done (skipped); "
              f"{len(planned) - len(done)} to run", flush=True)  # fmt: skip
        if len(done) < len(planned):
            check_environment(args)
    results = [bench.run(*p) for p in planned]
    from lrc_lightning.evaluation.label_efficiency import summarise

    summary = summarise(results, bench.organs)
    head = header(args, command, time.perf_counter() - wall)
    name = f"nnunet_label_efficiency_{args.configuration}{args.tag}"
    out = Path(args.out)
    payload = {**head, "classes": bench.organs, "summary": summary,
               "comparisons": dict(comparisons(summary, args.arms, args.ks))}  # fmt: skip
    _atomic_json(out / f"{name}.json", payload)
    text = markdown(summary, head, args, bench.organs)
    (out / f"{name}.md").write_text(text)
    print(text)
    return 0


# ---------------------------------------------------------------------- the child process
def finetune_child(spec_file: str) -> int:
    """Run in a child process with nnU-Net's environment: what ``nnUNetv2_train DATASET
    CONFIGURATION FOLD -tr TRAINER [-pretrained_weights FILE]`` does (nnU-Net's trainer
    class, its ``maybe_load_checkpoint``, its ``run_training``), with the length of the
    training set on a subclass; then nnU-Net's predictor on the test images (as its own
    final validation sets it up) and the record of the training for the parent."""
    spec = json.loads(Path(spec_file).read_text())
    import random

    import nnunetv2
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    cuda = torch.device("cuda")  # nnU-Net's default device
    base = recursive_find_python_class(
        join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), spec["trainer"],
        "nnunetv2.training.nnUNetTrainer",
    )  # fmt: skip
    if base is None:
        raise SystemExit(f"nnU-Net has no trainer class {spec['trainer']!r} (-tr)")

    class nnUNetTrainerLabelEfficiency(base):  # type: ignore[misc, valid-type]
        """nnU-Net's trainer with the benchmark's length (as nnU-Net's own
        nnUNetTrainer_Xepochs variants set it)."""

        # nnU-Net's signature (its __init__ records its arguments by these names).
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = cuda) -> None:  # fmt: skip
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = spec["epochs"]
            self.num_iterations_per_epoch = spec["iterations_per_epoch"]
            self.num_val_iterations_per_epoch = spec["val_iterations"]

    # Seeded, so that the arms of one seed start their heads (and random init) alike and
    # draw the same batches when augmentation runs in this process.
    random.seed(spec["seed"])
    np.random.seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    folder = join(os.environ["nnUNet_preprocessed"], spec["dataset"])
    plans = load_json(join(folder, "nnUNetPlans.json"))
    plans["continue_training"] = False  # as nnU-Net's get_trainer_from_args
    device = torch.device(spec["device"])
    trainer = nnUNetTrainerLabelEfficiency(plans=plans, configuration=spec["configuration"],
                                           fold=spec["fold"],
                                           dataset_json=load_json(join(folder, "dataset.json")),
                                           device=device)  # fmt: skip
    maybe_load_checkpoint(trainer, False, False, spec["weights"])
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    trainer.run_training()
    training_seconds = time.perf_counter() - start
    if spec["checkpoint"] == "best":
        trainer.load_checkpoint(join(trainer.output_folder, "checkpoint_best.pth"))

    start = time.perf_counter()
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True,
                                use_mirroring=spec["mirroring"],
                                perform_everything_on_device=device.type == "cuda",
                                device=device, verbose=False, verbose_preprocessing=False,
                                allow_tqdm=False)  # fmt: skip
    # The trained weights as the predictor's one "fold" (it loads them before predicting).
    network = getattr(trainer.network, "_orig_mod", trainer.network)  # compiled or not
    predictor.manual_initialization(trainer.network, trainer.plans_manager,
                                    trainer.configuration_manager, [network.state_dict()],
                                    trainer.dataset_json,
                                    type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)  # fmt: skip
    out = Path(spec["predictions"])
    out.mkdir(parents=True, exist_ok=True)
    cases = sorted(spec["test_images"])
    predictor.predict_from_files_sequential([[spec["test_images"][c]] for c in cases],
                                            [str(out / c) for c in cases],
                                            save_probabilities=False)  # fmt: skip
    predict_seconds = time.perf_counter() - start

    def logged(key: str) -> Any:
        try:
            values = trainer.logger.get_value(key, None)
        except (KeyError, AssertionError):
            return None
        return [np.round(np.asarray(v, dtype=float), 4).tolist() for v in values]

    record = {
        "trainer": spec["trainer"], "epochs_run": int(trainer.current_epoch),
        "checkpoint": spec["checkpoint"], "pretrained_weights": spec["weights"],
        "validation": {key: logged(key) for key in ("mean_fg_dice", "ema_fg_dice",
                                                    "dice_per_class_or_region",
                                                    "train_losses", "val_losses")},
        "best_ema_fg_dice": None if trainer._best_ema is None else float(trainer._best_ema),
        "training_seconds": round(training_seconds, 1),
        "predict_seconds": round(predict_seconds, 1),
        "output_folder": trainer.output_folder,
    }  # fmt: skip
    if not spec["keep_checkpoints"]:
        for checkpoint in Path(trainer.output_folder).glob("checkpoint_*.pth"):
            checkpoint.unlink()  # hundreds of MB per run; the scores are what is kept
    result = Path(spec["result"])
    result.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
    result.with_suffix(".tmp").replace(result)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--finetune-child":
        sys.exit(finetune_child(sys.argv[2]))
    sys.exit(main())
