"""LRC in MONAI pipelines and with MONAI networks: the documented import path of
:mod:`lrc_lightning.frameworks.monai` (``from lrc_lightning.monai import Superpixelsd``)."""

from lrc_lightning.frameworks.monai import *  # noqa: F403
from lrc_lightning.frameworks.monai import __all__  # noqa: F401
