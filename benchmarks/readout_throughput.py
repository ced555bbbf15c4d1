"""Seconds per step of the declared protocol's fine-tuning and pre-training, and seeds per hour.

    python benchmarks/readout_throughput.py [--data data/chaos-t2-demo] [--size 128]
        [--threads 1 2] [--steps 10] [--warmup 2] [--no-compile | --compile-threads 1]
        [--json-out FILE]

The declared protocol of Evidence II (``benchmarks/results/README.md``) fine-tunes and
pre-trains ``UNet2d(width=8, depth=4)`` on 128x128 slices, batch 16, AdamW, and since its
amendment 2 fine-tunes with a hidden-layer head (``--head-channels 32``). This script times,
in one process, on real batches of the shipped CHAOS demo volumes (``LRCDataModule`` with a
temporary cache):

* ``finetune``    one step of :class:`FineTuneSegmentation` (Dice + cross-entropy): forward,
                  backward and AdamW step on a ``mode="finetune"`` batch (foreground-biased
                  slices, mirror-label flips);
* ``pretrain``    one step of :class:`MoCoV2LRC` (shuffle-BN keys, queue 1024, LRC with the
                  library's defaults): forward, backward, AdamW step and the momentum update,
                  on a ``mode="pretrain"`` batch;
* ``validation``  one validation pass over one whole volume: ``validation_step`` (what the
                  Trainer calls: ``predict_volume`` + per-organ Dice) in eval mode;
* ``load``        fetching the batch (or the volume) from the data module's loader, as a run
                  with ``--num-workers 0`` (the protocol's) does in its main process.

Variants of each: ``default`` (contiguous tensors), ``channels_last`` (model and images in
``torch.channels_last``) and ``compile`` (``torch.compile`` of ``training_step`` /
``validation_step``, inductor, as Lightning's ``from_compiled`` does; left out with
``--no-compile``). Each thread count of ``--threads`` (``torch.set_num_threads``) gets its
own models and its own compilation (inductor's CPU kernels are specialised on the thread
count; ``--compile-threads`` keeps the compile variant to some of them); the inductor cache
lives in a fresh temporary folder, so ``compile_s`` is a cold compile (the time of the
warm-up calls of the compiled variant minus as many median steps). A compilation that
inductor fails is tried once more with its pattern matcher off (``compile_notes`` says so:
torch 2.13 fails on MoCo's shuffle-BN). After ``--warmup`` rounds, ``--steps`` rounds
alternate between the variants (each round on a new batch, the same for every variant:
drifts in machine speed hit all variants alike) and the median of each is kept; ``ratio`` =
variant / default at the same thread count.

Seconds per seed (the protocol's work for one seed, from these medians; loading included)::

    step_ft   = median finetune step + median finetune batch load
    step_pre  = median pretrain step + median pretrain batch load
    per_slice = (median validation pass + median volume load) / slices of the measured volume
    run       = F * step_ft + (F // E) * V * per_slice + T * per_slice + c_ft
    seed      = (R + N) * run + P * (S * step_pre + c_pre)

with F = ``--finetune-steps`` (1200: an upper bound, early stopping ends most runs sooner),
E = ``--val-every`` (100), V = ``--val-slices`` (107: the 3 validation volumes chaos_t2_031,
034, 037), T = ``--test-slices`` (206: the 6 test volumes 001, 002, 015, 021, 033, 038), R =
``--finetune-runs`` (12: 4 arms x 3 k), N = ``--noise-runs`` (3: the noise floor, seeds 0-2
only; ``seconds_per_later_seed`` sets N = 0), P = ``--pretrainings`` (3: moco, moco_lrc,
moco_lrc_grid), S = ``--pretrain-steps`` (400), and c_ft, c_pre the cold compile times of the
fine-tuning (step + validation) and pre-training functions for ``compile`` (an upper bound: a
warm inductor cache compiles faster), 0 otherwise. Not counted: the linear probe
(``--probe-levels``, a diagnostic), Lightning's loop, the cache's first fill.
``seeds_per_cpu_hour`` = 3600 / (seed * threads): per core-hour, so one 2-thread process
and two 1-thread processes (seeds split between them) compare directly.

Ends with one JSON line: per thread count and phase, the median seconds per step
(``median_s``), ``ratio`` vs ``default``, ``compile_s``, ``load_s``, ``seconds_per_seed``
and ``seeds_per_cpu_hour`` per variant, the load average before and after, and ``best``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.exc import BackendCompilerFailed

from lrc_lightning.data import LRCDataModule
from lrc_lightning.models import FineTuneSegmentation, MoCoV2LRC, UNet2d

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("finetune", "validation", "pretrain")
#: The demo's split: 2 labelled patients (k = 2), 1 validation volume, the rest pre-training.
LABELLED, VALIDATION = ["chaos_t2_001", "chaos_t2_002"], ["chaos_t2_005"]

Step = Callable[[dict[str, Any]], Any]
Options = dict[str, Any] | None
#: Inductor options of the second try when a compilation fails: torch 2.13's pattern
#: matcher breaks on MoCo's shuffle-BN (``randperm(n)[:n]`` indexing, the "randperm_index"
#: pattern: "Not all inputs to pattern found in match.kwargs ... slice_shape").
FALLBACK: dict[str, Any] = {"pattern_matcher": False}


def organs(data: str) -> list[str]:
    """The organ names of the data's dataset.json (its labels but background, in order)."""
    labels = json.loads((Path(data) / "dataset.json").read_text())["labels"]
    return [labels[key] for key in sorted(labels, key=int) if int(key) > 0]


