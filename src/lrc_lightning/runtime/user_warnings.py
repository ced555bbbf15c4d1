"""Warnings that point at the user's code, not at the line of this package that raised them.

A warning raised in a callback hook or in the loss is seen through many frames of this
package, Lightning and torch; ``warnings.warn(stacklevel=2)`` would name one of them.
:func:`warn_user` names the first frame outside them: the user's ``trainer.fit(...)`` or
the line of their module that called into LRC. (Python 3.12's ``skip_file_prefixes`` does
the same, but Python 3.10 and 3.11 are supported.)
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

__all__ = ["warn_user"]

#: Packages whose frames are never "the user's code".
_LIBRARIES = ("pytorch_lightning", "lightning", "lightning_fabric", "torch")
# The whole package (this file is in lrc_lightning/runtime/).
_OWN = str(Path(__file__).resolve().parents[1]) + os.sep


def _internal_prefixes() -> tuple[str, ...]:
    prefixes = [_OWN]
    for name in _LIBRARIES:
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if file:
            prefixes.append(str(Path(file).resolve().parent) + os.sep)
    return tuple(prefixes)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first calling frame outside this package,
    Lightning and torch."""
    prefixes = _internal_prefixes()
    frame, level = sys._getframe(1), 2
    while frame is not None:
        filename = frame.f_code.co_filename
        path = str(Path(filename).resolve()) if not filename.startswith("<") else filename
        if not path.startswith(prefixes):
            break
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)
