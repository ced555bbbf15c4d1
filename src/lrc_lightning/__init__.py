"""Localized Region Contrast (LRC, MICCAI 2023) for PyTorch Lightning."""

from lrc_lightning.callback import LRCCallback
from lrc_lightning.data import LRCDataModule
from lrc_lightning.heads import DenseProjectionHead
from lrc_lightning.loss import LocalizedRegionContrastLoss
from lrc_lightning.mixin import LRCConfig, LRCMixin
from lrc_lightning.superpixels import felzenszwalb, felzenszwalb_volume

__version__ = "0.1.0"

__all__ = [
    "DenseProjectionHead",
    "LRCCallback",
    "LRCConfig",
    "LRCDataModule",
    "LRCMixin",
    "LocalizedRegionContrastLoss",
    "__version__",
    "felzenszwalb",
    "felzenszwalb_volume",
]
