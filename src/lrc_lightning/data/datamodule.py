"""LRCDataModule: medical volumes in, cached super-pixels and aligned paired views out."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, default_collate

from lrc_lightning.data.cache import CachedVolume, PreprocessConfig, VolumeCache
from lrc_lightning.data.cases import Case, DataError, discover_cases, read_json
from lrc_lightning.data.datasets import (
    SAGITTAL_AXIS,
    LabelledSlices,
    PairedViewSlices,
    Volumes,
    foreground_sampler,
    sagittal_mirror_error,
)
from lrc_lightning.data.device_batches import DeviceBatches
from lrc_lightning.data.intensity import Modality
from lrc_lightning.data.patches import (
    LabelledPatches,
    PairedViewPatches,
    PatchSampling,
    VolumeAugment,
)
from lrc_lightning.data.preprocess import RegionMethod
from lrc_lightning.data.splits import Split, check_evaluation_labels, split_cases
from lrc_lightning.data.transforms import GeometryAugment, IntensityAugment, MirrorLabels
from lrc_lightning.objective.batches import BATCH_FORMATS, BatchFormat, BatchFormatName
from lrc_lightning.objective.batches import batch_format as resolve_batch_format

__all__ = ["LRCDataModule", "LRCDataModuleBase"]


def _declared_labels(data: Any) -> tuple[int, ...] | None:
    if isinstance(data, (list, tuple)):
        return None
    path = Path(data)
    if path.is_dir():
        path = path / "dataset.json"
    if path.suffix == ".json" and path.is_file():
        labels = read_json(path).get("labels")
        if isinstance(labels, dict):
            try:
                return tuple(sorted(int(k) for k in labels))
            except ValueError as err:
                raise DataError(f"{path}: 'labels' keys must be integers ({err})") from err
    return None


def _label_names(data: Any) -> dict[str, int]:
    """Label name -> value from dataset.json's ``labels`` ({} without one)."""
    if data is None or isinstance(data, (list, tuple)):
        return {}
    path = Path(data)
    path = path / "dataset.json" if path.is_dir() else path
    if path.suffix != ".json" or not path.is_file():
        return {}
    labels = read_json(path).get("labels")
    return {str(v): int(k) for k, v in labels.items()} if isinstance(labels, dict) else {}


def mirror_label_pairs(
    pairs: Sequence[Sequence[str | int]] | Mapping[str | int, str | int] | None,
    data: Any = None,
) -> MirrorLabels | None:
    """:class:`MirrorLabels` from pairs of label names (dataset.json's ``labels``) or values.

    Raises:
        ValueError: a name that dataset.json does not declare (the known names are listed),
            or a malformed pair.
    """
    if not pairs:
        return None
    if isinstance(pairs, Mapping):  # {"right_kidney": "left_kidney"} or {2: 3}
        pairs = list(pairs.items())
    names = _label_names(data)
    resolved = []
    for pair in pairs:
        if isinstance(pair, (str, int)) or len(pair) != 2:
            raise ValueError(f"mirror_labels takes pairs such as ('right_kidney', "
                             f"'left_kidney') or (2, 3), got {pair!r}")  # fmt: skip
        values = []
        for item in pair:
            if isinstance(item, str) and not item.lstrip("-").isdigit():
                if item not in names:
                    known = sorted(names, key=names.__getitem__) or "none (give values)"
                    raise ValueError(f"mirror_labels: unknown label name {item!r}; the "
                                     f"declared names are {known}")  # fmt: skip
                values.append(names[item])
            else:
                values.append(int(item))
        resolved.append((values[0], values[1]))
    return MirrorLabels(tuple(resolved))


#: The keys of the super-pixel maps in the dict batch.
_MAP_KEYS = ("superpixels_v1", "superpixels_v2")
#: The keys of the images in the dict batches (pre-training, fine-tuning, whole volumes).
_IMAGE_KEYS = ("image", "image_v1", "image_v2")
#: This data module's checkpoint state: what a fit with LRCCallback needs to resume.
_CALLBACK_STATE = "lrc_callback"


