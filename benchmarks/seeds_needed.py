"""How many seeds would the readout's own noise cost? A projection, not a measurement.

The primary metric of the label-efficiency protocol is, per seed, the mean over k of
(arm A - arm B). If each fine-tuning's score carries independent noise with sd ``--sd``,
and the cell at each k is the mean of ``--repeats`` fine-tunings (1 where not given), the
readout noise alone gives each seed's difference the sd

    sd * sqrt(sum_k (2 / repeats_k)) / len(ks)

and the stopping rule's ``s.e. <= --target-se`` needs at least (that / target)^2 seeds.
Variance between pre-trainings comes on top. With ``--df`` (the degrees of freedom of the
measured sd: its runs - 1) the 95% chi-square interval of the sd, and the seeds it implies,
are printed too.

    python benchmarks/seeds_needed.py --sd 0.077 --df 13 --ks 1 2 4 --repeats 3 1 1
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

from scipy.stats import chi2


def seed_sd(sd: float, repeats: Sequence[int]) -> float:
    """The sd of one seed's mean-over-k paired difference from readout noise alone.

    Raises:
        ValueError: no k, a repeat count below 1, or a negative ``sd``.

    Example:
        >>> round(seed_sd(0.077, [3, 1, 1]), 4)
        0.0554
    """
    if not repeats or min(repeats) < 1 or sd < 0:
        raise ValueError(f"need repeats >= 1 for each k and sd >= 0 (got {list(repeats)}, {sd})")
    return sd * math.sqrt(sum(2 / r for r in repeats)) / len(repeats)


def seeds_needed(sd: float, repeats: Sequence[int], target_se: float, min_seeds: int = 2) -> int:
    """The fewest seeds whose s.e. (``seed_sd / sqrt(n)``) is at most ``target_se``.

    Example:
        >>> seeds_needed(0.077, [3, 1, 1], 0.015)
        14
    """
    if target_se <= 0:
        raise ValueError(f"target_se must be > 0, got {target_se}")
    return max(min_seeds, math.ceil((seed_sd(sd, repeats) / target_se) ** 2))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd", type=float, required=True,
                        help="sd of one fine-tuning's score (same weights, other readout seeds)")
    parser.add_argument("--df", type=int, default=None,
                        help="degrees of freedom of that sd (its runs - 1): adds its interval")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, nargs="+", default=None,
                        help="fine-tunings per cell at each k (default: 1 each)")
    parser.add_argument("--target-se", type=float, default=0.015)
    args = parser.parse_args(argv)  # fmt: skip
    repeats = args.repeats or [1] * len(args.ks)
    if len(repeats) != len(args.ks):
        parser.error(f"--repeats: {len(repeats)} values for {len(args.ks)} --ks")
    out = {"sd": args.sd, "ks": args.ks, "repeats": repeats, "target_se": args.target_se,
           "seed_sd": round(seed_sd(args.sd, repeats), 4),
           "seeds_needed": seeds_needed(args.sd, repeats, args.target_se)}  # fmt: skip
    if args.df:
        low = args.sd * math.sqrt(args.df / chi2.ppf(0.975, args.df))
        high = args.sd * math.sqrt(args.df / chi2.ppf(0.025, args.df))
        out.update(df=args.df, sd_ci95=[round(low, 3), round(high, 3)],
                   seeds_needed_ci95=[seeds_needed(low, repeats, args.target_se),
                                      seeds_needed(high, repeats, args.target_se)])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
