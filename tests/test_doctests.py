"""The runnable examples in the docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "lrc_lightning.data.transforms",
    "lrc_lightning.evaluation.statistics",
    "lrc_lightning.frameworks.monai",
    "lrc_lightning.integrations.callback",
    "lrc_lightning.integrations.layers",
    "lrc_lightning.models.metrics",
    "lrc_lightning.objective.batches",
    "lrc_lightning.objective.heads",
    "lrc_lightning.objective.term",
    "lrc_lightning.superpixels.graph",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
