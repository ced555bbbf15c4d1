"""Flips that keep anatomy: labelled batches are flipped only with their mirror pairs swapped."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lrc_lightning.data import LRCDataModule
from lrc_lightning.data.datamodule import mirror_label_pairs
from lrc_lightning.data.device_batches import DeviceBatches
from lrc_lightning.data.patches import VolumeAugment
from lrc_lightning.data.transforms import GeometryAugment, MirrorLabels, is_reflection
from tests.conftest import DEMO_MR

LIVER, RIGHT_KIDNEY, LEFT_KIDNEY, SPLEEN = 1, 2, 3, 4


def _column(label: torch.Tensor, value: int) -> float | None:
    """Mean column (the last axis: the patient's left in LPS) of ``value``, None if absent."""
    where = torch.nonzero(label == value)
    return float(where[:, -1].float().mean()) if len(where) >= 4 else None


def _sides(labels: list[torch.Tensor]) -> tuple[int, int, int]:
    """(slices with both kidneys, of them right kidney at the patient's right, bodies seen
    mirrored: liver to the image's left of the spleen)."""
    both = right_side = mirrored = 0
    for label in labels:
        right, left = _column(label, RIGHT_KIDNEY), _column(label, LEFT_KIDNEY)
        if right is not None and left is not None:
            both += 1
            right_side += right < left
        liver, spleen = _column(label, LIVER), _column(label, SPLEEN)
        if liver is not None and spleen is not None:
            mirrored += liver > spleen
    return both, right_side, mirrored


def _finetune_labels(tmp_path: Path, **kw) -> list[torch.Tensor]:
    dm = LRCDataModule(DEMO_MR, cache_dir=str(tmp_path / "cache"), image_size=64,
                       mode="finetune", labelled_cases=None, **kw)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    dataset = dm.train_dataset()
    torch.manual_seed(0)
    return [dataset[i]["label"] for i in range(len(dataset)) for _ in range(2)]


def test_real_chaos_right_kidney_stays_on_the_patients_right(tmp_path: Path) -> None:
    # The real volumes: before augmentation the right kidney lies at the patient's right.
    labels = _finetune_labels(tmp_path, augment=False)
    both, right_side, mirrored = _sides(labels)
    assert both > 20 and right_side == both and mirrored == 0
    # Declared pairs: flips happen (bodies seen mirrored) and swap the kidneys' labels.
    labels = _finetune_labels(tmp_path, mirror_labels=[("right_kidney", "left_kidney")])
    both, right_side, mirrored = _sides(labels)
    assert mirrored > 10, "flips were drawn"
    assert right_side == both
    # No pairs declared: no flip at all in fine-tuning.
    labels = _finetune_labels(tmp_path)
    both, right_side, mirrored = _sides(labels)
    assert mirrored == 0 and right_side == both


def test_pretraining_without_labels_keeps_its_flips(tmp_path: Path) -> None:
    dm = LRCDataModule(DEMO_MR, cache_dir=str(tmp_path / "cache"), image_size=64)
    assert dm.geometry.horizontal_flip == 0.5
    assert dm.label_geometry.horizontal_flip == 0.0
    paired = LRCDataModule(DEMO_MR, cache_dir=str(tmp_path / "cache"), image_size=64,
                           mirror_labels=[(2, 3)])  # fmt: skip
    assert paired.label_geometry.horizontal_flip == 0.5


def test_supervised_pretraining_views_swap_their_labels(tmp_path: Path) -> None:
    dm = LRCDataModule(DEMO_MR, cache_dir=str(tmp_path / "cache"), image_size=64,
                       pretrain_with_labels=True, mirror_labels=[("right_kidney", "left_kidney")])
    dm.prepare_data()
    dm.setup("fit")
    dataset = dm.train_dataset()
    torch.manual_seed(1)
    items = [dataset[i] for i in range(0, len(dataset), 2)]
    labels = [item[f"label_{v}"] for item in items for v in ("v1", "v2")]
    both, right_side, mirrored = _sides(labels)
    assert mirrored > 5 and both > 5 and right_side == both


def test_device_batches_swap_on_reflection(tmp_path: Path) -> None:
    dm = LRCDataModule(DEMO_MR, cache_dir=str(tmp_path / "cache"), image_size=64,
                       mode="finetune", labelled_cases=None)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    volumes = dm.volumes(dm.split.labelled)  # type: ignore[union-attr]
    batches = DeviceBatches(volumes, 16, mode="finetune", geometry=dm.geometry,
                            mirror=MirrorLabels(((RIGHT_KIDNEY, LEFT_KIDNEY),)),
                            foreground_ratio=0.9)  # fmt: skip
    labels = [label for batch in batches for label in batch["label"]]
    both, right_side, mirrored = _sides(labels)
    assert mirrored > 5 and right_side == both
    organ_share = np.mean([bool((label > 0).any()) for label in labels])
    assert organ_share > 0.85  # foreground_ratio 0.9 (plus empty slices drawn by chance)


def test_3d_patches_flip_left_right_only_and_swap(tmp_path: Path) -> None:
    common = dict(cache_dir=str(tmp_path / "cache"), image_size=64, spatial_dims=3,
                  mode="finetune", labelled_cases=None, patch_size=(8, 48, 48),
                  foreground_ratio=1.0, patches_per_volume=12)  # fmt: skip
    dm = LRCDataModule(DEMO_MR, mirror_labels=[("right_kidney", "left_kidney")], **common)
    dm.prepare_data()
    dm.setup("fit")
    dataset = dm.train_dataset()
    assert dataset.geometry.flip == (0.0, 0.0, 0.5)  # type: ignore[union-attr]
    # Quarter turns move the left-right axis onto the rows: off, to read sides by column.
    dataset.geometry = replace(dataset.geometry, quarter_turns=False)  # type: ignore[arg-type]
    torch.manual_seed(2)
    labels = [dataset[i]["label"] for i in range(len(dataset))]
    both, right_side, mirrored = _sides(labels)
    assert both > 5 and right_side == both and mirrored > 3
    plain = LRCDataModule(DEMO_MR, **common)
    plain.prepare_data()
    plain.setup("fit")
    assert plain.train_dataset().geometry.flip == (0.0, 0.0, 0.0)  # type: ignore[union-attr]


def test_reflection_and_pairs_known_values() -> None:
    theta = torch.tensor([[[-1.0, 0, 0], [0, 1, 0]], [[-1.0, 0, 0], [0, -1, 0]],
                          [[0.0, -1, 0], [1, 0, 0]]])  # flip, half turn, quarter turn
    assert is_reflection(theta).tolist() == [True, False, False]
    flip_z = torch.eye(3, 4).clone()
    flip_z[2, 2] = -1
    assert bool(is_reflection(flip_z))
    assert GeometryAugment(vertical_flip=0.5).for_labels(True).vertical_flip == 0.0
    assert VolumeAugment(flip=(0.5, 0.5, 0.5)).for_labels(True).flip == (0.0, 0.0, 0.5)
    mirror = mirror_label_pairs([("right_kidney", "left_kidney")], DEMO_MR)
    assert mirror == MirrorLabels(((2, 3),))
    assert mirror_label_pairs([(5, 6)]) == MirrorLabels(((5, 6),))
    with pytest.raises(ValueError, match=r"unknown label name 'right_lung'.*liver"):
        mirror_label_pairs([("right_lung", "left_lung")], DEMO_MR)
    with pytest.raises(ValueError, match="two mirror pairs"):
        MirrorLabels(((2, 3), (3, 4)))
    with pytest.raises(ValueError, match="two different values"):
        MirrorLabels(((2, 2),))


def test_mirror_labels_refused_on_sagittal_slices(tmp_path: Path) -> None:
    # A sagittal slice's columns run anterior-posterior: its flip is no left-right mirror,
    # and swapping the kidneys' labels with it would put each on the other's place.
    from lrc_lightning.data.cases import DataError
    from lrc_lightning.data.datasets import LabelledSlices

    # Asked for literally: refused at construction, before any case is read.
    with pytest.raises(DataError, match=r"all cases are.*sliced sagittally.*slice_axis=0 or 1"):
        LRCDataModule(DEMO_MR, cache_dir=str(tmp_path / "cache"), image_size=64,
                      mode="finetune", slice_axis=2, mirror_labels={"right_kidney": "left_kidney"})
    # Chosen per case ("auto" on a sagittal acquisition): refused naming the cases. The
    # volumes' recorded slice axis is what the check reads.
    dm = LRCDataModule(DEMO_MR, cache_dir=str(tmp_path / "cache"), image_size=64,
                       mode="finetune", labelled_cases=None, slice_axis=2, augment=False,
                       mirror_labels=[("right_kidney", "left_kidney")])  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    with pytest.raises(DataError, match=r"chaos_t2_\d+.*sliced sagittally.*slice_axis=0 or 1"):
        LabelledSlices(dm.volumes(dm.split.labelled), GeometryAugment(), None, dm.mirror)
    # Pre-training without labels keeps its flips whatever the plane.
    LRCDataModule(DEMO_MR, cache_dir=str(tmp_path / "cache"), image_size=64, slice_axis=2,
                  mirror_labels=[(2, 3)])
    # Unaugmented, or without pairs, sagittal fine-tuning is fine (nothing is flipped).
    for kw in ({"augment": False}, {}):
        plain = LRCDataModule(DEMO_MR, cache_dir=str(tmp_path / "cache"), image_size=64,
                              mode="finetune", labelled_cases=None, slice_axis=2,
                              mirror_labels=None if not kw else [(2, 3)], **kw)  # fmt: skip
        plain.prepare_data()
        plain.setup("fit")
        assert len(plain.train_dataset()) > 0
    # Coronal slices keep the patient's left-right in their columns: accepted.
    coronal = LRCDataModule(DEMO_MR, cache_dir=str(tmp_path / "cache"), image_size=64,
                            mode="finetune", labelled_cases=None, slice_axis=1,
                            mirror_labels=[(2, 3)])  # fmt: skip
    coronal.prepare_data()
    coronal.setup("fit")
    assert len(coronal.train_dataset()) > 0
