"""Cache writers that die or fail the way real runs do (for tests/test_fault_tolerance.py).

    python tests/cache_worker.py CACHE_DIR kill BYTES   # killed by SIGXFSZ writing an entry
    python tests/cache_worker.py CACHE_DIR limit BYTES  # a write fails (EFBIG: a full disk)
    python tests/cache_worker.py CACHE_DIR hold BYTES   # pool workers started, parent blocks

``kill`` and ``limit`` run under RLIMIT_FSIZE = BYTES (a real OS file-size limit: writes past it
fail like writes to a full disk); ``kill`` restores SIGXFSZ's default action (Python
ignores it), so the kernel kills the process in the middle of ``np.save``. ``hold`` prints
"writing" from the pool's write callback, then sleeps: the test SIGKILLs it there.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np

from lrc_lightning.data import PreprocessConfig, VolumeCache, discover_cases
from lrc_lightning.data.cases import Case
from lrc_lightning.data.precompute import precompute_in_pool
from lrc_lightning.data.preprocess import superpixels_of_slices

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT / "data" / "totalseg-ct-demo" / "example_ct_sm.nii.gz"


def main() -> int:
    cache_dir, mode, limit = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    config = PreprocessConfig(modality="ct", image_size=122)
    if mode == "hold":
        def write(case: Case, arrays: dict) -> None:
            print("writing", flush=True)
            time.sleep(600)

        cases = discover_cases(ROOT / "data" / "chaos-t2-demo")[:2]
        precompute_in_pool(cases, PreprocessConfig(image_size=64), 2, write, lambda: None)
        return 0
    superpixels_of_slices(np.zeros((1, 8, 8), np.float32), config)  # numba loaded first
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if mode == "kill":
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        VolumeCache(cache_dir, config).prepare([Case("ct", CT)], progress=False)
    except OSError as err:
        print(json.dumps({"type": type(err).__name__, "message": str(err)}))
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
