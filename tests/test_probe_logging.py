"""The online segmentation probe and image/table logging on real data with real loggers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lrc_lightning import LRCDataModule
from lrc_lightning.evaluation.image_logging import (
    SuperpixelViewLogger,
    log_images,
    log_table,
    overlay_boundaries,
    overlay_labels,
)
from lrc_lightning.evaluation.probe import SegmentationProbe
from lrc_lightning.models import MoCoV2LRC, UNet2d
from tests.conftest import DEMO_MR

ORGANS = ["liver", "right_kidney", "left_kidney", "spleen"]


def demo_datamodule(tmp_path: Path, **kwargs) -> LRCDataModule:
    defaults = dict(cache_dir=str(tmp_path / "cache"), image_size=32, batch_size=4,
                    val_cases=1, labelled_cases=1, test_cases=1)  # fmt: skip
    defaults.update(kwargs)
    return LRCDataModule(str(DEMO_MR), **defaults)


def test_probe_logs_dice_per_organ_during_pretraining(tmp_path: Path) -> None:
    pl.seed_everything(0)
    probe = SegmentationProbe(class_names=ORGANS, max_slices=64)
    views = SuperpixelViewLogger(every_n_steps=1, max_images=2)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, callbacks=[probe, views],
        logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_checkpointing=False,
        log_every_n_steps=1,
    )  # fmt: skip
    model = MoCoV2LRC(UNet2d(width=8, depth=2), queue_size=16)
    datamodule = demo_datamodule(tmp_path, image_size=64)
    trainer.fit(model, datamodule)
    metrics = trainer.callback_metrics
    for organ in ORGANS:
        assert 0.0 <= float(metrics[f"probe/dice_{organ}"]) <= 1.0
    # Even barely trained features find the liver far better than calling every voxel
    # liver (the Dice of that trivial predictor on the validation volume).
    label = np.asarray(datamodule.volumes(datamodule.split.val)[0].label)
    trivial = 2 * (label == 1).sum() / (label.size + (label == 1).sum())
    assert float(metrics["probe/dice_liver"]) > 2 * trivial
    panels = sorted(Path(trainer.log_dir).rglob("train_views_step*.png"))
    assert len(panels) == 2 * 2  # two steps, two images each


def test_probe_without_labelled_cases_says_what_it_needs(tmp_path: Path) -> None:
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False,
                         callbacks=[SegmentationProbe()], enable_progress_bar=False,
                         enable_checkpointing=False)  # fmt: skip
    model = MoCoV2LRC(UNet2d(width=4, depth=2), queue_size=16)
    with pytest.raises(ValueError, match="labelled_cases >= 1 and val_cases >= 1"):
        trainer.fit(model, demo_datamodule(tmp_path, val_cases=0))


def test_overlays_mark_boundaries_and_classes() -> None:
    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    ids = np.zeros((8, 8), np.int64)
    ids[:, 4:] = 1
    rgb = overlay_boundaries(image, ids)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert (rgb[:, 3] == (255, 215, 0)).all() or (rgb[:, 4] == (255, 215, 0)).all()
    assert not (rgb[:, 0] == (255, 215, 0)).all(axis=-1).any()
    labelled = overlay_labels(image, ids)
    assert (labelled[:, :4, 0] == labelled[:, :4, 1]).all()  # background stays grey
    assert (labelled[:, 4:, 0] != labelled[:, 4:, 1]).any()


class _LoggerHost(pl.LightningModule):
    pass


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_images_and_tables_reach_each_logger(kind: str, tmp_path: Path, monkeypatch) -> None:
    if kind == "wandb":
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
        logger = WandbLogger(save_dir=str(tmp_path), project="lrc-test", offline=True)
    else:
        logger = TensorBoardLogger(str(tmp_path))
    trainer = pl.Trainer(logger=logger, accelerator="cpu")
    image = np.zeros((8, 8, 3), np.uint8)
    log_images(trainer, "val/predictions", [image, image], step=3)
    log_table(trainer, "val/dice_table", ["case", "liver"], [["c1", 0.9]], step=3)
    if kind == "wandb":
        logger.experiment.finish()
        media = list(tmp_path.rglob("*.png"))
        tables = list(tmp_path.rglob("*.table.json"))
        assert media and tables
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(Path(logger.log_dir))).Reload()
        assert "val/predictions" in events.Tags()["images"]
        assert "val/dice_table/text_summary" in events.Tags()["tensors"]


def test_probe_feature_fn_gives_the_backbone_path_result(tmp_path: Path) -> None:
    """A module method returning the same dense features scores exactly as the backbone."""
    pl.seed_everything(0)
    model = MoCoV2LRC(UNet2d(width=4, depth=2), queue_size=16).eval()
    model.dense = lambda x: model.backbone(x)  # type: ignore[attr-defined]
    datamodule = demo_datamodule(tmp_path, image_size=32)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.datamodule = datamodule  # type: ignore[misc]
    datamodule.prepare_data()
    datamodule.setup("fit")
    direct = SegmentationProbe(class_names=ORGANS, max_slices=16).probe(model, trainer)
    via_fn = SegmentationProbe(class_names=ORGANS, max_slices=16, feature_fn="dense")
    assert via_fn.probe(model, trainer) == direct
