"""Reference models: UNet2d, MoCo v2 (+ LRC), supervised segmentation (+ LRC), fine-tuning."""

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
