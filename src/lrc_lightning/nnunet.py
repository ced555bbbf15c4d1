"""LRC pre-training of nnU-Net's own network: the documented import path of
:mod:`lrc_lightning.frameworks.nnunet` (``lrc_lightning.nnunet.pretrain(...)``)."""

from lrc_lightning.frameworks.nnunet import *  # noqa: F403
from lrc_lightning.frameworks.nnunet import __all__, pretrain  # noqa: F401
