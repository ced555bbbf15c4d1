"""Run the ``>>>`` examples of every module whose docstrings the API reference shows.

``make -C docs doctest`` runs this after Sphinx's doctest builder, which runs the
``{doctest}`` blocks of the pages. Docstring examples run here, with ``doctest.testmod``,
because they use their module's globals (as ``tests/test_doctests.py`` runs them); this
covers every module the reference documents, also those the test lists leave out.

    python docs/_ext/docstring_examples.py
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    import lrc_lightning

    failed = attempted = 0
    for info in pkgutil.walk_packages(lrc_lightning.__path__, "lrc_lightning."):
        module = importlib.import_module(info.name)
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        if result.attempted:
            print(f"{info.name}: {result.attempted} examples, {result.failed} failed")
        failed += result.failed
        attempted += result.attempted
    print(f"docstring examples: {attempted} run, {failed} failed")
    return 1 if failed or not attempted else 0


if __name__ == "__main__":
    sys.exit(main())
