"""What LRC adds to a training step: UNet2d + MoCo v2 with and without LRC, side by side.

    python benchmarks/step_overhead.py [--sizes 128 256] [--batches 8 16] [--repeats 20]
    python benchmarks/step_overhead.py --slices 32 --sizes 64 --batches 2 --depth 3   # 3D

With ``--slices D`` the network is a UNet3d on (D, size, size) patches with supervoxel maps.

Variants, each a full forward + backward + optimizer step on the same batch:

* ``moco``          MoCo v2 as it is used without LRC: the query pass runs the U-Net encoder
                    only (the decoder is not trained by a global objective).
* ``moco_decoder``  MoCo v2 whose step also trains the decoder on both views (a zero-weight
                    term keeps it in the graph): the same network work as with LRC.
* ``moco_lrc``      MoCo v2 + LRC (``MoCoV2LRC``): head, sampling, loss on the decoder
                    features of the same forward pass.

Steps alternate between variants (warm-up first), and the median of ``--repeats`` steps is
kept. ``step_time_ratio`` = moco_lrc / moco_decoder: the cost of the LRC objective itself
(head + region sampling + InfoNCE) on the network it trains. ``ratio_vs_encoder_only`` =
moco_lrc / moco also counts training the decoder, which LRC needs and a global objective
does not. Peak memory on CPU: growth of the resident set during 3 steps, measured in a
fresh subprocess per variant; on CUDA: ``max_memory_allocated``. On a CUDA machine the
same table is printed for fp32, bf16 and fp16 autocast. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from lrc_lightning.models import MoCoV2, MoCoV2LRC, UNet2d, UNet3d

VARIANTS = ("moco", "moco_decoder", "moco_lrc")


class MoCoWithDecoder(MoCoV2):
    """MoCo v2 that also runs and back-propagates the decoder (zero-weight term)."""

    uses_dense_features = True

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.moco_step(batch)
        assert out.dense_v1 is not None and out.dense_v2 is not None
        return out.loss + 0.0 * (out.dense_v1.sum() + out.dense_v2.sum())


def build(
    variant: str, width: int, depth: int, device: torch.device, slices: int = 0
) -> torch.nn.Module:
    backbone = (UNet3d if slices else UNet2d)(width=width, depth=depth)
    cls = {"moco": MoCoV2, "moco_decoder": MoCoWithDecoder, "moco_lrc": MoCoV2LRC}[variant]
    return cls(backbone, queue_size=4096).to(device).train()


def make_batch(
    size: int, batch: int, device: torch.device, seed: int = 0, slices: int = 0
) -> dict[str, Any]:
    """Two views and realistic super-pixel maps (~80 regions of Felzenszwalb-like sizes;
    with ``slices``, (slices, size, size) volumes with 4x9x9 blocky supervoxels)."""
    g = torch.Generator().manual_seed(seed)
    # Blocky maps: 9x9 coarse cells upsampled, then relabelled: region sizes like CHAOS's.
    spatial = (slices, size, size) if slices else (size, size)
    coarse = torch.randint(0, 80, (batch, 1, *((4,) if slices else ()), 9, 9), generator=g)
    maps = torch.nn.functional.interpolate(coarse.float(), size=spatial)[:, 0]
    maps = maps.long()
    images = torch.randn(2, batch, 1, *spatial, generator=g)
    return {
        "image_v1": images[0].to(device),
        "image_v2": images[1].to(device),
        "superpixels_v1": maps.to(device),
        "superpixels_v2": maps.flip(-1).to(device),
    }


def step_fn(model: torch.nn.Module, batch: dict[str, Any], dtype: torch.dtype | None):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    device_type = batch["image_v1"].device.type
    # fp16 trains with loss scaling (as Lightning's "16-mixed" does); bf16 needs none.
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model.training_step(batch, 0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variants(
    size: int, batch: int, args: argparse.Namespace, device: torch.device, dtype=None
) -> dict[str, float]:
    data = make_batch(size, batch, device, slices=args.slices)
    steps = {}
    for v in VARIANTS:
        torch.manual_seed(0)
        steps[v] = step_fn(build(v, args.width, args.depth, device, args.slices), data, dtype)
    for _ in range(args.warmup):
        for v in VARIANTS:
            steps[v]()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:  # alternating: drifts in machine speed hit all variants alike
            sync(device)
            t0 = time.perf_counter()
            steps[v]()
            sync(device)
            times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _peak_rss_bytes() -> int:
    # VmHWM belongs to this process image; ru_maxrss would carry over the parent's peak
    # (Linux keeps it across fork and exec), which made every variant look the same.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def cpu_peak_growth(
    variant: str, size: int, batch: int, width: int, depth: int, slices: int = 0
) -> int:
    """Run in a child: RSS high-water mark growth over 3 steps (bytes)."""
    device = torch.device("cpu")
    model = build(variant, width, depth, device, slices)
    step = step_fn(model, make_batch(size, batch, device, slices=slices), None)
    before = _rss_bytes()
    for _ in range(3):
        step()
    return max(0, _peak_rss_bytes() - before)


def cpu_memory(size: int, batch: int, args: argparse.Namespace) -> dict[str, int]:
    out = {}
    for v in VARIANTS:
        code = (
            "import sys; sys.path.insert(0, 'benchmarks'); import step_overhead as s; "
            f"print(s.cpu_peak_growth({v!r}, {size}, {batch}, {args.width}, {args.depth}, "
            f"{args.slices}))"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        out[v] = int(done.stdout.strip().splitlines()[-1])
    return out


def cuda_memory(size: int, batch: int, args: argparse.Namespace, dtype) -> dict[str, int]:
    device = torch.device("cuda")
    out = {}
    for v in VARIANTS:
        step = step_fn(build(v, args.width, args.depth, device, args.slices),
                       make_batch(size, batch, device, slices=args.slices), dtype)  # fmt: skip
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        out[v] = torch.cuda.max_memory_allocated()
        del step
        torch.cuda.empty_cache()
    return out


def report(label: str, times: dict[str, float], memory: dict[str, int]) -> dict[str, float]:
    ratio = times["moco_lrc"] / times["moco_decoder"]
    vs_encoder = times["moco_lrc"] / times["moco"]
    mem_ratio = memory["moco_lrc"] / max(1, memory["moco_decoder"])
    print(
        f"{label:28s} moco {times['moco'] * 1e3:8.1f} ms | +decoder "
        f"{times['moco_decoder'] * 1e3:8.1f} ms | +LRC {times['moco_lrc'] * 1e3:8.1f} ms | "
        f"LRC/decoder-base {ratio:.3f} | LRC/encoder-only {vs_encoder:.3f} | "
        f"peak mem LRC/decoder-base {mem_ratio:.3f} "
        f"({memory['moco_lrc'] / 2**20:.0f} / {memory['moco_decoder'] / 2**20:.0f} MiB)",
        flush=True,
    )
    return {"time_ratio": round(ratio, 4), "time_ratio_vs_encoder_only": round(vs_encoder, 4),
            "memory_ratio": round(mem_ratio, 4),
            **{f"{v}_ms": round(t * 1e3, 2) for v, t in times.items()}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--slices", type=int, default=0,
                        help="3D: UNet3d on (slices, size, size) patches (0: 2D)")  # fmt: skip
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="skip the timings")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="all: CPU, then CUDA when present")  # fmt: skip
    parser.add_argument("--json-out", help="also write the JSON summary to this file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "--device cuda: no CUDA device is available\n")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{'UNet3d' if args.slices else 'UNet2d'}(width={args.width}, depth={args.depth})"
        f"{f' on {args.slices}-slice patches' if args.slices else ''}; median of "
        f"{args.repeats} alternating steps"
    )
    results: dict[str, Any] = {}
    cpu = torch.device("cpu")
    for size in args.sizes if args.device != "cuda" else ():
        for batch in args.batches:
            times = ({v: 1.0 for v in VARIANTS} if args.memory_only
                     else time_variants(size, batch, args, cpu))  # fmt: skip
            memory = ({v: 1 for v in VARIANTS} if args.no_memory
                      else cpu_memory(size, batch, args))  # fmt: skip
            shape = f"{args.slices}x{size}x{size}" if args.slices else f"{size}x{size}"
            results[f"cpu_{size}_b{batch}"] = report(f"cpu {shape} b{batch}", times, memory)
    if args.device != "cpu" and torch.cuda.is_available():
        gpu = torch.device("cuda")
        print(f"CUDA: {torch.cuda.get_device_name()}")
        for label, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            for size in args.sizes:
                for batch in args.batches:
                    key = f"cuda_{label}_{size}_b{batch}"
                    try:
                        times = time_variants(size, batch, args, gpu, dtype)
                        memory = cuda_memory(size, batch, args, dtype)
                    except RuntimeError as err:  # report it, go on with the other settings
                        print(f"cuda {label} {size}x{size} b{batch} FAILED: {err}", flush=True)
                        results[key] = {"error": str(err)[:500]}
                        continue
                    results[key] = report(f"cuda {label} {size}x{size} b{batch}", times, memory)
    preferred = ("cpu_256_b16", "cuda_fp32_256_b16")
    headline_key = next(
        k for k in (*preferred, *results) if k in results and "error" not in results[k]
    )
    summary = {
        "step_time_ratio": results[headline_key]["time_ratio"],
        "step_time_ratio_vs_encoder_only": results[headline_key]["time_ratio_vs_encoder_only"],
        "peak_memory_ratio": results[headline_key]["memory_ratio"],
        "headline": headline_key,
        "results": results,
    }
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
