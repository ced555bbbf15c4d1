"""LRC pre-training of nnU-Net's own network, for ``nnUNetv2_train -pretrained_weights``.

nnU-Net (nnunetv2, extra ``[nnunet]``) plans a network per dataset and configuration. This
module builds exactly that network with nnU-Net's own code (the trainer class's
``build_network_architecture``, as ``nnUNetv2_train`` does), pre-trains it with MoCo v2 +
LRC on nnU-Net's *preprocessed* data (its normalisation, its target spacing, its patch
size), and writes the file that nnU-Net's ``load_pretrained_weights`` reads::

    nnUNetv2_plan_and_preprocess -d 901 -c 2d
    lrc-lightning nnunet-pretrain --dataset 901 --configuration 2d --out lrc_2d.pth
    nnUNetv2_train 901 2d 0 -pretrained_weights lrc_2d.pth

* :func:`build_nnunet_network`: the network from the plans and ``dataset.json``.
* :class:`NnUNetBackbone`: its bottleneck (the encoder's last stage, pooled: MoCo's global
  branch) and its decoder stages (dense: LRC), for the reference models.
* :class:`NnUNetPretrainViews` / :class:`NnUNetPretrainData`: two views of a patch of a
  preprocessed case (2D slices or 3D patches) with their super-pixel (supervoxel) maps.
* :class:`NnUNetMoCoLRC`: :class:`~lrc_lightning.models.MoCoV2LRC` on that network; its
  checkpoints hold the plans, so they can be exported without the dataset.
  :class:`NnUNetMoCo`: the same without LRC (MoCo v2 alone), the baseline to compare with.
* :func:`export_nnunet_weights`: ``{"network_weights": state_dict}``, every tensor of the
  network (the segmentation layers too, which nnU-Net skips), checked against a network
  built from the plans as nnU-Net checks it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lrc_lightning.models.moco import MoCoV2, MoCoV2LRC
from lrc_lightning.models.weights import _atomic_write
from lrc_lightning.objective.term import LRCConfig
from lrc_lightning.runtime.serialization import load_checkpoint
from lrc_lightning.superpixels.graph import felzenszwalb, felzenszwalb_3d

__all__ = [
    "NETWORK_PREFIX",
    "NnUNetBackbone",
    "NnUNetMoCo",
    "NnUNetMoCoLRC",
    "NnUNetPretrainData",
    "NnUNetPretrainViews",
    "build_nnunet_network",
    "export_nnunet_weights",
    "find_preprocessed_dataset",
    "read_nnunet_setup",
]

#: Where NnUNetMoCoLRC keeps nnU-Net's network in its state dict (the query encoder).
NETWORK_PREFIX = "backbone.network."
#: The layers nnU-Net's load_pretrained_weights does not transfer (its own list).
_SKIPPED_BY_NNUNET = (".seg_layers.",)


def _nnunetv2() -> Any:
    try:
        import nnunetv2
    except ImportError as err:
        raise ImportError(
            "lrc_lightning.nnunet needs nnU-Net: pip install 'lrc-lightning[nnunet]' "
            f"(nnunetv2 did not import: {err})"
        ) from err
    return nnunetv2


# ---------------------------------------------------------------------- plans and network
def find_preprocessed_dataset(dataset: str | Path) -> Path:
    """The preprocessed folder of ``dataset``: a path, or a dataset id (``901``) or name
    (``Dataset901_Chaos``) under ``$nnUNet_preprocessed``.

    Raises:
        FileNotFoundError: no such folder, naming where it was looked for.
    """
    path = Path(dataset)
    if path.is_dir():
        return path
    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        raise FileNotFoundError(
            f"--dataset {dataset}: not a folder, and nnUNet_preprocessed is not set to look "
            "it up by id or name; give the path of the preprocessed dataset "
            "(nnUNet_preprocessed/DatasetXXX_Name)"
        )
    text = str(dataset)
    wanted = re.compile(rf"Dataset{int(text):03d}_.+" if text.isdigit() else re.escape(text))
    found = sorted(p for p in Path(root).glob("Dataset*") if wanted.fullmatch(p.name))
    if len(found) != 1:
        names = sorted(p.name for p in Path(root).glob("Dataset*"))
        raise FileNotFoundError(
            f"--dataset {dataset}: {'no' if not found else 'more than one'} matching folder "
            f"in nnUNet_preprocessed={root} (it holds {names}); run "
            f"nnUNetv2_plan_and_preprocess -d {dataset} first"
        )
    return found[0]


def read_nnunet_setup(
    preprocessed: str | Path, configuration: str, plans_name: str = "nnUNetPlans"
) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """The plans, ``dataset.json`` and preprocessed-data folder of one configuration.

    Raises:
        FileNotFoundError: a file or folder that nnUNetv2_plan_and_preprocess writes is
            missing (the message names it and the command).
        ValueError: the plans have no such configuration (the message lists theirs).
    """
    folder = find_preprocessed_dataset(preprocessed)
    plans_file, dataset_file = folder / f"{plans_name}.json", folder / "dataset.json"
    for file in (plans_file, dataset_file):
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} does not exist: run nnUNetv2_plan_and_preprocess on the dataset "
                f"first (plans {plans_name!r})"
            )
    plans = json.loads(plans_file.read_text())
    dataset_json = json.loads(dataset_file.read_text())
    _nnunetv2()
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    if configuration not in manager.available_configurations:
        raise ValueError(
            f"{plans_file}: no configuration {configuration!r}; the plans have "
            f"{manager.available_configurations}"
        )
    data = folder / manager.get_configuration(configuration).data_identifier
    if not data.is_dir() or not any(data.glob("*.pkl")):
        raise FileNotFoundError(
            f"{data} holds no preprocessed case: run nnUNetv2_plan_and_preprocess -d "
            f"<id> -c {configuration} (or nnUNetv2_preprocess) first"
        )
    return plans, dataset_json, data


def build_nnunet_network(
    plans: Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    configuration: str,
    trainer_class: str = "nnUNetTrainer",
) -> nn.Module:
    """The network ``nnUNetv2_train DATASET CONFIGURATION FOLD -tr trainer_class`` trains:
    built by that trainer class's ``build_network_architecture`` from the plans, with the
    input channels and segmentation heads nnU-Net derives from ``dataset.json`` (deep
    supervision on, as in training; it adds no weights).

    Raises:
        ValueError: an unknown configuration or trainer class.
    """
    nnunetv2 = _nnunetv2()
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(dict(plans))
    if configuration not in manager.available_configurations:
        raise ValueError(
            f"the plans have no configuration {configuration!r}; they have "
            f"{manager.available_configurations}"
        )
    config = manager.get_configuration(configuration)
    trainer = recursive_find_python_class(
        str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"),
        trainer_class,
        "nnunetv2.training.nnUNetTrainer",
    )
    if trainer is None:
        raise ValueError(f"nnU-Net has no trainer class {trainer_class!r} (-tr)")
    heads = manager.get_label_manager(dict(dataset_json)).num_segmentation_heads
    channels = determine_num_input_channels(manager, config, dict(dataset_json))
    return trainer.build_network_architecture(manager, config, channels, heads, True)


class _Stop(Exception):
    """Ends a forward once the wanted decoder stage has run."""


class NnUNetBackbone(nn.Module):
    """nnU-Net's network (``PlainConvUNet``, ``ResidualEncoderUNet``: an ``encoder`` that
    returns its skips and a ``decoder`` with ``stages``) as a backbone of the reference
    models.

    The global branch gets the bottleneck (the encoder's last output, spatially averaged;
    the key encoder runs the encoder only), LRC a decoder stage (``feature_level``, coarse
    to fine: -1 is the finest, at the patch's resolution). The weights stay under
    ``network.``, with nnU-Net's own names.

    Raises:
        TypeError: a network without nnU-Net's encoder/decoder layout.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        encoder, decoder = getattr(network, "encoder", None), getattr(network, "decoder", None)
        channels = getattr(encoder, "output_channels", None)
        if channels is None or not hasattr(decoder, "stages"):
            raise TypeError(
                f"{type(network).__name__} is not laid out as nnU-Net's U-Nets (encoder with "
                "output_channels, decoder with stages); wrap it in "
                "lrc_lightning.monai.MonaiBackbone with its layers named instead"
            )
        self.network = network
        self.bottleneck_channels = int(channels[-1])
        stages = len(decoder.stages)  # type: ignore[union-attr, arg-type]
        #: Decoder stages, coarse to fine (stage s follows the skip of encoder stage -(s+2)).
        self.decoder_layers = [f"decoder.stages.{s}" for s in range(stages)]
        self.decoder_channels = [int(channels[-(s + 2)]) for s in range(stages)]

    def global_and_dense(self, x: Tensor, dense_level: int | None) -> tuple[Tensor, Tensor | None]:
        """(B, C) pooled bottleneck and, unless ``dense_level`` is None, the features of
        decoder stage ``dense_level``."""
        skips = self.network.encoder(x)
        bottleneck = skips[-1]
        pooled = bottleneck.mean(dim=tuple(range(2, bottleneck.ndim)))
        if dense_level is None:
            return pooled, None
        try:
            name = self.decoder_layers[dense_level]
        except IndexError:
            raise ValueError(
                f"feature_level {dense_level} is out of range for nnU-Net's "
                f"{len(self.decoder_layers)} decoder stages"
            ) from None
        found: list[Tensor] = []

        def keep(_: nn.Module, __: Any, output: Tensor) -> None:
            found.append(output)
            raise _Stop

        handle = self.network.get_submodule(name).register_forward_hook(keep)
        try:
            self.network.decoder(skips)
        except _Stop:
            pass
        finally:
            handle.remove()
        return pooled, found[0]

    def forward(self, x: Tensor) -> Any:
        return self.network(x)


# ---------------------------------------------------------------------- data
def _unit_range(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """nnU-Net's z-scored intensities to [0, 1] (0.5/99.5 percentiles of the valid voxels),
    the range the super-pixel scale is tuned for."""
    values = image[valid] if valid.any() else image.ravel()
    lo, hi = np.percentile(values, [0.5, 99.5])
    return np.clip((image - lo) / max(float(hi - lo), 1e-6), 0, 1).astype(np.float32)


def _crop(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """``array[..., start:start+size]`` over the last len(size) axes, padded with ``fill``
    where the window leaves the array."""
    lead = array.shape[: array.ndim - len(size)]
    out = np.full((*lead, *size), fill, dtype=array.dtype)
    src, dst = [], []
    for s, n, full in zip(start, size, array.shape[len(lead) :], strict=True):
        lo, hi = max(s, 0), min(s + n, full)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - s, lo - s + max(0, hi - lo)))
    out[(..., *dst)] = array[(..., *src)]
    return out


class NnUNetPretrainViews(Dataset):
    """Two views of random patches of nnU-Net's preprocessed cases, with super-pixel maps.

    Each item draws a case (and, for a 2D configuration, a slice), a window of
    ``patch_size`` + 1/8, and the super-pixels of channel 0 in that window (2D
    Felzenszwalb, or supervoxels with the configuration's spacing in 3D). Each view is a
    ``patch_size`` crop of the window at its own offset, flipped along each axis with
    probability 1/2 (image and map together) and given its own intensity scale, shift and
    noise, in nnU-Net's normalised units. Padding is 0 in the image, -1 in the map.

    Items: ``image_v1``/``image_v2`` (C, *patch) float32, ``superpixels_v1``/``_v2``
    (*patch) int64, LRCDataModule's keys.

    Args:
        data_folder: nnU-Net's preprocessed folder of one configuration
            (``nnUNet_preprocessed/DatasetXXX/nnUNetPlans_2d``).
        patch_size: the network's input size (the plans' patch size; 2 or 3 values).
        spacing: the configuration's voxel spacing (3D supervoxels use it).
        samples_per_epoch: items per epoch.
        scale, min_size: Felzenszwalb options (:func:`lrc_lightning.felzenszwalb`).
        cases: the case identifiers to pre-train on (default: every preprocessed case), e.g.
            to keep validation or test patients out of pre-training.

    Raises:
        FileNotFoundError: no preprocessed case.
        ValueError: ``cases`` names identifiers the folder does not hold, or none.
    """

    def __init__(
        self,
        data_folder: str | Path,
        patch_size: Sequence[int],
        spacing: Sequence[float] | None = None,
        samples_per_epoch: int = 250,
        scale: float = 100.0,
        min_size: int = 50,
        cases: Sequence[str] | None = None,
    ) -> None:
        _nnunetv2()
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        self.folder = Path(data_folder)
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) not in (2, 3):
            raise ValueError(f"patch_size must have 2 or 3 values, got {self.patch_size}")
        self.spacing = tuple(float(s) for s in spacing) if spacing is not None else None
        self.samples_per_epoch = samples_per_epoch
        self.options = {"scale": scale, "min_size": min_size}
        self.dataset = infer_dataset_class(str(self.folder))(str(self.folder))
        self.identifiers = list(self.dataset.identifiers)
        if not self.identifiers:
            raise FileNotFoundError(f"{self.folder}: no preprocessed case")
        if cases is not None:
            unknown = sorted(set(cases) - set(self.identifiers))
            if unknown or not cases:
                raise ValueError(
                    f"{self.folder}: cases {unknown or '[]'} are not among its preprocessed "
                    f"cases {sorted(self.identifiers)}"
                )
            self.identifiers = [c for c in self.identifiers if c in set(cases)]

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _window(self, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, ...]]:
        """A case's channels (C, *spatial) for one item: a slice in 2D, the volume in 3D."""
        case = self.identifiers[int(rng.integers(len(self.identifiers)))]
        data = self.dataset.load_case(case)[0]  # (C, Z, Y, X), memory-mapped
        if len(self.patch_size) == 2:
            z = int(rng.integers(data.shape[1]))
            image = np.asarray(data[:, z], dtype=np.float32)
        else:
            image = np.asarray(data[:], dtype=np.float32)
        margin = tuple(max(1, p // 8) for p in self.patch_size)
        size = tuple(p + m for p, m in zip(self.patch_size, margin, strict=True))
        start = tuple(
            int(rng.integers(min(0, n - s), max(0, n - s) + 1))
            for n, s in zip(image.shape[1:], size, strict=True)
        )
        valid = _crop(np.ones(image.shape[1:], dtype=bool), start, size, False)
        return np.concatenate([_crop(image, start, size, 0.0), valid[None]]), margin

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        # Seeded from torch's RNG: seed_everything and each worker's seed make it repeatable.
        rng = np.random.default_rng(int(torch.randint(2**31 - 1, ())))
        stacked, margin = self._window(rng)
        image, valid = stacked[:-1], stacked[-1] > 0.5
        unit = _unit_range(image[0], valid)
        if len(self.patch_size) == 2:
            maps = felzenszwalb(unit, **self.options)
        else:
            maps = felzenszwalb_3d(unit, spacing=self.spacing, **self.options)  # type: ignore[arg-type]
        maps = np.where(valid, maps, -1).astype(np.int64)
        item: dict[str, Tensor] = {}
        for view in ("v1", "v2"):
            offset = [int(rng.integers(m + 1)) for m in margin]
            window = tuple(slice(o, o + p) for o, p in zip(offset, self.patch_size, strict=True))
            x, m = image[(slice(None), *window)], maps[window]
            for axis in range(len(self.patch_size)):
                if rng.random() < 0.5:
                    x, m = np.flip(x, axis + 1), np.flip(m, axis)
            x = x * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
            x = x + rng.normal(0.0, 0.05, size=x.shape)
            item[f"image_{view}"] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            item[f"superpixels_{view}"] = torch.from_numpy(np.ascontiguousarray(m))
        return item


class NnUNetPretrainData(pl.LightningDataModule):
    """:class:`NnUNetPretrainViews` of one configuration of a preprocessed dataset.

    Args:
        preprocessed: the preprocessed dataset (path, or id/name under
            ``$nnUNet_preprocessed``).
        configuration: ``2d``, ``3d_fullres``, ... (a configuration of the plans).
        batch_size, patch_size: the plans' values when None.
        samples_per_epoch, num_workers: loading.
        plans_name: nnU-Net's plans identifier (``-p``).
        cases: the case identifiers to pre-train on (default: all; see
            :class:`NnUNetPretrainViews`).
    """

    def __init__(
        self,
        preprocessed: str | Path,
        configuration: str = "2d",
        batch_size: int | None = None,
        patch_size: Sequence[int] | None = None,
        samples_per_epoch: int = 250,
        num_workers: int = 0,
        plans_name: str = "nnUNetPlans",
        cases: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.plans, self.dataset_json, self.data_folder = read_nnunet_setup(
            preprocessed, configuration, plans_name
        )
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        config = PlansManager(self.plans).get_configuration(configuration)
        self.configuration = configuration
        self.batch_size = int(batch_size or config.batch_size)
        self.patch_size = tuple(patch_size or config.patch_size)
        if len(self.patch_size) != len(config.patch_size):
            raise ValueError(
                f"patch_size {self.patch_size} has {len(self.patch_size)} values; the "
                f"{configuration!r} configuration is {len(config.patch_size)}D"
            )
        self.views = NnUNetPretrainViews(self.data_folder, self.patch_size, config.spacing,
                                         samples_per_epoch, cases=cases)  # fmt: skip
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of paired views (the last one dropped when several fit)."""
        return DataLoader(self.views, batch_size=self.batch_size, num_workers=self.num_workers,
                          drop_last=len(self.views) >= 2 * self.batch_size,
                          persistent_workers=self.num_workers > 0)  # fmt: skip


# ---------------------------------------------------------------------- model and export
class NnUNetMoCoLRC(MoCoV2LRC):
    """MoCo v2 + LRC on the network nnU-Net builds from ``plans`` (:class:`NnUNetBackbone`).

    The plans, ``dataset.json``, configuration and trainer class are hyper-parameters, so a
    checkpoint rebuilds the network, and :func:`export_nnunet_weights` checks it, without
    the dataset. nnU-Net normalises with InstanceNorm: the key encoder needs no shuffle-BN
    (``key_bn_groups=1``).

    Args:
        plans, dataset_json: the preprocessed dataset's ``nnUNetPlans.json`` and
            ``dataset.json`` (as dicts).
        configuration, trainer_class: as ``nnUNetv2_train``'s CONFIGURATION and ``-tr``.
        lrc: LRC options; ``feature_level`` picks the decoder stage (-1: the finest).
        **moco_kwargs: :class:`~lrc_lightning.models.MoCoV2` options.
    """

    def __init__(
        self,
        plans: dict[str, Any],
        dataset_json: dict[str, Any],
        configuration: str = "2d",
        trainer_class: str = "nnUNetTrainer",
        lrc: LRCConfig | None = None,
        **moco_kwargs: Any,
    ) -> None:
        backbone = _nnunet_moco_backbone(plans, dataset_json, configuration, trainer_class,
                                         moco_kwargs)  # fmt: skip
        super().__init__(backbone=backbone, lrc=lrc, **moco_kwargs)


class NnUNetMoCo(MoCoV2):
    """MoCo v2 alone on the network nnU-Net builds from ``plans``: the baseline that
    :class:`NnUNetMoCoLRC` is compared with (only the encoder trains; the decoder keeps
    nnU-Net's initialisation). Its checkpoints hold the plans like NnUNetMoCoLRC's, so
    :func:`export_nnunet_weights` writes them the same way.

    Args:
        plans, dataset_json, configuration, trainer_class: as :class:`NnUNetMoCoLRC`.
        **moco_kwargs: :class:`~lrc_lightning.models.MoCoV2` options.
    """

    def __init__(
        self,
        plans: dict[str, Any],
        dataset_json: dict[str, Any],
        configuration: str = "2d",
        trainer_class: str = "nnUNetTrainer",
        **moco_kwargs: Any,
    ) -> None:
        backbone = _nnunet_moco_backbone(plans, dataset_json, configuration, trainer_class,
                                         moco_kwargs)  # fmt: skip
        super().__init__(backbone=backbone, **moco_kwargs)


def _nnunet_moco_backbone(
    plans: dict[str, Any],
    dataset_json: dict[str, Any],
    configuration: str,
    trainer_class: str,
    moco_kwargs: dict[str, Any],
) -> NnUNetBackbone:
    """The network nnU-Net builds, wrapped for MoCo; sets MoCo's default of one key-BN group
    (nnU-Net normalises with InstanceNorm: there is no shuffle-BN to do)."""
    moco_kwargs.setdefault("key_bn_groups", 1)
    return NnUNetBackbone(build_nnunet_network(plans, dataset_json, configuration, trainer_class))


def _compatible(state: Mapping[str, Tensor], network: nn.Module) -> list[str]:
    """What nnU-Net's load_pretrained_weights would refuse: every key of the network but
    the segmentation layers must be in ``state`` with the same shape."""
    problems = []
    for key, value in network.state_dict().items():
        if any(skip in key for skip in _SKIPPED_BY_NNUNET):
            continue
        if key not in state:
            problems.append(f"{key} missing")
        elif tuple(state[key].shape) != tuple(value.shape):
            problems.append(f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}")
    return problems


def export_nnunet_weights(
    checkpoint: str | Path, output: str | Path, trust_checkpoint: bool = False
) -> Path:
    """Write the pre-trained nnU-Net network of a :class:`NnUNetMoCoLRC` checkpoint as the
    file ``nnUNetv2_train ... -pretrained_weights FILE`` loads: ``{"network_weights":
    state_dict}`` with nnU-Net's own key names.

    The weights are checked against a network built from the plans the checkpoint holds,
    as nnU-Net's ``load_pretrained_weights`` checks them (every key but ``.seg_layers.``,
    same shape), so a file that nnU-Net would refuse is never written.

    Raises:
        ValueError: not a checkpoint of :class:`NnUNetMoCoLRC` (or :class:`NnUNetMoCo`),
            or weights that do not fit the plans' network (the message names the keys).
    """
    saved = load_checkpoint(checkpoint, trust_checkpoint=trust_checkpoint)
    full = saved.get("state_dict", {}) if isinstance(saved, Mapping) else {}
    state = {k[len(NETWORK_PREFIX) :]: v for k, v in full.items() if k.startswith(NETWORK_PREFIX)}
    hparams = saved.get("hyper_parameters", {}) if isinstance(saved, Mapping) else {}
    if not state or "plans" not in hparams:
        raise ValueError(
            f"{checkpoint}: not a checkpoint of lrc_lightning.nnunet.NnUNetMoCoLRC or "
            f"NnUNetMoCo (no {NETWORK_PREFIX!r} weights with nnU-Net plans); pre-train with "
            "`lrc-lightning nnunet-pretrain`"
        )
    network = build_nnunet_network(hparams["plans"], hparams["dataset_json"],
                                   hparams["configuration"], hparams["trainer_class"])  # fmt: skip
    problems = _compatible(state, network)
    if problems:
        raise ValueError(
            f"{checkpoint}: the weights do not fit the network nnU-Net builds from the "
            f"checkpoint's plans ({len(problems)} problem(s): {problems[:6]})"
        )
    weights = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    output = Path(output)
    _atomic_write(output, lambda tmp: torch.save({"network_weights": weights}, tmp))
    return output


def pretrain(
    preprocessed: str | Path,
    configuration: str,
    output: str | Path,
    work_dir: str | Path | None = None,
    max_steps: int = 1000,
    batch_size: int | None = None,
    patch_size: Sequence[int] | None = None,
    samples_per_epoch: int = 250,
    num_workers: int = 0,
    lrc: LRCConfig | None = None,
    plans_name: str = "nnUNetPlans",
    trainer_class: str = "nnUNetTrainer",
    seed: int = 0,
    trainer_options: Mapping[str, Any] | None = None,
    baseline: bool = False,
    cases: Sequence[str] | None = None,
    **moco_kwargs: Any,
) -> Path:
    """Pre-train nnU-Net's network of ``configuration`` with MoCo v2 + LRC (with
    ``baseline``: MoCo v2 alone, :class:`NnUNetMoCo`; ``lrc`` is then unused) on the
    preprocessed dataset and write ``output`` for ``nnUNetv2_train -pretrained_weights``.

    The Lightning checkpoint (``last.ckpt``, resumable, exportable again with
    ``lrc-lightning export --format nnunet``) goes to ``work_dir`` (default: beside
    ``output``, ``<output>.run``). ``cases`` limits pre-training to those case identifiers
    (default: every preprocessed case).

    Returns:
        ``output``.
    """
    from pytorch_lightning.callbacks import ModelCheckpoint

    pl.seed_everything(seed, workers=True)
    data = NnUNetPretrainData(preprocessed, configuration, batch_size, patch_size,
                              samples_per_epoch, num_workers, plans_name, cases)  # fmt: skip
    model: MoCoV2
    if baseline:
        model = NnUNetMoCo(data.plans, data.dataset_json, configuration, trainer_class,
                           **moco_kwargs)  # fmt: skip
    else:
        model = NnUNetMoCoLRC(data.plans, data.dataset_json, configuration, trainer_class, lrc,
                              **moco_kwargs)  # fmt: skip
    output = Path(output)
    work = Path(work_dir) if work_dir is not None else output.with_name(output.name + ".run")
    checkpoints = ModelCheckpoint(dirpath=work, save_last=True, save_top_k=0)
    options = {"logger": False, "log_every_n_steps": 1, **(trainer_options or {})}
    callbacks = [checkpoints, *(options.pop("callbacks", None) or [])]  # the caller's too
    trainer = pl.Trainer(max_steps=max_steps, default_root_dir=work, callbacks=callbacks,
                         **options)  # fmt: skip
    trainer.fit(model, data)
    last = work / "last.ckpt"
    trainer.save_checkpoint(last)  # also when max_steps ends inside an epoch
    return export_nnunet_weights(last, output)
