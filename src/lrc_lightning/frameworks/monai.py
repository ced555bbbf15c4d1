"""LRC in MONAI pipelines and with MONAI networks.

Dictionary transforms (usable in ``CacheDataset`` and ``PersistentDataset``: the
deterministic :class:`Superpixelsd` is cached, the random :class:`PairedViewsd` runs per
epoch):

* :class:`Superpixelsd`: Felzenszwalb super-pixels of a channel-first image, per slice
  for volumes; ids >= 0, -1 for suppressed background.
* :class:`PairedViewsd`: two augmented views of a 2D image and its map, moved together
  (image bilinear, map nearest; outside the image the map is -1, never 0, which is a real
  region id); plain ``torch.Tensor`` out (no MetaTensor, whose metadata MoCo's queue and
  ``torch.cat`` of views would carry along).

:class:`MonaiBackbone` lets the reference models (:class:`~lrc_lightning.models.MoCoV2LRC`
and the others) use a MONAI network: the global branch reads its bottleneck, LRC a decoder
level, never the segmentation output. ``UNet``, ``BasicUNet`` and ``SwinUNETR`` are known;
other networks name their layers.

Example:
    >>> import torch
    >>> from monai.networks.nets import BasicUNet
    >>> backbone = MonaiBackbone(BasicUNet(spatial_dims=2, in_channels=1, out_channels=2,
    ...                                    features=(8, 8, 16, 32, 64, 8)))
    >>> backbone.bottleneck_layer, backbone.decoder_layers[-1], backbone.decoder_channels
    ('down_4', 'upcat_1', [32, 16, 8, 8])
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.networks.layers import SkipConnection
from monai.networks.nets import BasicUNet, SwinUNETR, UNet
from monai.transforms import MapTransform, Randomizable
from torch import Tensor, nn

from lrc_lightning.data.transforms import GeometryAugment, IntensityAugment, apply_affine
from lrc_lightning.integrations.layers import dense_candidates, find_feature_layers, format_layers
from lrc_lightning.superpixels.graph import felzenszwalb

__all__ = ["MonaiBackbone", "PairedViewsd", "Superpixelsd"]


def _plain(value: Any) -> Tensor:
    tensor = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


class Superpixelsd(MapTransform):
    """Felzenszwalb super-pixels of ``data[key]`` into ``data[output_key]``.

    Shapes: image (C, H, W) -> map (1, H, W); image (C, H, W, D) (MONAI's volume layout)
    -> map (1, H, W, D), one 2D segmentation per slice along the last axis (ids restart
    per slice: LRC pairs regions within one slice). Channel-first, so MONAI's spatial
    transforms (crops, ``SqueezeDimd``) take the map with the image; resample it with
    ``mode="nearest"`` only, and pad it with -1 (``PairedViewsd`` does both). Channel 0 is
    segmented; intensities should be normalised to [0, 1] first (e.g.
    ``ScaleIntensityRangePercentilesd``).

    Args:
        keys: the image key (one).
        output_key: where the int64 map goes.
        scale, sigma, min_size, background_threshold: see
            :func:`lrc_lightning.superpixels.felzenszwalb`.

    Raises:
        ValueError: more than one key, or an image that is not (C, H, W) / (C, H, W, D).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        output_key: str = "superpixels",
        scale: float = 100.0,
        sigma: float = 0.8,
        min_size: int = 50,
        background_threshold: float | None = None,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"Superpixelsd segments one image key, got {list(self.keys)}")
        self.output_key = output_key
        self.options = {"scale": scale, "sigma": sigma, "min_size": min_size,
                        "background_threshold": background_threshold}  # fmt: skip

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        image = _plain(d[key]).float().numpy()
        if image.ndim == 3:
            maps = felzenszwalb(image[0], **self.options)
        elif image.ndim == 4:
            slices = [
                felzenszwalb(image[0, ..., k], **self.options) for k in range(image.shape[-1])
            ]
            maps = np.stack(slices, axis=-1)
        else:
            raise ValueError(
                f"Superpixelsd: {key!r} must be channel-first (C, H, W) or (C, H, W, D), got "
                f"shape {image.shape}"
            )
        d[self.output_key] = torch.from_numpy(np.ascontiguousarray(maps)).long().unsqueeze(0)
        return d


