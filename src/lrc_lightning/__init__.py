"""Localized Region Contrast (LRC, MICCAI 2023) for PyTorch Lightning."""

# The façade: it re-exports the public names; no module of the package imports it. The
# folders are the documentation's chapters, each importing only from those below it
# (docs/concepts/layout.md, enforced by tests/test_layout.py).
from lrc_lightning import _moved
from lrc_lightning._version import __version__
from lrc_lightning.data import LRCDataModule
from lrc_lightning.integrations.callback import LRCCallback
from lrc_lightning.integrations.layers import (
    find_feature_layers,
    format_feature_layers,
    print_feature_layers,
)
from lrc_lightning.integrations.mixin import LRCMixin
from lrc_lightning.objective.batches import KeyPathBatch, LRCInputs, batch_format
from lrc_lightning.objective.heads import DenseProjectionHead
from lrc_lightning.objective.loss import LocalizedRegionContrastLoss
from lrc_lightning.objective.term import LRCConfig
from lrc_lightning.superpixels.graph import felzenszwalb, felzenszwalb_3d, felzenszwalb_volume

# The module paths from before the chapter folders (lrc_lightning.term, lrc_lightning.callback,
# ...) keep importing, with a DeprecationWarning: see _moved.py.
_moved.install()
__getattr__ = _moved.forward_attributes(__name__)

__all__ = [
    "DenseProjectionHead",
    "KeyPathBatch",
    "LRCCallback",
    "LRCConfig",
    "LRCDataModule",
    "LRCInputs",
    "LRCMixin",
    "LocalizedRegionContrastLoss",
    "__version__",
    "batch_format",
    "felzenszwalb",
    "felzenszwalb_3d",
    "felzenszwalb_volume",
    "find_feature_layers",
    "format_feature_layers",
    "print_feature_layers",
]
