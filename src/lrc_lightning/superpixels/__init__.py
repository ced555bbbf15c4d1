"""Super-pixels (the concept "Super-pixels"): Felzenszwalb's graph-based segmentation of 2D
slices, per-slice volumes and 3D supervoxels, fast (:mod:`.graph`). Used by the data
pipeline and the MONAI transforms; imports only :mod:`lrc_lightning.runtime`."""

from lrc_lightning import _moved
from lrc_lightning.superpixels.graph import (
    IGNORE_INDEX,
    check_slice_size,
    felzenszwalb,
    felzenszwalb_3d,
    felzenszwalb_volume,
    grid_regions,
    suppress_background,
)

__all__ = [
    "IGNORE_INDEX",
    "check_slice_size",
    "felzenszwalb",
    "felzenszwalb_3d",
    "felzenszwalb_volume",
    "grid_regions",
    "suppress_background",
]

# `lrc_lightning.superpixels` was the module now in .graph: its other names still resolve
# here, with a DeprecationWarning.
__getattr__ = _moved.forward_attributes(__name__)
