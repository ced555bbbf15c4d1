"""Label efficiency on CHAOS T2 from the repository: ``lrc-lightning benchmark`` with the
repository's defaults (data beside the checkout, tables in ``benchmarks/results``).

    python benchmarks/label_efficiency.py --data ../shared/data/chaos-t2 [--size 128]
        [--width 8] [--pretrain-steps 250] [--finetune-steps 150] [--seeds 0 1 2]
        [--ks 1 2 4] [--arms random moco moco_lrc lrc_only supervised_lrc] [--ablations]
        [--noise-floor] [--lrc-weight 0.3] [--precision bf16-mixed] [--report-only]

Every option: ``python benchmarks/label_efficiency.py --help``; the protocol:
:mod:`lrc_lightning.evaluation.label_efficiency`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lrc_lightning.evaluation.label_efficiency import main

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    sys.exit(
        main(
            defaults={
                "data": str(ROOT.parent / "shared" / "data" / "chaos-t2"),
                "out": str(ROOT / "benchmarks" / "results"),
            }
        )
    )
