"""Sphinx configuration of the lrc-lightning documentation.

Build: ``make -C docs html`` (warnings are errors) and ``make -C docs doctest``.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# The package under docs/ is the one of this checkout, installed or not.
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(DOCS / "_ext"))

import lrc_lightning  # noqa: E402

project = "lrc-lightning"
author = "lrc-lightning contributors"
copyright = "lrc-lightning contributors, Apache-2.0"
release = lrc_lightning.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "public_docstrings",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "README.md"]
templates_path = ["_templates"]

# Broken cross references are warnings (and -W makes them errors). References to other
# projects' objects cannot resolve here: nothing is downloaded at build time (no
# intersphinx), so only those are ignored; every lrc_lightning reference must resolve.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!lrc_lightning\b).*"),
]

# MyST: ```{directive} fences, heading anchors for links such as README.md#some-heading.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 4

# Google-style docstrings (Args:, Returns:, Raises:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_class_signature = "separated"
autosummary_generate = False

# `make -C docs doctest`: Sphinx runs the ``{doctest}`` blocks of the pages; the ``>>>``
# examples of docstrings need their module's globals, so _ext/docstring_examples.py runs
# them with doctest.testmod (the flags of tests/test_doctests.py) instead of Sphinx.
import doctest  # noqa: E402

doctest_default_flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
doctest_test_doctest_blocks = ""

html_theme = "furo"
html_title = f"lrc-lightning {release}"
html_static_path = []
pygments_style = "sphinx"
