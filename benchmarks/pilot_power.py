"""How often does a readout pilot's noise criterion pass? The range criterion, simulated.

A readout pilot (Evidence II, amendments 3-6) passes its criterion (b) when the range
(max - min) of ``--groups`` values is at most ``--width``, each value the mean of ``--n``
fine-tunings. If one fine-tuning's checkpoint Dice is normal with sd ``--sd``, a value has
sd ``sd / sqrt(n)``, and the chance of a pass is that of the range of ``groups`` normal
draws. This simulates it (fixed ``--seed``) for each ``--sd`` and prints one line each.

    python benchmarks/pilot_power.py --sd 0.053 0.090 --n 3 --groups 4 --width 0.07
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np


def pass_probability(
    sd: float, n: int, groups: int, width: float, reps: int = 200_000, seed: int = 0
) -> tuple[float, float]:
    """(P(range <= width), mean range) of ``groups`` means of ``n`` normal draws with sd
    ``sd``, from ``reps`` simulated pilots.

    Raises:
        ValueError: ``n`` or ``groups`` below 1 or 2, or a negative ``sd``.

    Example:
        >>> p, mean_range = pass_probability(0.0, 3, 4, 0.07, reps=10)
        >>> p, mean_range
        (1.0, 0.0)
    """
    if n < 1 or groups < 2 or sd < 0:
        raise ValueError(f"need n >= 1, groups >= 2 and sd >= 0 (got {n}, {groups}, {sd})")
    means = np.random.default_rng(seed).normal(0.0, sd / np.sqrt(n), size=(reps, groups))
    ranges = means.max(axis=1) - means.min(axis=1)
    return float((ranges <= width).mean()), float(ranges.mean())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd", type=float, nargs="+", required=True,
                        help="sd of one fine-tuning's checkpoint Dice")
    parser.add_argument("--n", type=int, default=3, help="fine-tunings per value")
    parser.add_argument("--groups", type=int, default=4, help="values whose range is judged")
    parser.add_argument("--width", type=float, default=0.07, help="the largest range that passes")
    parser.add_argument("--reps", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)  # fmt: skip
    for sd in args.sd:
        p, mean_range = pass_probability(sd, args.n, args.groups, args.width, args.reps,
                                         args.seed)  # fmt: skip
        print(json.dumps({"sd": sd, "n": args.n, "groups": args.groups, "width": args.width,
                          "sd_of_a_value": round(sd / args.n**0.5, 4),
                          "mean_range": round(mean_range, 4), "p_pass": round(p, 3),
                          "reps": args.reps, "seed": args.seed}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
