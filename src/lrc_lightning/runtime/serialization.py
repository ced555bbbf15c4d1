"""Reading weights and checkpoints without running code from the file.

A ``.ckpt`` or ``.pt`` file is a pickle: unpickled without restriction it can run any
command (a ``__reduce__`` calling ``os.system``). Pre-trained weights are exactly the
files people download and share, so every load in this package goes through
:func:`load_checkpoint`, which uses ``torch.load(weights_only=True)``: tensors, containers,
numbers, strings and the few classes registered as safe (:class:`~lrc_lightning.LRCConfig`;
see :func:`torch.serialization.add_safe_globals`). A file that needs anything else raises
:class:`UnsafeCheckpointError` naming the file and the offending global, and nothing from
the file runs. ``trust_checkpoint=True`` (``--trust-checkpoint`` on the command line) loads
such a file with the unrestricted unpickler: use it only for files you made yourself.

What is and is not trusted: YAML configs with ``class_path`` are code (LightningCLI imports
and instantiates what they name); weight and checkpoint files are data.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "UnsafeCheckpointError",
    "is_weights_only_refusal",
    "load_checkpoint",
    "unsafe_checkpoint_error",
]

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|global (?:'|`)?([\w.]+)")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A weights file needs a global that the safe loader does not allow.

    Attributes:
        path: the file.
        offending_global: the ``module.name`` the file asked for (None if not reported).
    """

    def __init__(self, path: Path, offending_global: str | None, detail: str) -> None:
        self.path = path
        self.offending_global = offending_global
        what = f"the global {offending_global!r}" if offending_global else "a disallowed object"
        super().__init__(
            f"{path}: refused to load: the file needs {what}, which the safe loader "
            "(torch.load(weights_only=True)) does not allow, and unpickling it could run code "
            "from the file. Nothing from the file was run. If you made this file yourself and "
            "trust it, pass trust_checkpoint=True (command line: --trust-checkpoint). "
            f"torch said: {_key_line(detail)}"
        )


def _key_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "?")


def _offending_global(message: str) -> str | None:
    match = _GLOBAL.search(message)
    return next((g for g in match.groups() if g), None) if match else None


def is_weights_only_refusal(err: BaseException) -> bool:
    """Whether ``err`` is torch's refusal of a global under ``weights_only=True``."""
    message = str(err).lower().replace(" ", "_")
    return isinstance(err, pickle.UnpicklingError) and "weights_only" in message


def unsafe_checkpoint_error(path: Path, err: BaseException) -> UnsafeCheckpointError:
    """:class:`UnsafeCheckpointError` for ``path`` from torch's refusal ``err``."""
    return UnsafeCheckpointError(path, _offending_global(str(err)), str(err))


def load_checkpoint(
    path: str | Path, map_location: Any = "cpu", trust_checkpoint: bool = False
) -> Any:
    """``torch.load`` a weights or Lightning checkpoint file without running its code.

    Args:
        path: the file.
        map_location: as :func:`torch.load`.
        trust_checkpoint: unpickle without restriction (runs whatever the file asks for).

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file needs a global the safe loader does not allow.
        ValueError: not a readable PyTorch file (truncated, another format), naming it.

    Example:
        >>> import tempfile, torch
        >>> from lrc_lightning.runtime.serialization import load_checkpoint
        >>> path = tempfile.mkdtemp() + "/w.pt"
        >>> torch.save({"weight": torch.ones(2)}, path)
        >>> load_checkpoint(path)["weight"].tolist()
        [1.0, 1.0]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as err:
        if not trust_checkpoint and is_weights_only_refusal(err):
            raise unsafe_checkpoint_error(path, err) from None
        raise ValueError(f"{path}: not a readable PyTorch file ({err})") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a readable PyTorch file ({err})") from err
