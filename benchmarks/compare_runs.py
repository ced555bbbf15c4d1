"""Paired differences of one arm between two label-efficiency tables (or within one).

    python benchmarks/compare_runs.py A.json ARM_A B.json ARM_B

Pairs the runs of ``ARM_A`` in table ``A.json`` with those of ``ARM_B`` in ``B.json`` by
(k, seed) (the same labelled patients) and prints ``A - B`` with the seed as the unit: the
per-seed mean over k, then mean, 95% t interval, s.e., sd, seeds won, per k and a whole-seed
bootstrap (``--readout probe``: the linear-probe readout).
Example, the run-to-run noise: LRC alone with lambda 0.3 against LRC
alone with lambda 1, the same recipe up to rounding under Adam:

    python benchmarks/compare_runs.py benchmarks/results/label_efficiency_cpu64.json lrc_only \\
        benchmarks/results/label_efficiency_lambda1.json lrc_only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lrc_lightning.evaluation.statistics import paired_differences, paired_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table_a", type=Path)
    parser.add_argument("arm_a")
    parser.add_argument("table_b", type=Path)
    parser.add_argument("arm_b")
    parser.add_argument("--readout", default="finetune", choices=("finetune", "probe"))
    args = parser.parse_args()
    key = "summary" if args.readout == "finetune" else "probe_summary"
    a = json.loads(args.table_a.read_text()).get(key) or {}
    b = json.loads(args.table_b.read_text()).get(key) or {}
    diff = paired_differences(a, args.arm_a, b, args.arm_b)
    if diff is None:
        parser.exit(2, f"no (k, seed) pair in common between {args.arm_a} in {args.table_a} "
                       f"and {args.arm_b} in {args.table_b}\n")  # fmt: skip
    label = f"{args.table_a.stem}:{args.arm_a} - {args.table_b.stem}:{args.arm_b}"
    print("\n".join(paired_table([(label, diff)])))


if __name__ == "__main__":
    main()