class PairedViewsd(Randomizable, MapTransform):
    """Two augmented views of a 2D image and its super-pixel map, for LRC.

    Reads ``image_key`` (1, H, W) and ``superpixels_key`` (1, H, W) or (H, W); writes
    ``image_v1``, ``image_v2`` (1, H, W) float32 and ``superpixels_v1``, ``superpixels_v2``
    (H, W) int64 (LRCDataModule's batch keys), as plain tensors. Each view gets its own random crop,
    flip and rotation (one affine map, the same for image and map) and intensity change
    (image only). Randomness follows MONAI's ``set_random_state`` / ``set_determinism``.

    Args:
        image_key, superpixels_key: the inputs.
        geometry, intensity: the augmentations (LRCDataModule's defaults).
        keep_inputs: keep the input keys in the output (default: drop them, so that a
            batch holds tensors of one size only).
    """

    def __init__(
        self,
        image_key: str = "image",
        superpixels_key: str = "superpixels",
        geometry: GeometryAugment | None = None,
        intensity: IntensityAugment | None = None,
        keep_inputs: bool = False,
    ) -> None:
        MapTransform.__init__(self, [image_key, superpixels_key])
        self.image_key, self.superpixels_key = image_key, superpixels_key
        self.geometry = geometry if geometry is not None else GeometryAugment()
        self.intensity = intensity if intensity is not None else IntensityAugment()
        self.keep_inputs = keep_inputs
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = _plain(d[self.image_key]).float()
        maps = _plain(d[self.superpixels_key]).long()
        if maps.ndim == 3 and maps.shape[0] == 1:
            maps = maps[0]
        if image.ndim != 3 or maps.shape != image.shape[1:]:
            raise ValueError(
                f"PairedViewsd needs {self.image_key!r} (1, H, W) and {self.superpixels_key!r} "
                f"(1, H, W) of the same size, got {tuple(image.shape)} and {tuple(maps.shape)} "
                "(for volumes, take a slice first, e.g. RandSpatialCropd + SqueezeDimd)"
            )
        self.randomize()
        generator = torch.Generator().manual_seed(self._seed)
        for view in ("v1", "v2"):
            warped, warped_maps = apply_affine(
                self.geometry.sample(generator), image, {"superpixels": maps}
            )
            d[f"image_{view}"] = self.intensity(warped, generator).contiguous()
            d[f"superpixels_{view}"] = warped_maps["superpixels"].long().contiguous()
        if not self.keep_inputs:
            d.pop(self.image_key)
            d.pop(self.superpixels_key)
        return d


# ---------------------------------------------------------------------- networks
def _unet_layers(network: UNet) -> tuple[str, list[str]]:
    """MONAI UNet nests (down, SkipConnection(inner), up) blocks: the innermost block is the
    bottleneck; each level's ``up`` is a decoder level (the outermost is the output)."""
    path, node, ups = "model", network.model, []
    while (
        isinstance(node, nn.Sequential) and len(node) == 3 and isinstance(node[1], SkipConnection)
    ):
        ups.append(f"{path}.2")
        inner = node[1].submodule
        path = f"{path}.1.submodule"
        node = inner
    return path, list(reversed(ups[1:]))


def _known_layers(network: nn.Module) -> tuple[str, list[str]] | None:
    if isinstance(network, BasicUNet):
        return "down_4", ["upcat_4", "upcat_3", "upcat_2", "upcat_1"]
    if isinstance(network, SwinUNETR):
        return "encoder10", ["decoder5", "decoder4", "decoder3", "decoder2", "decoder1"]
    if isinstance(network, UNet):
        return _unet_layers(network)
    return None


class _Stop(Exception):
    """Ends a forward once the wanted layers have run (no decoder for the key encoder)."""


