"""The fine-tuning readout: weights chosen on the validation patients, foreground slices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lrc_lightning.data import LRCDataModule
from lrc_lightning.data.datasets import foreground_sampler
from lrc_lightning.evaluation.label_efficiency import Benchmark, build_parser
from tests.conftest import DEMO_MR


def test_readout_scores_the_weights_the_validation_patients_chose(tmp_path: Path) -> None:
    args = build_parser().parse_args([
        "--data", str(DEMO_MR), "--out", str(tmp_path), "--work-dir", str(tmp_path / "w"),
        "--cache-dir", str(tmp_path / "cache"), "--size", "32", "--width", "4", "--depth", "2",
        "--batch-size", "4", "--finetune-steps", "6", "--val-every", "2", "--patience", "0",
        "--test-cases", "1", "--val-cases", "1", "--ks", "1",
    ])  # fmt: skip
    bench = Benchmark(args)
    table, record = bench.finetune(None, 0, bench.labelled(0, 1), "val")
    assert [step for step, _ in record["curve"]] == [2, 4, 6]
    best_step, best = max(record["curve"], key=lambda point: (point[1], -point[0]))
    assert record["best_step"] == best_step and record["stopped_step"] == 6
    # Scoring the validation patient again with the chosen weights gives its best Dice.
    rows = np.array(list(table.values()))
    assert float(np.nanmean(np.nanmean(rows, axis=0))) == pytest.approx(best, abs=1e-4)
    assert list(table) == bench.val
    # Each validation also keeps every organ's Dice, whose mean is the curve's point.
    assert [step for step, _ in record["organ_curve"]] == [2, 4, 6]
    for (_, mean), (_, organs) in zip(record["curve"], record["organ_curve"], strict=True):
        assert sorted(organs) == sorted(bench.organs)
        assert float(np.nanmean(list(organs.values()))) == pytest.approx(mean, abs=1e-3)


def test_foreground_sampler_draws_organ_slices_at_the_ratio(tmp_path: Path) -> None:
    dm = LRCDataModule(DEMO_MR, cache_dir=str(tmp_path / "cache"), image_size=32,
                       mode="finetune", labelled_cases=None, foreground_ratio=0.8)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    dataset = dm.train_dataset()
    organ = set(dataset.organ_slices())  # type: ignore[union-attr]
    natural = len(organ) / len(dataset)
    assert 0.2 < natural < 0.9  # real volumes: slices above and below the organs
    sampler = foreground_sampler(len(dataset), sorted(organ), 0.8)
    assert sampler is not None
    drawn = [i for _ in range(20) for i in sampler]
    share = np.mean([i in organ for i in drawn])
    assert share == pytest.approx(0.8 + 0.2 * natural, abs=0.03)
    assert foreground_sampler(len(dataset), sorted(organ), 0.0) is None


def test_labels_beyond_num_classes_are_refused_at_setup(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    from lrc_lightning.models import FineTuneSegmentation, UNet2d

    dm = LRCDataModule(DEMO_MR, cache_dir=str(tmp_path / "cache"), image_size=32,
                       mode="finetune", labelled_cases=None, batch_size=4)  # fmt: skip
    model = FineTuneSegmentation(UNet2d(width=4, depth=2), num_classes=3)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"label values \[0, 1, 2, 3, 4\].*num_classes=3.*"
                                         r"\[3, 4\] have no output; set num_classes=5"):
        trainer.fit(model, dm)
    # Labels declared nowhere: the first batch is checked.
    undeclared = LRCDataModule(DEMO_MR, cache_dir=str(tmp_path / "cache"), image_size=32,
                               mode="finetune", labelled_cases=None, batch_size=4,
                               labels=None)  # fmt: skip
    undeclared.config = None  # type: ignore[assignment]
    message = r"value [34] but the model has num_classes=3 .*set num_classes=[45]"
    with pytest.raises(ValueError, match=message):
        pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False).fit(
            FineTuneSegmentation(UNet2d(width=4, depth=2), num_classes=3), undeclared
        )  # fmt: skip


def test_readout_pilot_scores_only_the_validation_patients(tmp_path: Path) -> None:
    from lrc_lightning.evaluation.label_efficiency import main

    argv = [
        "--data", str(DEMO_MR), "--out", str(tmp_path), "--work-dir", str(tmp_path / "w"),
        "--cache-dir", str(tmp_path / "cache"), "--size", "32", "--width", "4", "--depth", "2",
        "--batch-size", "4", "--finetune-steps", "4", "--val-every", "2", "--patience", "0",
        "--test-cases", "1", "--val-cases", "1", "--probe-levels", "-1", "--skip-main",
        "--readout-pilot", "--pilot-ks", "1", "--pilot-seeds", "0", "1",
        "--pilot-readout-offsets", "0", "1000", "--checkpoint-min-organ", "0.02",
    ]  # fmt: skip
    assert main(argv) == 0
    runs = sorted((tmp_path / "label_efficiency_runs").glob("*.json"))
    assert [p.name.split("-")[0] for p in runs] == [
        "val_random_k1_s0", "val_random_k1_s0_r1000", "val_random_k1_s1", "val_random_k1_s1_r1000"
    ]  # fmt: skip
    saved = json.loads((tmp_path / "label_efficiency_readout_pilot.json").read_text())
    bench = Benchmark(build_parser().parse_args(argv))
    for run in saved["runs"]:
        assert list(run["per_volume"]) == bench.val and bench.test[0] not in run["per_volume"]
        assert len(run["finetune_validation"]["organ_curve"]) == 2
    table = (tmp_path / "label_efficiency_readout_pilot.md").read_text()
    per_run = table.split("Validation Dice at the checkpoint")[0]  # then one row per draw
    assert per_run.count("| random | 1 |") == 4 and "runs with an organ below 0.02" in table
    # The fine-tuning seed of each row: the seed, or the seed + the offset.
    for seed, finetuning in ((0, 0), (0, 1000), (1, 1), (1, 1001)):
        assert f"| random | 1 | {seed} ({finetuning}) |" in table
    for run in saved["runs"]:  # the "every organ" cell is the run file's flag
        v = run["finetune_validation"]
        assert v["best_every_organ"] in (True, False)
        cell = "yes" if v["best_every_organ"] else "**no** (best mean kept)"
        assert f"| {v['best_step']} | {cell} |" in table
    # Each draw's spread over its fine-tuning seeds (offsets 0 and 1000), from the run files.
    for seed in (0, 1):
        best = [r["finetune_validation"]["best_val_dice"] for r in saved["runs"]
                if r["seed"] == seed]  # fmt: skip
        sd = abs(best[0] - best[1]) / 2**0.5  # the sample sd of two values
        assert (f"| random | 1 | {seed} | 2 | {np.mean(best):.3f} | {sd:.3f} | "
                f"{max(best) - min(best):.3f} (") in table  # fmt: skip
    offsets = sorted((r["seed"], r["readout_offset"]) for r in saved["runs"])
    assert offsets == [(0, 0), (0, 1000), (1, 0), (1, 1000)]
    assert not (tmp_path / "label_efficiency.json").exists()  # no test score at all


def test_intensity_scale_multiplies_each_item_within_its_range(tmp_path: Path) -> None:
    import torch

    from lrc_lightning.data.transforms import IntensityAugment

    images = torch.rand(64, 1, 8, 8) * 0.5 + 0.1
    still = dict(brightness=0.0, contrast=0.0, gamma=(1.0, 1.0), noise_std=0.0,
                 blur_probability=0.0)  # fmt: skip
    doubled = IntensityAugment(**still, scale=(2.0, 2.0)).batch(images)
    assert torch.allclose(doubled, 2 * images)
    ratio = IntensityAugment(**still, scale=(0.5, 2.0)).batch(images) / images
    per_item = ratio.flatten(1)
    assert torch.allclose(per_item, per_item[:, :1].expand_as(per_item))  # one scale per item
    assert per_item.min() >= 0.5 - 1e-6 and per_item.max() <= 2.0 + 1e-6
    assert (per_item[:, 0] < 0.8).any() and (per_item[:, 0] > 1.4).any()  # spread, both ways
    assert torch.allclose(IntensityAugment(**still).batch(images), images, atol=1e-6)  # off
    for bad in ((0.0, 2.0), (2.0, 1.0), (1.0,)):
        with pytest.raises(ValueError, match="intensity scale"):
            IntensityAugment(scale=bad)  # type: ignore[arg-type]
    # The data module applies it to training items only when augmenting.
    dm = LRCDataModule(DEMO_MR, cache_dir=str(tmp_path / "cache"), image_size=32,
                       mode="finetune", intensity_scale=(0.5, 2.0))
    assert dm.intensity.scale == (0.5, 2.0)


def test_not_labelled_cases_are_skipped_in_each_seeds_draw(tmp_path: Path) -> None:
    from lrc_lightning.data.cases import DataError

    base = ["--data", str(DEMO_MR), "--out", str(tmp_path), "--cache-dir", str(tmp_path / "c"),
            "--test-ids", "chaos_t2_001", "--val-ids", "chaos_t2_002", "--ks", "1"]  # fmt: skip
    plain = Benchmark(build_parser().parse_args(base))
    assert plain.labelled_pool == ["chaos_t2_003", "chaos_t2_005"]
    draws = {seed: plain.labelled(seed, 2) for seed in range(6)}
    assert {d[0] for d in draws.values()} == {"chaos_t2_003", "chaos_t2_005"}
    skip = Benchmark(build_parser().parse_args([*base, "--not-labelled", "chaos_t2_005"]))
    for seed, drawn in draws.items():
        # The excluded case is never drawn; the others keep their order.
        assert skip.labelled(seed, 1) == [c for c in drawn if c != "chaos_t2_005"][:1]
    from lrc_lightning.evaluation.label_efficiency import settings_key

    assert settings_key(build_parser().parse_args([*base, "--not-labelled", "chaos_t2_005"])) \
        != settings_key(build_parser().parse_args(base))  # fmt: skip
    with pytest.raises(DataError, match=r"--not-labelled names \['chaos_t2_001'\].*test or "):
        Benchmark(build_parser().parse_args([*base, "--not-labelled", "chaos_t2_001"]))
    with pytest.raises(DataError, match="only 1 pool patients can be drawn"):
        Benchmark(build_parser().parse_args([*base[:-1], "2", "--not-labelled", "chaos_t2_005"]))
    with pytest.raises(DataError, match="--not-labelled names unknown cases"):
        Benchmark(build_parser().parse_args([*base, "--not-labelled", "chaos_t2_999"]))


def test_readout_only_options_are_keyed_only_when_set(tmp_path: Path) -> None:
    from lrc_lightning.evaluation.label_efficiency import settings_key

    base = ["--data", str(DEMO_MR), "--out", str(tmp_path)]
    key = settings_key(build_parser().parse_args(base))
    # Defaults leave every earlier run's key as it was; a set value makes a new key.
    assert settings_key(build_parser().parse_args([*base, "--finetune-intensity-scale", "1",
                                                   "1"])) == key  # fmt: skip
    assert settings_key(build_parser().parse_args([*base, "--checkpoint-min-organ", "0"])) == key
    # The head's default (32) enters the key: runs of the 1x1 head, made before the option
    # existed, are found again with 0 and never reused by a default run.
    assert settings_key(build_parser().parse_args([*base, "--finetune-head-channels", "32"])) == key
    for extra in (["--finetune-lr", "3e-4"], ["--finetune-intensity-scale", "0.5", "2"],
                  ["--finetune-head-channels", "0"], ["--checkpoint-min-organ", "0.02"]):
        assert settings_key(build_parser().parse_args([*base, *extra])) != key
    assert build_parser().parse_args(base).finetune_lr is None  # the readout uses --lr


def test_a_new_readout_reuses_the_pretrained_weights(tmp_path: Path) -> None:
    from lrc_lightning.evaluation.label_efficiency import Variant, pretraining_key
    from lrc_lightning.objective.term import LRCConfig

    base = ["--data", str(DEMO_MR), "--out", str(tmp_path), "--work-dir", str(tmp_path / "w")]
    key = pretraining_key(build_parser().parse_args(base))
    for readout in (["--finetune-head-channels", "0"], ["--finetune-steps", "99"],
                    ["--patience", "0"], ["--probe-levels", "bottleneck"],
                    ["--finetune-lr", "3e-4"], ["--checkpoint-min-organ", "0.02"]):  # fmt: skip
        assert pretraining_key(build_parser().parse_args([*base, *readout])) == key, readout
    for pretraining in (["--pretrain-steps", "7"], ["--width", "4"], ["--mirror-labels",
                        "right_kidney", "left_kidney"], ["--foreground-ratio", "0.9"]):  # fmt: skip
        assert pretraining_key(build_parser().parse_args([*base, *pretraining])) != key
    # Weights saved by an earlier version, named by the runs' key, are still found.
    bench = Benchmark(build_parser().parse_args([*base, "--test-cases", "1", "--val-cases", "1",
                                                 "--ks", "1"]))  # fmt: skip
    variant = Variant("moco", LRCConfig())
    fresh = bench.weights_path(variant, 0, ["chaos_t2_001"])
    assert fresh.name == f"pretrain_moco_s0-w{bench.weights_key}.pt" and not fresh.exists()
    earlier = fresh.with_name(f"pretrain_moco_s0-{bench.key}.pt")
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"weights")
    assert bench.weights_path(variant, 0, ["chaos_t2_001"]) == earlier
    fresh.write_bytes(b"weights")
    assert bench.weights_path(variant, 0, ["chaos_t2_001"]) == fresh


def _scripted_validation(script: dict[int, dict[str, float]]) -> object:
    """A real LightningModule whose validation logs a scripted curve (mean and organs), and
    whose one buffer counts the optimizer steps: the kept weights say which step they are."""
    import pytorch_lightning as pl
    import torch

    class Scripted(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.register_buffer("steps", torch.zeros(()))

        def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
            self.steps += 1
            return (self.weight**2).sum()

        def validation_step(self, batch: object, batch_idx: int) -> None:
            organs = script[self.global_step]
            scored = [v for v in organs.values() if v == v]  # the metric's nan-mean
            self.log("val/dice_mean", sum(scored) / len(scored) if scored else float("nan"))
            for name, value in organs.items():
                self.log(f"val/dice_{name}", value)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> object:
            return torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)

        def val_dataloader(self) -> object:
            return torch.utils.data.DataLoader(torch.zeros(1, 1), batch_size=1)

    return Scripted()


@pytest.mark.parametrize(
    ("min_organ", "step", "every_organ"),
    [(0.0, 4, True), (0.02, 6, True), (0.95, 4, False)],
)
def test_checkpoint_rule_prefers_a_step_where_every_organ_is_segmented(
    min_organ: float, step: int, every_organ: bool
) -> None:
    import pytorch_lightning as pl

    from lrc_lightning.evaluation.label_efficiency import BestOnValidation

    script = {
        2: {"liver": 0.60, "kidney": 0.20},  # mean 0.40
        4: {"liver": 0.98, "kidney": 0.01},  # mean 0.495, the best mean; the kidney absent
        6: {"liver": 0.64, "kidney": 0.30},  # mean 0.47, the best with every organ >= 0.02
        8: {"liver": 0.50, "kidney": 0.20},  # mean 0.35
    }
    best = BestOnValidation(min_organ=min_organ, verbose=False)
    model = _scripted_validation(script)
    pl.Trainer(max_steps=8, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0,
               callbacks=[best]).fit(model)  # type: ignore[arg-type]  # fmt: skip
    assert [s for s, _ in best.curve] == [2, 4, 6, 8]
    assert [sorted(organs) for _, organs in best.organ_curve] == [["kidney", "liver"]] * 4
    # 0.95: no step qualifies, so the best mean of all is kept, and flagged.
    assert best.best_step == step and best.best_every_organ is every_organ
    assert best.best == pytest.approx(sum(script[step].values()) / 2, abs=1e-6)
    # The weights kept are those of that step (the buffer counts the optimizer steps).
    assert best.state is not None and float(best.state["steps"]) == step


def _fit_scripted(script: dict[int, dict[str, float]], best: object) -> None:
    import pytorch_lightning as pl

    pl.Trainer(max_steps=max(script), val_check_interval=2, check_val_every_n_epoch=None,
               logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0,
               callbacks=[best]).fit(_scripted_validation(script))  # type: ignore[arg-type]  # fmt: skip


def test_checkpoint_rule_with_organs_absent_from_the_validation_volumes() -> None:
    from lrc_lightning.evaluation.label_efficiency import BestOnValidation

    nan = float("nan")
    script = {
        2: {"liver": 0.50, "kidney": 0.30},  # mean 0.40
        4: {"liver": 0.50, "kidney": nan},  # no kidney in any validation volume: it qualifies
        6: {"liver": nan, "kidney": nan},  # nothing scored: never a checkpoint
        8: {"liver": 0.019996, "kidney": 0.99},  # mean 0.505; the liver rounds to 0.02 in the
    }  # curve, yet it is below 0.02: step 8 must not beat step 4 (0.50)
    best = BestOnValidation(min_organ=0.02, verbose=False)
    _fit_scripted(script, best)
    assert best.best_step == 4 and best.best_every_organ
    assert best.state is not None and float(best.state["steps"]) == 4
    assert [s for s, _ in best.curve] == [2, 4, 6, 8]  # every validation stays in the curve
    assert best.organ_curve[-1][1]["liver"] == 0.02  # the record rounds, the rule does not
    # Without organ metrics the rule cannot be applied: an error, not a silent best mean.
    with pytest.raises(ValueError, match=r"min_organ=0.02 needs each organ's Dice logged as "
                                         r"'val/dice_<organ>'"):  # fmt: skip
        _fit_scripted({2: {}}, BestOnValidation(min_organ=0.02, verbose=False))


def test_checkpoint_rule_section_counts_moved_and_fallback_checkpoints() -> None:
    from lrc_lightning.evaluation.label_efficiency import checkpoint_rule_section

    def run(arm: str, best: int, every: bool, offset: int = 0) -> dict[str, object]:
        curve = [[100, 0.40], [200, 0.50], [300, 0.45]]  # the best mean alone: step 200
        return {"arm": arm, "readout_offset": offset, "finetune_validation": {
            "curve": curve, "best_step": best, "best_every_organ": every}}  # fmt: skip

    runs = [run("moco", 200, True), run("moco", 300, True), run("moco", 200, False),
            run("moco_lrc", 200, True), run("moco", 300, True, offset=1000), None]
    text = checkpoint_rule_section(runs, 0.02)
    assert "every organ >= 0.02 on the validation patients" in text
    assert "| moco | 3 | 1 | 1 |" in text and "| moco_lrc | 1 | 0 | 0 |" in text
    assert "| moco (noise-floor repeat) | 1 | 1 | 0 |" in text
