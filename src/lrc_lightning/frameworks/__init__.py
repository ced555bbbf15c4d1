"""Other frameworks (the guides "Modules you did not write" and "Pre-training nnU-Net's own
network"): MONAI transforms and networks (:mod:`.monai`), the same callback, mixin and data
module for the unified ``lightning`` package (:mod:`.lightning`), and LRC pre-training of
nnU-Net's own network (:mod:`.nnunet`, built on the reference MoCo model). Users import them
from their documented paths ``lrc_lightning.monai``, ``lrc_lightning.lightning`` and
``lrc_lightning.nnunet``."""
