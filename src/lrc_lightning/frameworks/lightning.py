"""The same callback, mixin and data module for the unified ``lightning`` package.

A ``lightning.pytorch.Trainer`` accepts only ``lightning.pytorch`` callbacks and data
modules. Import LRC from here in such a project, and it never mixes the two namespaces::

    import lightning.pytorch as L
    from lrc_lightning.lightning import LRCCallback, LRCDataModule, LRCMixin

    trainer = L.Trainer(callbacks=[LRCCallback(feature_layer="backbone.6")])
    trainer.fit(model, datamodule=LRCDataModule("data/chaos-t2-demo", image_size=128))

The classes share their implementation (and checkpoint state keys) with the top-level
``lrc_lightning`` ones, which are built on ``pytorch_lightning``. ``LRCMixin`` imports
neither package and is the same class in both.
"""

from __future__ import annotations

try:
    import lightning.pytorch as L
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lrc_lightning.lightning needs the unified `lightning` package "
        "(pip install lightning); with `pytorch_lightning` import from lrc_lightning"
    ) from err

from lightning.pytorch.utilities.model_helpers import is_overridden

from lrc_lightning.data.datamodule import LRCDataModuleBase
from lrc_lightning.integrations.callback import LRCCallbackBase
from lrc_lightning.integrations.mixin import LRCMixin
from lrc_lightning.objective.term import LRCConfig

__all__ = ["LRCCallback", "LRCConfig", "LRCDataModule", "LRCMixin"]


class LRCCallback(LRCCallbackBase, L.Callback):
    __doc__ = LRCCallbackBase.__doc__


class LRCDataModule(LRCDataModuleBase, L.LightningDataModule):
    __doc__ = LRCDataModuleBase.__doc__
    _is_overridden = staticmethod(is_overridden)
