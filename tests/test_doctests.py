"""The runnable examples in the docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "lrc_lightning.batches",
    "lrc_lightning.callback",
    "lrc_lightning.data.transforms",
    "lrc_lightning.evaluation.statistics",
    "lrc_lightning.heads",
    "lrc_lightning.layers",
    "lrc_lightning.metrics",
    "lrc_lightning.monai",
    "lrc_lightning.superpixels",
    "lrc_lightning.term",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
