"""Worker processes that end with their parent.

A process pool's workers wait on its queue; when the parent is SIGKILLed (the OOM killer,
a job scheduler) nothing tells them, and each one keeps its memory for ever. Every pool of
the package starts its workers with :func:`die_with_parent`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def die_with_parent(parent: int) -> None:
    """Pool initializer: end this worker when process ``parent`` dies.

    On Linux the kernel sends SIGKILL at the parent's death (``prctl(PR_SET_PDEATHSIG)``;
    it fires when the thread that started the worker ends, here the one that runs the
    pool's ``with`` block); elsewhere a daemon thread polls ``os.getppid()``. Without
    this, workers waiting on the pool's queue outlive a SIGKILLed or OOM-killed parent.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent:  # died before the prctl
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
