"""Online segmentation probe: the documented import path of
:mod:`lrc_lightning.evaluation.probe` (``class_path: lrc_lightning.probe.SegmentationProbe``
in the example configs)."""

from lrc_lightning.evaluation.probe import *  # noqa: F403
from lrc_lightning.evaluation.probe import __all__  # noqa: F401