class MonaiBackbone(nn.Module):
    """A MONAI segmentation network as a backbone of the reference models.

    The global branch gets the bottleneck (spatially averaged), LRC a decoder level
    (``LRCConfig.feature_level``, -1 the finest), both read with forward hooks during one
    forward of the network. When only the global vector is needed (MoCo's key encoder), the
    forward stops after the bottleneck.

    Args:
        network: a MONAI network (``UNet``, ``BasicUNet``, ``SwinUNETR``, 2D or 3D, are
            known) or any network when the layers are given.
        bottleneck_layer: submodule whose output is the bottleneck.
        decoder_layers: decoder submodules, coarse to fine.
        in_channels, spatial_dims, example_size: the dry-run input that reads the layers'
            channels ((2, in_channels, example_size, ...); SwinUNETR needs a multiple of 32).

    Raises:
        ValueError: an unknown network without layers, or a name that is not a submodule
            (the message lists the dense outputs, finest first).
    """

    def __init__(
        self,
        network: nn.Module,
        bottleneck_layer: str | None = None,
        decoder_layers: Sequence[str] | None = None,
        in_channels: int = 1,
        spatial_dims: int = 2,
        example_size: int = 64,
    ) -> None:
        super().__init__()
        self.network = network
        # Read by the segmentation models: a 3D network needs a 3D head.
        self.spatial_dims = spatial_dims
        known = _known_layers(network)
        example = torch.zeros(2, in_channels, *[example_size] * spatial_dims)
        if bottleneck_layer is None or decoder_layers is None:
            if known is None:
                raise ValueError(
                    f"MonaiBackbone does not know {type(network).__name__}: give "
                    "bottleneck_layer='...' and decoder_layers=[... coarse to fine]. Dense "
                    "outputs, finest first:\n"
                    + format_layers(dense_candidates(find_feature_layers(network, example)))
                )
            bottleneck_layer = bottleneck_layer or known[0]
            decoder_layers = decoder_layers if decoder_layers is not None else known[1]
        self.bottleneck_layer = bottleneck_layer
        self.decoder_layers = list(decoder_layers)
        shapes = {layer.name: layer.shape for layer in find_feature_layers(network, example)}
        missing = [n for n in (bottleneck_layer, *self.decoder_layers) if n not in shapes]
        if missing:
            layers = find_feature_layers(network, example)
            raise ValueError(
                f"{type(network).__name__} has no layer(s) {missing} that run in its forward "
                f"(MonaiBackbone bottleneck_layer / decoder_layers). Dense outputs, finest "
                f"first:\n{format_layers(dense_candidates(layers))}"
            )
        self.bottleneck_channels = int(shapes[bottleneck_layer][1])
        self.decoder_channels = [int(shapes[n][1]) for n in self.decoder_layers]

    def _run(self, x: Tensor, wanted: list[str]) -> dict[str, Tensor]:
        """The outputs of the ``wanted`` layers; the forward stops once they have run."""
        outputs: dict[str, Tensor] = {}

        def keep(name: str) -> Any:
            def hook(_: nn.Module, __: Any, output: Any) -> None:
                outputs[name] = output[0] if isinstance(output, (tuple, list)) else output
                if all(n in outputs for n in wanted):
                    raise _Stop

            return hook

        handles = [self.network.get_submodule(n).register_forward_hook(keep(n)) for n in wanted]
        try:
            self.network(x)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return outputs

    def global_and_dense(self, x: Tensor, dense_level: int | None) -> tuple[Tensor, Tensor | None]:
        """(B, C) pooled bottleneck and, unless ``dense_level`` is None, the (B, C', ...)
        features of ``decoder_layers[dense_level]``."""
        wanted = [self.bottleneck_layer]
        if dense_level is not None:
            try:
                wanted.append(self.decoder_layers[dense_level])
            except IndexError:
                raise ValueError(
                    f"feature_level {dense_level} is out of range for "
                    f"{len(self.decoder_layers)} decoder layers {self.decoder_layers}"
                ) from None
        outputs = self._run(x, wanted)
        bottleneck = outputs[self.bottleneck_layer]
        pooled = bottleneck.mean(dim=tuple(range(2, bottleneck.ndim)))
        return pooled, (outputs[wanted[1]] if dense_level is not None else None)

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The bottleneck and every decoder level, coarse to fine (as ``UNet2d``)."""
        outputs = self._run(x, [self.bottleneck_layer, *self.decoder_layers])
        return outputs[self.bottleneck_layer], [outputs[n] for n in self.decoder_layers]

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)
