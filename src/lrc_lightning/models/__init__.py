"""Reference models: UNet2d, MoCo v2 (+ LRC), supervised segmentation (+ LRC), fine-tuning.

The chapter also holds what they need: backbones' features, optimisers, weight export and
loading (:mod:`.weights`) and the Dice metric and loss (:mod:`.metrics`), which the
segmentation models score with. Imports the integrations and everything below them.
"""

from lrc_lightning.models.moco import MoCoStepOutput, MoCoV2, MoCoV2LRC
from lrc_lightning.models.segmentation import (
    FineTuneSegmentation,
    SupervisedSegmentation,
    SupervisedSegmentationLRC,
)
from lrc_lightning.models.unet import UNet2d, UNet3d
from lrc_lightning.models.weights import (
    export_backbone,
    load_backbone_weights,
    read_backbone_state,
)

__all__ = [
    "FineTuneSegmentation",
    "MoCoStepOutput",
    "MoCoV2",
    "MoCoV2LRC",
    "SupervisedSegmentation",
    "SupervisedSegmentationLRC",
    "UNet2d",
    "UNet3d",
    "export_backbone",
    "load_backbone_weights",
    "read_backbone_state",
]
