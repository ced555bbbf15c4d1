"""Shared fixtures: real images shipped in the repo and the optional ../shared data."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_MR = ROOT / "data" / "chaos-t2-demo"
DEMO_CT = ROOT / "data" / "totalseg-ct-demo"
SHARED = ROOT.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the full data sets beside the checkout); not present here")
    return path


#: Set by .ci/run in its third-party venv: there a library that does not import is a failure.
REQUIRE_THIRDPARTY = os.environ.get("LRC_REQUIRE_THIRDPARTY") == "1"


def require_thirdparty(name: str) -> ModuleType:
    """Import a third-party library for a ``thirdparty`` test: skip without it, except in
    .ci/run's third-party venv (LRC_REQUIRE_THIRDPARTY=1), where the test must run."""
    try:
        return importlib.import_module(name)
    except Exception as err:  # lightly imports torchvision, which may not import with torch
        message = f"{name} does not import here ({type(err).__name__}: {err})"
        if REQUIRE_THIRDPARTY:
            pytest.fail(message + "; LRC_REQUIRE_THIRDPARTY=1 says it must", pytrace=False)
        pytest.skip(message + "; .ci/run runs this test in its third-party venv")


@pytest.fixture(scope="session")
def mr_volume() -> np.ndarray:
    """(D, 256, 256) CHAOS T2 volume of patient 001, percentile-normalised to [0, 1]."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(DEMO_MR / "imagesTr" / "chaos_t2_001.nii.gz")))
    arr = arr.astype(np.float32)
    lo, hi = np.percentile(arr, [0.5, 99.5])
    return np.clip((arr - lo) / (hi - lo), 0, 1).astype(np.float32)


@pytest.fixture(scope="session")
def mr_slices(mr_volume: np.ndarray) -> np.ndarray:
    return mr_volume[[10, 18, 25]]
