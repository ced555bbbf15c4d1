"""Localized Region Contrast (LRC, MICCAI 2023) for PyTorch Lightning."""

from lrc_lightning.batches import KeyPathBatch, LRCInputs, batch_format
from lrc_lightning.callback import LRCCallback
from lrc_lightning.data import LRCDataModule
from lrc_lightning.heads import DenseProjectionHead
from lrc_lightning.layers import find_feature_layers, format_feature_layers, print_feature_layers
from lrc_lightning.loss import LocalizedRegionContrastLoss
from lrc_lightning.mixin import LRCMixin
from lrc_lightning.superpixels import felzenszwalb, felzenszwalb_3d, felzenszwalb_volume
from lrc_lightning.term import LRCConfig

__version__ = "0.2.0"

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
