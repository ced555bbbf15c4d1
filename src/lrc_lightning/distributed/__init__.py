"""Distributed training: autograd-aware all-gather and all-reduce for negatives from every
rank (:mod:`.collectives`) and BatchNorm statistics over all processes on any device, CPU
and gloo included (:mod:`.sync_batchnorm`; the guide "Multi-GPU, multi-node and SLURM").
Imports only :mod:`lrc_lightning.runtime`."""

from lrc_lightning import _moved

# `lrc_lightning.distributed` was the module now in .collectives: its names still resolve
# here, with a DeprecationWarning.
__getattr__ = _moved.forward_attributes(__name__)