def _repeat_channels(batch: dict[str, Any], channels: int, dim: int = 1) -> dict[str, Any]:
    """``batch`` with the one channel (axis ``dim``) of each image repeated ``channels``
    times: identical copies, for a backbone that expects RGB input. Maps and labels are
    left as they are."""
    if channels == 1:
        return batch
    return {k: v.repeat_interleave(channels, dim=dim) if k in _IMAGE_KEYS else v
            for k, v in batch.items()}  # fmt: skip


def _pack(fmt: BatchFormat, batch: dict[str, Any], superpixels: bool) -> Any:
    """The dict batch in ``fmt``'s structure; without ``superpixels``, the structure the
    module's own step takes (no maps: a baseline run without LRC)."""
    if superpixels:
        return fmt.pack(batch)
    batch = {k: v for k, v in batch.items() if k not in _MAP_KEYS}
    if fmt.name == "dict":
        return batch
    # The tuple formats append the maps last; module_batch() cuts them (None here) off.
    return fmt.module_batch(fmt.pack({**batch, **dict.fromkeys(_MAP_KEYS)}))


class _PackedCollate:
    """Collates items into the dict batch, repeats its images' channel ``channels`` times
    (axis ``channel_dim`` of the batch), then builds the requested batch structure (a class,
    not a closure, so that loader workers can pickle it)."""

    def __init__(
        self, fmt: BatchFormat, superpixels: bool = True, channels: int = 1, channel_dim: int = 1
    ) -> None:
        self.fmt, self.superpixels = fmt, superpixels
        self.channels, self.channel_dim = channels, channel_dim

    def __call__(self, items: list[Any]) -> Any:
        batch = _repeat_channels(default_collate(items), self.channels, self.channel_dim)
        return _pack(self.fmt, batch, self.superpixels)


class _PackedBatches:
    """Device batches in the requested batch structure."""

    def __init__(self, batches: DeviceBatches, fmt: BatchFormat, superpixels: bool = True) -> None:
        self.batches, self.fmt, self.superpixels = batches, fmt, superpixels

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        return (_pack(self.fmt, batch, self.superpixels) for batch in self.batches)


class _LoaderIfModuleSteps:
    """A data-loader method that Lightning sees as not defined while the attached module has
    no ``step`` (``validation_step``): Lightning tells whether a data module has a validation
    loader from whether its method is overridden, not from what it returns, and otherwise
    warns on every fit of such a module ("You passed in a `val_dataloader` but have no
    `validation_step`"). Without an attached module (called by hand) it is the method."""

    def __init__(self, step: str, method: Callable[..., Any]) -> None:
        self.step, self.method = step, method
        self.__doc__ = method.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type) -> Any:
        if instance is None:
            return self.method
        bound = self.method.__get__(instance, owner)
        if not instance._module_lacks(self.step):
            return bound
        base = next((vars(cls)[self.name] for cls in type(instance).__mro__
                     if not isinstance(vars(cls).get(self.name, self), _LoaderIfModuleSteps)),
                    None)  # fmt: skip
        if base is None:
            return bound

        def loader() -> Any:
            return bound()

        # is_overridden() follows __wrapped__: it sees the Lightning base class's own method
        # (not overridden), while a call (a user's callback) still gets the loader.
        loader.__wrapped__ = base  # type: ignore[attr-defined]
        loader.__doc__ = bound.__doc__
        return loader


