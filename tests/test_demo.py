"""The README's main command, reduced, and the two integration examples, on shipped data."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import ROOT, require_thirdparty


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_pretrains_exports_finetunes_and_prints_dice(tmp_path: Path) -> None:
    cmd = [sys.executable, "examples/demo.py", "--max-steps", "2", "--size", "64",
           "--width", "4", "--batch-size", "4", "--pretrain-epochs", "1",
           "--finetune-epochs", "1", "--cache-dir", str(tmp_path / "cache"),
           "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = dict(re.findall(r"^\s+(\w+)\s+([0-9.na]+)$", done.stdout, flags=re.M))
    assert set(table) == {"liver", "right_kidney", "left_kidney", "spleen", "mean"}
    assert all(0.0 <= float(v) <= 1.0 for v in table.values() if not math.isnan(float(v)))
    assert (tmp_path / "out" / "backbone.pt").is_file()
    assert len(list((tmp_path / "cache").glob("chaos_t2_*"))) == 4


def test_custom_module_example_adds_lrc(tmp_path: Path, capsys) -> None:
    example = load_example("custom_module")
    example.main(["--steps", "3", "--size", "64", "--width", "8",
                  "--cache-dir", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    values = dict(re.findall(r"(\w+_loss)=([0-9.]+)", out))
    assert set(values) == {"simclr_loss", "lrc_loss"}
    source = (ROOT / "examples" / "custom_module.py").read_text()
    assert source.count("# added") < 15  # the promise in the docs


def test_callback_only_example_adds_lrc(tmp_path: Path, capsys) -> None:
    example = load_example("callback_only")
    example.main(["--steps", "3", "--size", "64", "--width", "8",
                  "--cache-dir", str(tmp_path)])  # fmt: skip
    values = dict(re.findall(r"(\w+_loss)=([0-9.]+)", capsys.readouterr().out))
    assert set(values) == {"byol_loss", "lrc_loss"}
    assert float(values["lrc_loss"]) > 0


def test_monai_pipeline_example_pretrains_a_monai_network(capsys) -> None:
    example = load_example("monai_pipeline")
    example.main(["--steps", "2", "--size", "64"])
    values = dict(re.findall(r"(\w+_loss)=([0-9.]+)", capsys.readouterr().out))
    assert set(values) == {"moco_loss", "lrc_loss"} and float(values["lrc_loss"]) > 0


@pytest.mark.thirdparty
def test_lightly_example_adds_lrc_in_three_lines(tmp_path: Path, capsys, monkeypatch) -> None:
    source = (ROOT / "examples" / "lightly_moco.py").read_text()
    marked = [line for line in source.splitlines() if "# LRC" in line and "``" not in line]
    assert len(marked) == 3  # the promise in its docstring
    # Skips where lightly (torchvision) does not import (the same structure runs in
    # tests/test_foreign_modules.py with LightlyStyleMoCo); fails in .ci/run's second venv.
    require_thirdparty("lightly")
    example = load_example("lightly_moco")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    example.main(["--steps", "2", "--data", str(ROOT / "data" / "chaos-t2-demo")])
    values = dict(re.findall(r"(\w+)=([0-9.]+)", capsys.readouterr().out))
    assert float(values["lrc_loss"]) > 0 and values["extra_forwards"] == "0"
    assert sorted(work.iterdir()) == []  # no cache, checkpoints or logs in the working dir


def test_ci_runs_the_thirdparty_tests_for_real_in_their_own_venv() -> None:
    """.ci/run builds a second venv with a torch/torchvision pair that imports together and
    the `thirdparty` extra, and runs the `thirdparty` tests there, where a missing library
    fails (LRC_REQUIRE_THIRDPARTY=1) and no test collected fails (exit 5)."""
    import configparser

    ci = (ROOT / ".ci" / "run").read_text()
    assert 'torch==2.14.1" "torchvision==0.29.1"' in ci and '-e ".[thirdparty]"' in ci
    assert "LRC_REQUIRE_THIRDPARTY=1 run_pytest -q -m thirdparty tests" in ci
    assert ci.count("run_pytest -q") == 2 and '"$status" -eq 5' in ci
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    extra = setup["options.extras_require"]["thirdparty"]
    assert all(name in extra for name in ("nnunetv2", "lightly", "torchvision", "monai",
                                          "lightning"))
    assert ".venv-thirdparty/" in (ROOT / ".gitignore").read_text()