def datamodule(args: argparse.Namespace, cache: str, mode: str) -> LRCDataModule:
    """The protocol's data module (foreground-biased slices, kidneys' labels swapped on
    flips) on the demo volumes, ready for its loaders."""
    data = LRCDataModule(
        args.data, cache_dir=cache, image_size=args.size, batch_size=args.batch_size,
        mode=mode, labels=list(range(len(args.organs) + 1)), test_cases=[],  # type: ignore[arg-type]
        val_cases=VALIDATION, labelled_cases=LABELLED, foreground_ratio=0.5,
        mirror_labels=[("right_kidney", "left_kidney")],
    )  # fmt: skip
    data.prepare_data()
    data.setup("fit")
    return data


def endless(make_loader: Callable[[], Any]) -> Iterator[dict[str, Any]]:
    """Batches of a loader, a new epoch whenever one ends."""
    while True:
        yield from make_loader()


def timed(batches: Iterator[dict[str, Any]]) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    batch = next(batches)
    return batch, time.perf_counter() - start


def as_variant(batch: dict[str, Any], variant: str) -> dict[str, Any]:
    """The batch's 4D images in channels-last memory for ``channels_last``."""
    if variant != "channels_last":
        return batch
    return {key: value.contiguous(memory_format=torch.channels_last)
            if isinstance(value, torch.Tensor) and value.ndim == 4 and key.startswith("image")
            else value for key, value in batch.items()}  # fmt: skip


def compiled(fn: Callable[..., Any], options: dict[str, Any] | None) -> Callable[..., Any]:
    return torch.compile(fn, options=options)


def train_step(model: Any, variant: str, momentum: bool, options: Options = None) -> Step:
    """forward + backward + AdamW step (+ MoCo's momentum update, as its optimizer_step)."""
    h = model.hparams
    optimizer = torch.optim.AdamW(model.optimizer_parameters(), lr=h["lr"],
                                  weight_decay=h["weight_decay"])  # fmt: skip
    loss_of = (compiled(model.training_step, options) if variant == "compile"
               else model.training_step)  # fmt: skip

    def step(batch: dict[str, Any]) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(batch, 0).backward()
        optimizer.step()
        if momentum:
            model.update_key_encoder()

    return step


