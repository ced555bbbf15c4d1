"""The README's main command, reduced: the demo pre-training runs from the shipped data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pretrain_demo_runs_on_shipped_chaos_volumes(tmp_path) -> None:
    cmd = [
        sys.executable,
        "examples/pretrain_demo.py",
        "--epochs",
        "1",
        "--max-steps",
        "4",
        "--size",
        "64",
        "--batch-size",
        "4",
        "--width",
        "8",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lrc_loss=" in done.stdout
    metrics = list((tmp_path / "out").rglob("metrics.csv"))
    assert metrics and "train/lrc_loss_epoch" in metrics[0].read_text().splitlines()[0]
    assert len(list((tmp_path / "cache").glob("chaos_t2_*"))) == 4
