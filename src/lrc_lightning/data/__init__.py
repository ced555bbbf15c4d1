"""Medical volumes -> cached super-pixels -> paired views (see LRCDataModule)."""

from lrc_lightning.data.cache import PreprocessConfig, VolumeCache
from lrc_lightning.data.cases import Case, DataError, discover_cases
from lrc_lightning.data.datamodule import LRCDataModule
from lrc_lightning.data.intensity import CT_WINDOWS, normalise
from lrc_lightning.data.io import read_volume
from lrc_lightning.data.splits import split_cases

__all__ = [
    "CT_WINDOWS",
    "Case",
    "DataError",
    "LRCDataModule",
    "PreprocessConfig",
    "VolumeCache",
    "discover_cases",
    "normalise",
    "read_volume",
    "split_cases",
]