def validation_pass(model: FineTuneSegmentation, variant: str, options: Options = None) -> Step:
    """One whole volume through ``validation_step`` (predict_volume + Dice) in eval mode."""
    evaluate = (compiled(model.validation_step, options) if variant == "compile"
                else model.validation_step)  # fmt: skip

    def step(batch: dict[str, Any]) -> None:
        model.eval()
        with torch.no_grad():
            evaluate(batch, 0)
        # The epoch's end, as the Trainer calls it: the Dice table is computed and the
        # per-epoch state emptied (a growing case-id list would recompile every pass).
        model.on_validation_epoch_end()
        model.train()

    return step


def build(phase: str, variant: str, args: argparse.Namespace) -> tuple[Any, bool]:
    """A fresh model of ``phase`` (the same initial weights for every variant)."""
    torch.manual_seed(0)
    backbone = UNet2d(width=args.width, depth=args.depth)
    if phase == "pretrain":  # label_efficiency's: queue 1024, 2 shuffle-BN groups, lr 1e-3
        model: Any = MoCoV2LRC(backbone, queue_size=1024, key_bn_groups=2, lr=1e-3)
    else:
        model = FineTuneSegmentation(backbone, num_classes=len(args.organs) + 1,
                                     class_names=args.organs, lr=1e-3,
                                     head_channels=args.head_channels)  # fmt: skip
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model.train(), phase == "pretrain"


def make_step(
    phase: str,
    variant: str,
    args: argparse.Namespace,
    finetuned: dict[str, FineTuneSegmentation],
    options: Options = None,
) -> Step:
    """The step of ``phase`` for ``variant``; validation passes use the fine-tuned models."""
    if phase == "validation":
        return validation_pass(finetuned[variant], variant, options)
    model, momentum = build(phase, variant, args)
    if phase == "finetune":
        finetuned[variant] = model
    return train_step(model, variant, momentum, options)


def measure(
    args: argparse.Namespace, variants: list[str], loaders: dict[str, Iterator[dict[str, Any]]]
) -> dict[str, Any]:
    """Median seconds per step of every phase and variant at the current thread count."""
    median: dict[str, dict[str, float]] = {}
    compile_s: dict[str, float] = {}
    notes: dict[str, str] = {}
    load: dict[str, float] = {}
    finetuned: dict[str, FineTuneSegmentation] = {}
    for phase in PHASES:
        steps = {v: make_step(phase, v, args, finetuned) for v in variants}
        warm: dict[str, float] = {v: 0.0 for v in variants}
        times: dict[str, list[float]] = {v: [] for v in variants}
        loads: list[float] = []
        for round_ in range(args.warmup + args.steps):
            batch, seconds = timed(loaders[phase])
            loads.append(seconds)
            for variant in variants:
                data = as_variant(batch, variant)
                start = time.perf_counter()
                try:
                    steps[variant](data)
                except BackendCompilerFailed as err:
                    if phase in notes:  # the second try failed too
                        raise
                    # Once, with the pattern matcher off (a fresh model, the same weights).
                    lines = [line for line in str(err).splitlines() if line.strip()]
                    cause = (lines[1:2] or lines or [type(err).__name__])[0][:160]
                    notes[phase] = f"inductor failed ({cause}); compiled with {FALLBACK}"
                    print(f"  {phase}: {notes[phase]}", flush=True)
                    steps[variant] = make_step(phase, variant, args, finetuned, FALLBACK)
                    start = time.perf_counter()
                    steps[variant](data)
                elapsed = time.perf_counter() - start
                if round_ < args.warmup:
                    warm[variant] += elapsed
                else:
                    times[variant].append(elapsed)
        median[phase] = {v: statistics.median(t) for v, t in times.items()}
        load[phase] = statistics.median(loads[args.warmup :])
        if "compile" in variants:
            compile_s[phase] = max(0.0, warm["compile"] - args.warmup * median[phase]["compile"])
        print(f"  threads {torch.get_num_threads()}: {phase} done", flush=True)
    return {"median_s": median, "compile_s": compile_s, "compile_notes": notes, "load_s": load}


