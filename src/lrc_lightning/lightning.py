"""The callback, mixin and data module for the unified ``lightning`` package: the documented
import path of :mod:`lrc_lightning.frameworks.lightning`."""

from lrc_lightning.frameworks.lightning import *  # noqa: F403
from lrc_lightning.frameworks.lightning import __all__  # noqa: F401
