"""The module paths from before the chapter folders, kept importable after the move.

Up to lrc-lightning 0.2.0 every module lay directly under ``lrc_lightning/``; since 0.3.0
each lives in the folder of its chapter (docs/concepts/layout.md). Code, LightningCLI configs
(``class_path``) and pickled checkpoints name classes by module path, so every old path keeps
working through this one table: ``import lrc_lightning.term`` (or ``from lrc_lightning.term
import LRCConfig``) gives the module ``lrc_lightning.objective.term`` itself, the same object,
so ``isinstance`` checks, pickles and monkeypatching agree, and warns once with a
DeprecationWarning naming the new path. Two old module paths are now chapter folders
(``lrc_lightning.distributed``, ``lrc_lightning.superpixels``): a name the folder does not
provide is looked up in the module that moved into it, with the same warning. The documented
entry modules (``lrc_lightning.monai``, ``.lightning``, ``.nnunet``, ``.probe``, ``.cli``)
are not old paths: they stay, as small files of their own, and do not warn.

This module imports nothing of the package: every chapter may use it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["MOVED", "forward_attributes", "install"]

#: Old module path -> the module that holds its code now.
MOVED: dict[str, str] = {
    "lrc_lightning.processes": "lrc_lightning.runtime.processes",
    "lrc_lightning.serialization": "lrc_lightning.runtime.serialization",
    "lrc_lightning.user_warnings": "lrc_lightning.runtime.user_warnings",
    "lrc_lightning.distributed": "lrc_lightning.distributed.collectives",
    "lrc_lightning.sync_batchnorm": "lrc_lightning.distributed.sync_batchnorm",
    "lrc_lightning.batches": "lrc_lightning.objective.batches",
    "lrc_lightning.heads": "lrc_lightning.objective.heads",
    "lrc_lightning.loss": "lrc_lightning.objective.loss",
    "lrc_lightning.regions": "lrc_lightning.objective.regions",
    "lrc_lightning.schedules": "lrc_lightning.objective.schedules",
    "lrc_lightning.term": "lrc_lightning.objective.term",
    "lrc_lightning.superpixels": "lrc_lightning.superpixels.graph",
    "lrc_lightning.callback": "lrc_lightning.integrations.callback",
    "lrc_lightning.layers": "lrc_lightning.integrations.layers",
    "lrc_lightning.mixin": "lrc_lightning.integrations.mixin",
    "lrc_lightning.metrics": "lrc_lightning.models.metrics",
    "lrc_lightning.image_logging": "lrc_lightning.evaluation.image_logging",
    "lrc_lightning.preview": "lrc_lightning.tools.preview",
}

_warned: set[str] = set()


def _warn(old: str, new: str) -> None:
    if old in _warned:
        return
    _warned.add(old)
    # stacklevel 3: past this function and its caller (the loader or a module __getattr__) to
    # the user's import; the import system's own frames are skipped by the warnings module.
    warnings.warn(f"{old} has moved to {new}; import it from there (the old path will be "
                  "removed in a future release)", DeprecationWarning, stacklevel=3)


class _AliasLoader(importlib.abc.Loader):
    """Loads an old path as the module that moved: the import system hands out whatever
    ``sys.modules[name]`` holds once the loader ran, here the new module itself."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # a placeholder, replaced in sys.modules by exec_module

    def exec_module(self, module: ModuleType) -> None:
        target = importlib.import_module(self.new)
        _warn(module.__name__, self.new)
        sys.modules[module.__name__] = target


class _MovedFinder(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: asked only for names that no file provides."""

    def find_spec(self, fullname: str, path: Any = None,
                  target: Any = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None or new.startswith(fullname + "."):
            return None  # not an old path, or one that is now a folder (forward_attributes)
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    """Put the finder of the old paths on ``sys.meta_path`` (once; the package does it)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())


def forward_attributes(package: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: its old submodules as attributes
    (``lrc_lightning.term`` after ``import lrc_lightning``) and, where ``package`` itself is
    an old module path now a folder, the names of the module that moved into it."""

    def __getattr__(name: str) -> Any:
        old = f"{package}.{name}"
        if old in MOVED and not MOVED[old].startswith(old + "."):
            module = importlib.import_module(MOVED[old])
            _warn(old, MOVED[old])
            sys.modules.setdefault(old, module)  # as `import old` would have left it
            return module
        new = MOVED.get(package)
        if new is not None and not name.startswith("__"):
            module = importlib.import_module(new)
            if hasattr(module, name):
                _warn(old, f"{new}.{name}")
                return getattr(module, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