def seconds_per_seed(
    figures: dict[str, Any], variant: str, args: argparse.Namespace, noise_runs: int
) -> tuple[float, float]:
    """The docstring's formula for one thread count and variant: seconds per seed, and the
    share of evaluation (validation and test passes) in a fine-tuning run."""
    median, load, compile_s = figures["median_s"], figures["load_s"], figures["compile_s"]
    compiled = variant == "compile"
    c_ft = compile_s["finetune"] + compile_s["validation"] if compiled else 0.0
    c_pre = compile_s["pretrain"] if compiled else 0.0
    step_ft = median["finetune"][variant] + load["finetune"]
    step_pre = median["pretrain"][variant] + load["pretrain"]
    per_slice = (median["validation"][variant] + load["validation"]) / figures["volume_slices"]
    validations = args.finetune_steps // args.val_every
    evaluation = (validations * args.val_slices + args.test_slices) * per_slice
    run = args.finetune_steps * step_ft + evaluation + c_ft
    pre = args.pretrainings * (args.pretrain_steps * step_pre + c_pre)
    return (args.finetune_runs + noise_runs) * run + pre, evaluation / run


def report(threads: str, figures: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Print one thread count's rows; its ratios vs default."""
    median, ratio = figures["median_s"], {}
    for phase in PHASES:
        base = median[phase]["default"]
        ratio[phase] = {v: round(t / base, 4) for v, t in median[phase].items()}
        cells = " | ".join(f"{v} {t * 1e3:9.1f} ms ({ratio[phase][v]:.3f}x)"
                           for v, t in median[phase].items())  # fmt: skip
        if "compile" in median[phase]:
            gain = base - median[phase]["compile"]
            cost = figures["compile_s"][phase]
            cells += f" | compiled in {cost:.1f} s " + (
                f"(repaid after {cost / gain:.0f} steps)" if gain > 0 else "(never repaid)"
            )
        label = (f"validation ({figures['volume_slices']} sl.)" if phase == "validation"
                 else f"{phase} step")  # fmt: skip
        print(f"threads {threads} | {label:20s} | {cells} | "
              f"load {figures['load_s'][phase] * 1e3:.1f} ms", flush=True)  # fmt: skip
    return ratio


def rounded(value: Any, digits: int) -> Any:
    """Floats of a nested dict rounded (for the JSON line)."""
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    return round(value, digits) if isinstance(value, float) else value


def main(argv: list[str] | None = None) -> None:
    # on_validation_epoch_end logs without a Trainer: Lightning warns and logs nothing.
    warnings.filterwarnings("ignore", message=r"You are trying to `self.log\(\)`")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "chaos-t2-demo"),
                        help="the CHAOS demo (its case ids make the split)")  # fmt: skip
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--head-channels", type=int, default=32,
                        help="fine-tuning head's hidden channels (the protocol's since "
                             "amendment 2; 0: the 1x1 head of the session-7 figures)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=10, help="measured rounds (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--compile-threads", type=int, nargs="+",
                        help="thread counts with the compile variant (default: all of "
                             "--threads; each compiles anew, minutes on a small CPU)")  # fmt: skip
    estimate = parser.add_argument_group("the seconds-per-seed estimate (see the docstring)")
    estimate.add_argument("--finetune-steps", type=int, default=1200)
    estimate.add_argument("--val-every", type=int, default=100)
    estimate.add_argument("--val-slices", type=int, default=107)
    estimate.add_argument("--test-slices", type=int, default=206)
    estimate.add_argument("--finetune-runs", type=int, default=12)
    estimate.add_argument("--noise-runs", type=int, default=3)
    estimate.add_argument("--pretrainings", type=int, default=3)
    estimate.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--json-out", help="also write the JSON summary to this file")
    args = parser.parse_args(argv)
    for option in ("steps", "size", "batch_size", "val_every", "finetune_steps"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if min(args.threads) < 1 or len(set(args.threads)) < len(args.threads):
        parser.error(f"--threads must be distinct counts >= 1, got {args.threads}")
    compile_threads = set() if args.no_compile else set(args.compile_threads or args.threads)
    if compile_threads - set(args.threads):
        parser.error(f"--compile-threads {sorted(compile_threads - set(args.threads))} are not "
                     f"among --threads {args.threads}")  # fmt: skip
    if compile_threads and args.warmup < 1:
        parser.error("--warmup must be >= 1 with torch.compile (the warm-up compiles)")
    args.organs = organs(args.data)
    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load_before[0]:.2f} "
          f"{load_before[1]:.2f} {load_before[2]:.2f}; UNet2d(width={args.width}, "
          f"depth={args.depth}) at {args.size}x{args.size}, batch {args.batch_size}; median of "
          f"{args.steps} alternating steps after {args.warmup} warm-up", flush=True)  # fmt: skip
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="readout_throughput_") as tmp:
        # A cold inductor cache: compile_s is what a first compilation costs.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        cache = str(Path(tmp) / "cache")
        finetune_data = datamodule(args, cache, "finetune")
        pretrain_data = datamodule(args, cache, "pretrain")
        volume = next(iter(finetune_data.val_dataloader()))
        slices = int(volume["image"].shape[1])
        for threads in args.threads:
            torch.set_num_threads(threads)
            torch._dynamo.reset()  # a compilation of its own at each thread count
            variants = ["default", "channels_last"] + (
                ["compile"] if threads in compile_threads else []
            )
            loaders = {"finetune": endless(finetune_data.train_dataloader),
                       "pretrain": endless(pretrain_data.train_dataloader),
                       "validation": endless(finetune_data.val_dataloader)}  # fmt: skip
            figures = measure(args, variants, loaders)
            figures["volume_slices"] = slices
            results[str(threads)] = figures
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    keys = ("median_s", "ratio", "compile_s", "compile_notes", "load_s", "seconds_per_seed",
            "seconds_per_later_seed", "evaluation_share", "seeds_per_cpu_hour")  # fmt: skip
    summary: dict[str, Any] = {key: {} for key in keys}
    for threads, figures in results.items():
        summary["ratio"][threads] = report(threads, figures)
        for key in ("median_s", "compile_s", "load_s"):
            summary[key][threads] = rounded(figures[key], 5)
        summary["compile_notes"][threads] = figures["compile_notes"]
    print(f"\nSeconds per seed (declared protocol: {args.finetune_runs} fine-tuning runs of <= "
          f"{args.finetune_steps} steps, validation every {args.val_every} steps on "
          f"{args.val_slices} slices, {args.test_slices} test slices, {args.noise_runs} "
          f"noise-floor runs, {args.pretrainings} pre-trainings of {args.pretrain_steps} steps; "
          "compile: cold compile per run):")  # fmt: skip
    best: tuple[float, str] = (0.0, "")
    for threads, figures in results.items():
        per_seed, later, share, per_hour = {}, {}, {}, {}
        for variant in figures["median_s"]["finetune"]:
            per_seed[variant], share[variant] = seconds_per_seed(
                figures, variant, args, args.noise_runs
            )
            later[variant] = seconds_per_seed(figures, variant, args, 0)[0]
            per_hour[variant] = 3600.0 / (per_seed[variant] * int(threads))
            best = max(best, (per_hour[variant], f"threads {threads} {variant}"))
            print(f"  threads {threads} {variant:13s} {per_seed[variant]:8.0f} s "
                  f"({per_seed[variant] / 3600:.2f} h; without noise floor "
                  f"{later[variant] / 3600:.2f} h; evaluation {share[variant]:.1%} of a run) "
                  f"-> {per_hour[variant]:.3f} seeds per CPU hour", flush=True)  # fmt: skip
        summary["seconds_per_seed"][threads] = rounded(per_seed, 1)
        summary["seconds_per_later_seed"][threads] = rounded(later, 1)
        summary["evaluation_share"][threads] = rounded(share, 4)
        summary["seeds_per_cpu_hour"][threads] = rounded(per_hour, 4)
    print(f"most seeds per CPU hour: {best[1]}")
    summary.update(best=best[1], volume_slices=slices,
                   load_average_before=[round(x, 2) for x in load_before],
                   load_average_after=[round(x, 2) for x in load_after],
                   settings={k: v for k, v in vars(args).items() if k != "json_out"})  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