class LRCDataModuleBase:
    """Reads CT/MR volumes, precomputes Felzenszwalb super-pixels into a cache, serves batches.

    (The Lightning-free implementation; :class:`LRCDataModule` is it on
    ``pytorch_lightning``, ``lrc_lightning.lightning.LRCDataModule`` on
    ``lightning.pytorch``.)

    ``mode="pretrain"``: training batches hold ``image_v1``, ``image_v2`` (B, 1, H, W),
    ``superpixels_v1``, ``superpixels_v2`` (B, H, W) int64 (and ``label_v1``/``label_v2``
    with ``pretrain_with_labels``), from every case except validation and test cases.
    ``mode="finetune"``: ``image`` (B, 1, H, W) and ``label`` (B, H, W) from the labelled
    cases. Validation and test: one whole volume per batch (``image`` (1, S, 1, H, W),
    ``label`` (1, S, H, W)) for 3D Dice. With ``channels=C`` every image has C channels
    instead of 1.

    Args:
        data: MSD ``dataset.json`` or its folder, a CSV, a folder of volumes / DICOM series,
            or a list of paths (see :func:`lrc_lightning.data.cases.discover_cases`).
        cache_dir: where the super-pixel cache lives (shared by all ranks of a node; put it
            on a shared filesystem for several nodes).
        modality, ct_window, mr_percentiles: intensity normalisation.
        image_size: square output side: slices are scaled so that their longer side fits
            and padded (image 0, super-pixels -1, labels ignored), keeping the aspect
            ratio. None keeps each file's size (then all training cases must share it).
        spacing: in-plane target spacing (rows, columns) in mm, resampled before
            ``image_size`` (as nnU-Net does); None keeps each file's spacing.
        slice_axis: ``"auto"``: slice along the acquisition plane (the through-plane axis of
            the voxel grid: largest spacing, ties by fewest voxels); or 0, 1, 2 of the
            LPS-oriented (z, y, x) array (0 = axial). See
            :mod:`lrc_lightning.data.preprocess`.
        skip_empty_slices: pre-train on slices with at least ``min_foreground_fraction`` of
            pixels brighter than ``foreground_threshold`` only.
        superpixel_*: Felzenszwalb parameters; ``background_threshold`` suppresses dark regions.
        regions: ``"felzenszwalb"`` (the paper's super-pixels) or ``"grid"``: squares
            (cubes) of ``grid_cell`` pixels, the ablation that asks whether LRC needs
            regions that follow anatomy.
        labels: allowed label values (default: the ``labels`` of dataset.json).
        test_cases, val_cases, labelled_cases, seed: patient-level split (counts draw from
            a seeded permutation, lists name case ids). Validation and test Dice use
            labelled cases: some of them without a label file is an error naming them,
            all of them a warning (no Dice).
        pretrain_with_labels: pre-training batches also carry ``label_v1``/``label_v2``.
        pretrain_on: pre-train on the whole pool (self-supervised) or on the labelled
            cases only (supervised pre-training that may use only the labels it is given).
        precompute_workers: processes for the cache; ``shard``: ``"i/n"`` to fill only
            this share (a cluster job array).
        hash_content: key the cache on file contents instead of path + size + mtime + ctime.
        device_batches: make training batches on the training device from slices held
            there (:class:`~lrc_lightning.data.device_batches.DeviceBatches`: no loader
            workers, no copies per step; same augmentations). Under DDP each rank draws
            from all training slices with its own seed.
        channels_last: with ``device_batches``, images in channels-last memory format.
        batch_format: the structure of pre-training batches: ``"dict"`` (above),
            ``"lightly"`` (``([x1, x2], targets, filenames, [s1, s2])``) or
            ``"solo-learn"`` (``(indexes, [x1, x2], targets, [s1, s2])``); see
            :mod:`lrc_lightning.objective.batches`. Give LRCCallback the same ``batch_format``: it
            hands the module its own 3-item structure.
        superpixels_in_batch: False leaves the super-pixel maps out of pre-training batches:
            the plain lightly ``(views, targets, filenames)`` / solo-learn ``(indexes,
            views, targets)`` tuple (a dict without ``superpixels_v1``/``_v2``), for the
            baseline run of the same module without LRCCallback, on the same data, split and
            augmentations.
        spatial_dims: 2 (slices) or 3: volumes with 3D supervoxels
            (:func:`~lrc_lightning.superpixels.felzenszwalb_3d`, cached), served as
            ``patch_size`` patches (:mod:`lrc_lightning.data.patches`): pre-training batches
            ``image_v1`` (B, 1, D, H, W), ``superpixels_v1`` (B, D, H, W), ...; fine-tuning
            ``image``/``label`` patches; validation and test whole volumes as in 2D (the
            model predicts them with sliding windows).
        patch_size: (D, H, W) voxels of a 3D patch, in the cached grid (``image_size`` and
            ``spacing`` set it in-plane, ``slice_spacing`` through the slices).
        slice_spacing: through-plane target spacing in mm (e.g. the in-plane spacing, for
            near-isotropic 3D patches); None keeps each file's slices.
        foreground_ratio: share of training items drawn from foreground, the rest drawn
            uniformly: 3D patches centred on an organ (fine-tuning; else on a voxel brighter
            than ``foreground_threshold``), 2D fine-tuning slices that hold an organ.
        intensity_scale: ``(low, high)`` range of a multiplicative intensity scale drawn
            log-uniformly per training item (with ``augment``); default off. MR has no
            intensity unit, and after percentile normalisation the same tissue of two
            patients can differ twofold: e.g. ``(0.5, 2.0)`` when fine-tuning on few
            patients.
        mirror_labels: label pairs that are mirror images, by name (dataset.json) or value,
            e.g. ``[("right_kidney", "left_kidney")]``. Wherever labels are served
            (fine-tuning, ``pretrain_with_labels``), a left-right flip swaps them; without
            pairs those batches get no flip at all, since a flipped right kidney labelled
            "right" lies on the patient's left (and no other flip, which would mirror the
            body). Assumes the columns are the patient's left-right (axial and coronal
            slices, LPS order). Pre-training without labels keeps its flips.
        patches_per_volume: 3D patches per volume and epoch.
        dicom_series: which series of a DICOM folder holding several (a localizer next to
            the axial series): None (an error listing them), ``"largest"``, ``"all"`` (one
            case per series) or a SeriesInstanceUID; see
            :func:`~lrc_lightning.data.cases.discover_cases`.
        channels: channels of every image the loaders (device batches included) and
            :meth:`example_input` serve: the one CT/MR channel repeated, for a backbone
            that expects RGB input (``channels=3`` for torchvision's and solo-learn's
            ResNets, which then need no new first layer). The copies are identical and
            keep the intensity range ([0, 1]); normalise them in the module if its
            backbone expects ImageNet statistics. Maps and labels are unchanged.

    Raises:
        ValueError: an option out of its range (``channels`` below 1, an unknown ``mode``).

    A fit with :class:`~lrc_lightning.LRCCallback` records it in this data module's
    checkpoint state: resuming such a checkpoint (``ckpt_path=``) with a Trainer without the
    callback is an error that names the checkpoint and the two ways on, before Lightning
    fails to load the optimizer state (which holds the LRC head's parameters).

    Example:
        For a torchvision ResNet-18 (3 input channels), in lightly's batch structure:

        >>> data = LRCDataModule("data/chaos-t2-demo", image_size=64, channels=3,
        ...                      batch_format="lightly")  # doctest: +SKIP
        >>> data.prepare_data(); data.setup("fit")  # doctest: +SKIP
        >>> (x1, x2), _, _, (s1, s2) = next(iter(data.train_dataloader()))  # doctest: +SKIP
        >>> x1.shape, s1.shape  # doctest: +SKIP
        (torch.Size([8, 3, 64, 64]), torch.Size([8, 64, 64]))
    """

    def __init__(
        self,
        data: str | list[str],
        cache_dir: str = ".lrc_cache",
        batch_size: int = 8,
        num_workers: int = 0,
        persistent_workers: bool = False,
        mode: Literal["pretrain", "finetune"] = "pretrain",
        modality: Modality = "mr",
        ct_window: str | tuple[float, float] = "abdomen",
        mr_percentiles: tuple[float, float] = (0.5, 99.5),
        image_size: int | None = None,
        spacing: tuple[float, float] | None = None,
        slice_axis: int | Literal["auto"] = "auto",
        skip_empty_slices: bool = True,
        foreground_threshold: float = 0.05,
        min_foreground_fraction: float = 0.02,
        superpixel_scale: float = 100.0,
        superpixel_sigma: float = 0.8,
        superpixel_min_size: int = 50,
        background_threshold: float | None = None,
        regions: RegionMethod = "felzenszwalb",
        grid_cell: int = 16,
        labels: list[int] | None = None,
        test_cases: int | list[str] = 0,
        val_cases: int | list[str] = 0,
        labelled_cases: int | float | list[str] | None = None,
        seed: int = 0,
        pretrain_with_labels: bool = False,
        pretrain_on: Literal["pool", "labelled"] = "pool",
        augment: bool = True,
        mirror_labels: list[tuple[str | int, str | int]] | None = None,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        max_rotation: float = 10.0,
        precompute_workers: int = 1,
        shard: str | None = None,
        hash_content: bool = False,
        device_batches: bool = False,
        channels_last: bool = False,
        batch_format: BatchFormatName = "dict",
        superpixels_in_batch: bool = True,
        spatial_dims: Literal[2, 3] = 2,
        slice_spacing: float | None = None,
        patch_size: tuple[int, int, int] = (32, 96, 96),
        foreground_ratio: float = 0.5,
        intensity_scale: tuple[float, float] = (1.0, 1.0),
        patches_per_volume: int = 8,
        dicom_series: str | None = None,
        channels: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(
                f"channels must be an integer >= 1 (3 for a backbone that expects RGB "
                f"input), got {channels!r}"
            )
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if spatial_dims == 3 and device_batches:
            raise ValueError("device_batches serves 2D slices; use spatial_dims=2 with it")
        if mode not in ("pretrain", "finetune"):
            raise ValueError(f"mode must be 'pretrain' or 'finetune', got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.data = data
        self.dicom_series = dicom_series
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers and num_workers > 0
        self.mode = mode
        self.test_cases = test_cases
        self.val_cases = val_cases
        self.labelled_cases = labelled_cases
        self.seed = seed
        self.pretrain_with_labels = pretrain_with_labels
        if pretrain_on not in ("pool", "labelled"):
            raise ValueError(f"pretrain_on must be 'pool' or 'labelled', got {pretrain_on!r}")
        self.pretrain_on = pretrain_on
        self.precompute_workers = precompute_workers
        self.shard = shard
        self.device_batches = device_batches
        self.channels_last = channels_last
        self.channels = channels
        self.batch_format = resolve_batch_format(batch_format)
        if type(self.batch_format).pack is BatchFormat.pack:
            # A KeyPathBatch or callable reads a batch; only the named formats can also be
            # built from the data module's dict, so refuse here, not at the first step.
            raise ValueError(
                f"LRCDataModule(batch_format={batch_format!r}): the data module builds only "
                f"the named batch formats {sorted(BATCH_FORMATS)}; a KeyPathBatch or a "
                "callable reads batches that your own DataLoader builds: give it to "
                "LRCCallback(batch_format=...) or init_lrc(batch_format=...) instead"
            )
        self.superpixels_in_batch = bool(superpixels_in_batch)
        self.spatial_dims = spatial_dims
        threshold = foreground_threshold if skip_empty_slices else 0.05
        self.patch_sampling = PatchSampling(
            patch_size=(int(patch_size[0]), int(patch_size[1]), int(patch_size[2])),
            foreground_ratio=foreground_ratio,
            foreground_threshold=threshold,
            patches_per_volume=patches_per_volume,
        )
        if not superpixels_in_batch and mode != "pretrain":
            raise ValueError(
                "superpixels_in_batch=False is for pre-training batches; fine-tuning batches "
                "carry no super-pixel maps"
            )
        if self.batch_format.name != "dict" and mode != "pretrain":
            raise ValueError(
                f"batch_format={batch_format!r} is for pre-training batches; fine-tuning "
                "batches are dicts ({'image', 'label'})"
            )
        self.config = PreprocessConfig(
            modality=modality,
            ct_window=tuple(ct_window) if not isinstance(ct_window, str) else ct_window,
            mr_percentiles=tuple(mr_percentiles),
            image_size=image_size,
            spacing=tuple(spacing) if spacing is not None else None,  # type: ignore[arg-type]
            slice_axis=slice_axis,
            foreground_threshold=foreground_threshold if skip_empty_slices else -1.0,
            min_foreground_fraction=min_foreground_fraction if skip_empty_slices else 0.0,
            superpixel_scale=superpixel_scale,
            superpixel_sigma=superpixel_sigma,
            superpixel_min_size=superpixel_min_size,
            background_threshold=background_threshold,
            regions=regions,
            grid_cell=grid_cell,
            allowed_labels=tuple(labels) if labels is not None else _declared_labels(data),
            supervoxels=spatial_dims == 3,
            slice_spacing=slice_spacing,
        )
        self.cache = VolumeCache(cache_dir, self.config, hash_content=hash_content)
        self.geometry = (
            GeometryAugment(crop_scale=crop_scale, max_rotation=max_rotation)
            if augment
            else GeometryAugment(crop_scale=(1.0, 1.0), horizontal_flip=0.0, max_rotation=0.0)
        )
        self.intensity = (
            IntensityAugment(scale=intensity_scale)
            if augment
            else IntensityAugment(0.0, 0.0, (1.0, 1.0), 0.0, 0.0)
        )
        self.augment = augment
        self.mirror = mirror_label_pairs(mirror_labels, data)
        labelled_batches = mode == "finetune" or pretrain_with_labels
        if (self.mirror is not None and labelled_batches and augment and spatial_dims == 2
                and slice_axis == SAGITTAL_AXIS):  # fmt: skip
            # Known before any case is read: say it now, not after the cache is built.
            raise sagittal_mirror_error("all cases are (slice_axis=2)")
        # Batches that carry labels: flips only where the mirror pairs can be swapped.
        self.label_geometry = self.geometry.for_labels(self.mirror is not None)
        self.foreground_ratio = foreground_ratio
        self.split: Split | None = None
        self._volumes: dict[str, CachedVolume] = {}

    # ------------------------------------------------------------------ Lightning hooks
    def cases(self) -> list[Case]:
        return discover_cases(self.data, self.dicom_series)

    def prepare_data(self) -> None:
        """Fill the cache (once per node). Assigns no state, as Lightning requires."""
        self.cache.prepare(self.cases(), processes=self.precompute_workers, shard=self.shard)

    def setup(self, stage: str | None = None) -> None:
        """Split by patient and memory-map the cached cases (every rank)."""
        cases = self.cases()
        self.split = split_cases(
            cases, self.test_cases, self.val_cases, self.labelled_cases, self.seed
        )
        check_evaluation_labels(self.split.val, "val_cases")  # before any cache work
        check_evaluation_labels(self.split.test, "test_cases")
        for case in cases:
            if case.case_id not in self._volumes:
                self.cache.ensure(case)  # normally a no-op after prepare_data
                self._volumes[case.case_id] = self.cache.load(case)
        on_labelled = self.mode == "finetune" or self.pretrain_on == "labelled"
        if self.spatial_dims == 2:  # 3D patches have one size whatever the volumes' sizes
            self._check_same_slice_size(self.split.labelled if on_labelled else self.split.pool)

    def _check_same_slice_size(self, cases: Sequence[Case]) -> None:
        """Training slices are batched: one slice size, or a clear error before collate."""
        sizes: dict[tuple[int, ...], str] = {}
        for case in cases:
            sizes.setdefault(tuple(self._volumes[case.case_id].image.shape[1:]), case.case_id)
        if len(sizes) > 1:
            (size_a, case_a), (size_b, case_b) = list(sizes.items())[:2]
            raise DataError(
                f"training slices of different sizes cannot be batched: case {case_a} has "
                f"{size_a[0]}x{size_a[1]}, case {case_b} has {size_b[0]}x{size_b[1]} "
                f"({len(sizes)} sizes in all). Set image_size (and optionally spacing) on "
                "LRCDataModule to bring them to one size."
            )

    def volumes(self, cases: Sequence[Case]) -> list[CachedVolume]:
        """The memory-mapped cached volumes of ``cases`` (after :meth:`setup`)."""
        return [self._volumes[c.case_id] for c in cases]

    def _require_split(self) -> Split:
        if self.split is None:
            raise RuntimeError("call setup() before asking for dataloaders")
        return self.split

    def train_dataset(
        self,
    ) -> PairedViewSlices | LabelledSlices | PairedViewPatches | LabelledPatches:
        split = self._require_split()
        if self.spatial_dims == 3:
            return self._patch_dataset(split)
        if self.mode == "pretrain":
            cases = split.labelled if self.pretrain_on == "labelled" else split.pool
            return PairedViewSlices(
                self.volumes(cases),
                self.label_geometry if self.pretrain_with_labels else self.geometry,
                self.intensity,
                with_labels=self.pretrain_with_labels,
                mirror=self.mirror,
            )
        if not split.labelled:
            raise ValueError("fine-tuning with labelled_cases=0: no labelled case to train on")
        geometry = self.label_geometry if self.augment else None
        intensity = self.intensity if self.augment else None
        return LabelledSlices(self.volumes(split.labelled), geometry, intensity, self.mirror)

    def _patch_dataset(self, split: Split) -> PairedViewPatches | LabelledPatches:
        # The 2D crop's area fraction a becomes a volume fraction a**1.5 (same side ratio).
        geometry = (
            VolumeAugment(
                crop_scale=(self.geometry.crop_scale[0] ** 1.5, self.geometry.crop_scale[1]),
                max_rotation=self.geometry.max_rotation,
            )
            if self.augment
            else VolumeAugment((1.0, 1.0), (0.0, 0.0, 0.0), False, 0.0)
        )
        labelled_geometry = geometry.for_labels(self.mirror is not None)
        if self.mode == "pretrain":
            cases = split.labelled if self.pretrain_on == "labelled" else split.pool
            return PairedViewPatches(
                self.volumes(cases), self.patch_sampling,
                labelled_geometry if self.pretrain_with_labels else geometry, self.intensity,
                with_labels=self.pretrain_with_labels, mirror=self.mirror,
            )  # fmt: skip
        if not split.labelled:
            raise ValueError("fine-tuning with labelled_cases=0: no labelled case to train on")
        return LabelledPatches(
            self.volumes(split.labelled), self.patch_sampling,
            labelled_geometry if self.augment else None,
            self.intensity if self.augment else None, mirror=self.mirror,
        )  # fmt: skip

    def example_input(self, count: int = 2) -> torch.Tensor:
        """(count, C, H, W) images (3D: (count, C, D, H, W) patches; C: ``channels``) of the
        training set: what a network gets (LRCCallback runs one dry forward of it to read a
        layer's channels)."""
        dataset = self.train_dataset()
        key = "image_v1" if self.mode == "pretrain" else "image"
        images = torch.stack([dataset[i][key] for i in range(min(count, len(dataset)))])
        return images.repeat_interleave(self.channels, dim=1)

    def _loader(
        self, dataset: Any, shuffle: bool, batch_size: int, collate: Any = None
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            drop_last=shuffle and len(dataset) > batch_size,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader | DeviceBatches | _PackedBatches:
        packed = self.mode == "pretrain" and (
            self.batch_format.name != "dict" or not self.superpixels_in_batch
        )
        fmt, maps = self.batch_format, self.superpixels_in_batch
        if self.mode == "pretrain" and fmt.name != "dict" and maps:
            self._require_lrc_callback_for_tuple_batches()
        if self.device_batches:
            batches = self._device_batches()
            return _PackedBatches(batches, fmt, maps) if packed else batches
        collate = _PackedCollate(fmt, maps, self.channels) if packed or self.channels > 1 else None
        dataset = self.train_dataset()
        if isinstance(dataset, LabelledSlices):
            sampler = foreground_sampler(len(dataset), dataset.organ_slices(),
                                         self.foreground_ratio)  # fmt: skip
            if sampler is not None:
                return DataLoader(
                    dataset, batch_size=self.batch_size, sampler=sampler,
                    num_workers=self.num_workers, persistent_workers=self.persistent_workers,
                    drop_last=len(dataset) > self.batch_size, collate_fn=collate,
                )  # fmt: skip
        return self._loader(dataset, True, self.batch_size, collate)

    def _require_lrc_callback_for_tuple_batches(self) -> None:
        """A tuple batch with the super-pixel maps appended reaches a module's step only
        through LRCCallback, which cuts them off; without it the module's own unpacking
        fails with a bare "too many values to unpack"."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or any(_is_lrc_callback(c) for c in trainer.callbacks):
            return
        name = self.batch_format.name
        raise ValueError(
            f"LRCDataModule(batch_format={name!r}) appends the super-pixel maps to each "
            f"{name} batch for LRCCallback(batch_format={name!r}), and this Trainer has no "
            f"LRCCallback: add LRCCallback(batch_format={name!r}) to its callbacks, or, for "
            "the baseline run without LRC, set superpixels_in_batch=False to get the plain "
            f"{name} batches"
        )

    def _device_batches(self) -> DeviceBatches:
        split = self._require_split()
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        rank = trainer.global_rank if trainer is not None else 0
        pretrain = self.mode == "pretrain"
        cases = split.pool if pretrain and self.pretrain_on == "pool" else split.labelled
        if not cases:
            raise ValueError("no training case: check test_cases, val_cases, labelled_cases")
        labelled = not pretrain or self.pretrain_with_labels
        geometry = self.label_geometry if labelled else self.geometry
        return DeviceBatches(
            self.volumes(cases), self.batch_size, mode=self.mode,
            geometry=geometry if pretrain or self.augment else None, mirror=self.mirror,
            foreground_ratio=self.foreground_ratio,
            intensity=self.intensity if pretrain or self.augment else None,
            with_labels=self.pretrain_with_labels, device=device, seed=self.seed + rank,
            channels_last=self.channels_last, channels=self.channels,
        )  # fmt: skip

    #: Lightning's ``is_overridden`` of the class's namespace (set by the concrete classes).
    _is_overridden: Callable[[str, Any], bool] | None = None

    def _module_lacks(self, step: str) -> bool:
        """The module that the attached Trainer fits has no ``step`` (False without one, or
        for a module of the other Lightning namespace)."""
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if module is None or self._is_overridden is None:
            return False
        try:
            return not self._is_overridden(step, module)
        except ValueError:  # not a LightningModule of this namespace: keep the loader
            return False

    def _val_dataloader(self) -> DataLoader | list:
        """One whole labelled volume per batch from the validation cases. Lightning sees no
        validation loader while the module it fits has no ``validation_step`` (no warning)."""
        split = self._require_split()
        vols = [v for v in self.volumes(split.val) if v.label is not None]
        return self._loader(Volumes(vols), False, 1, self._volume_collate()) if vols else []

    val_dataloader = _LoaderIfModuleSteps("validation_step", _val_dataloader)

    def test_dataloader(self) -> DataLoader | list:
        split = self._require_split()
        vols = [v for v in self.volumes(split.test) if v.label is not None]
        return self._loader(Volumes(vols), False, 1, self._volume_collate()) if vols else []

    def _volume_collate(self) -> _PackedCollate | None:
        # Whole volumes: image (1, S, 1, H, W), the channel on axis 2.
        if self.channels == 1:
            return None
        return _PackedCollate(resolve_batch_format("dict"), True, self.channels, channel_dim=2)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state: the LRCCallback of the fit, when one added its head to the
        optimizer (then resuming needs it; see :meth:`load_state_dict`); else nothing, and
        the checkpoint gets no entry of this data module."""
        trainer = getattr(self, "trainer", None)
        for callback in getattr(trainer, "callbacks", None) or []:
            if _is_lrc_callback(callback) and callback.adds_head_to_optimizer:
                return {_CALLBACK_STATE: {
                    "feature_layer": callback.feature_layer,
                    "target_layer": callback.target_layer,
                    "batch_format": callback.batch_format.name,
                }}  # fmt: skip
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resuming (``fit(ckpt_path=...)``) a checkpoint of a fit with LRCCallback needs the
        callback: its optimizer state holds the LRC head's parameters, which Lightning
        otherwise fails to load with a parameter-group size error that names neither.

        Raises:
            ValueError: the Trainer has no LRCCallback; names the checkpoint and what to do.
        """
        saved = state_dict.get(_CALLBACK_STATE)
        trainer = getattr(self, "trainer", None)
        if saved is None or trainer is None:
            return
        if any(_is_lrc_callback(c) for c in trainer.callbacks):
            return
        options = [f"feature_layer={saved.get('feature_layer')!r}"]
        if saved.get("target_layer") is not None:
            options.append(f"target_layer={saved['target_layer']!r}")
        if saved.get("batch_format") not in (None, "dict"):
            options.append(f"batch_format={saved['batch_format']!r}")
        module = type(trainer.lightning_module).__name__
        raise ValueError(
            f"checkpoint {trainer.ckpt_path} was saved by a fit with LRCCallback("
            f"{', '.join(options)}): its optimizer state holds the LRC projection head's "
            "parameters, and this Trainer has no LRCCallback to restore them. To resume it, "
            f"add LRCCallback({', '.join(options)}) to the Trainer's callbacks (from "
            "lrc_lightning.lightning for a lightning.pytorch Trainer). To go on without "
            f"LRC, load the weights only: {module}.load_from_checkpoint(path) (the head is "
            "not in its state_dict) and fit without ckpt_path."
        )


def _is_lrc_callback(callback: Any) -> bool:
    """An LRCCallback (of either Lightning namespace), known by its attribute: the data
    module sits below the integrations and does not import them (one-way imports)."""
    return isinstance(getattr(callback, "adds_head_to_optimizer", None), bool)


class LRCDataModule(LRCDataModuleBase, pl.LightningDataModule):
    __doc__ = LRCDataModuleBase.__doc__
    _is_overridden = staticmethod(is_overridden)
