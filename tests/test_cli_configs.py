"""Every example config runs on real data; pretrain -> export -> fine-tune -> test; CLI help."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lrc_lightning.models import UNet2d
from lrc_lightning.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
ALL_CONFIGS = ["moco_lrc", "moco", "lrc_only", "supervised_lrc", "finetune", "moco_lrc_3d"]


def small_run(config: str, out: Path, cache: Path, *extra: str) -> list[str]:
    """CLI arguments that run ``config`` for 2 steps at 64x64 with a tiny U-Net."""
    return [
        "--config", str(CONFIGS / f"{config}.yaml"),
        "--data.data", str(ROOT / "data" / "chaos-t2-demo"),
        "--data.cache_dir", str(cache),
        "--data.image_size", "64",
        "--data.batch_size", "4",
        "--model.init_args.backbone.init_args.width", "4",
        "--model.init_args.backbone.init_args.depth", "3",
        "--trainer.max_steps", "2",
        "--trainer.limit_train_batches", "2",
        "--trainer.log_every_n_steps", "1",
        "--trainer.limit_val_batches", "1",
        "--trainer.check_val_every_n_epoch", "1",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def last_checkpoint(out: Path) -> Path:
    found = sorted(out.rglob("last.ckpt"))
    assert found, f"no last.ckpt under {out}"
    return found[-1]


def metrics(out: Path) -> list[dict[str, str]]:
    import csv

    rows: list[dict[str, str]] = []
    for path in sorted(out.rglob("metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


@pytest.mark.parametrize("config", ["moco", "lrc_only", "supervised_lrc", "moco_lrc_3d"])
def test_pretraining_configs_train_on_real_data(config: str, tmp_path: Path, cache: Path) -> None:
    extra = ["--data.patch_size", "[8, 16, 16]", "--model.init_args.backbone.init_args.depth",
             "2"] if config.endswith("_3d") else []  # fmt: skip
    assert main(["fit", *small_run(config, tmp_path, cache), *extra]) == 0
    ckpt = torch.load(last_checkpoint(tmp_path), weights_only=True)
    assert ckpt["global_step"] == 2
    logged = {k for row in metrics(tmp_path) for k, v in row.items() if v}
    expected = {"moco": "train/moco_loss", "lrc_only": "train/lrc_loss_step",
                "supervised_lrc": "train/lrc_loss_step",
                "moco_lrc_3d": "train/lrc_loss_step"}[config]  # fmt: skip
    assert expected in logged
    if config == "lrc_only":
        assert not any(k.startswith("key_backbone.") for k in ckpt["state_dict"])


def test_pretrain_export_finetune_test(tmp_path: Path, cache: Path, capsys) -> None:
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    assert main(["fit", *small_run("moco_lrc", pre, cache)]) == 0
    ckpt_path = last_checkpoint(pre)
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert int(ckpt["state_dict"]["queue_ptr"]) == 2 * 2 * 4  # 2 steps x 2 views x batch 4

    exported = tmp_path / "backbone.pt"
    assert main(["export", "--ckpt", str(ckpt_path), "--out", str(exported)]) == 0
    meta = json.loads(exported.with_name("backbone.pt.json").read_text())
    assert meta["backbone"]["init_args"] == {"in_channels": 1, "width": 4, "depth": 3,
                                             "norm": "batch"}  # fmt: skip
    # Plain PyTorch: rebuild from the json and load strictly.
    plain = UNet2d(**meta["backbone"]["init_args"])
    plain.load_state_dict(torch.load(exported, weights_only=True), strict=True)
    expected = {k[len("backbone.") :]: v for k, v in ckpt["state_dict"].items()
                if k.startswith("backbone.")}  # fmt: skip
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, expected[key])

    for source in (exported, ckpt_path):  # the exported file and the raw checkpoint
        out = fine / source.suffix[1:]
        assert main(["fit", *small_run("finetune", out, cache,
                     "--model.init_args.pretrained", str(source))]) == 0  # fmt: skip
        rows = metrics(out)
        dice = [float(r["val/dice_mean"]) for r in rows if r.get("val/dice_mean")]
        assert dice and all(0.0 <= d <= 1.0 for d in dice)
        organs = {k for r in rows for k in r if k.startswith("val/dice_")}
        assert {"val/dice_liver", "val/dice_spleen"} <= organs
        assert list((out).rglob("val_predictions_step*_0.png")), "prediction panel missing"
        assert list((out).rglob("val_dice_table_step*.csv")), "Dice table missing"

    best = last_checkpoint(fine / "pt")
    assert main(["test", *small_run("finetune", fine / "test", cache,
                 "--ckpt_path", str(best))]) == 0  # fmt: skip
    test_rows = metrics(fine / "test")
    assert any(r.get("test/dice_mean") for r in test_rows)


def test_resume_keeps_the_command_line_over_the_checkpoint(tmp_path: Path, cache: Path) -> None:
    """LightningCLI merges a checkpoint's hyper-parameters over the parsed config: an LRC
    option given on the command line is put back (and said), one from a config file is
    taken from the checkpoint with a warning; a head size given on the command line is
    then an error naming it (not a state_dict size mismatch)."""
    pre = tmp_path / "pre"
    assert main(["fit", *small_run("moco_lrc", pre, cache, "--trainer.max_steps", "1")]) == 0
    ckpt = str(last_checkpoint(pre))
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  init_args:\n    queue_size: 64\n")
    resumed = tmp_path / "resumed"
    args = small_run("moco_lrc", resumed, cache, "--config", str(override), "--ckpt_path", ckpt,
                     "--model.init_args.lrc.weight", "1.0")  # fmt: skip
    with pytest.warns(UserWarning, match=r"Kept from the command line: "
                      r"--model\.init_args\.lrc\.weight=1\.0 \(checkpoint: 0\.3\)\. Taken from "
                      r"the checkpoint: model\.init_args\.queue_size=1024 \(config: 64\)"):
        assert main(["fit", *args]) == 0
    state = torch.load(last_checkpoint(resumed), weights_only=True)
    assert state["global_step"] == 2 and state["hyper_parameters"]["lrc"]["weight"] == 1.0
    weights = [float(r["train/lrc_weight"]) for r in metrics(resumed) if r.get("train/lrc_weight")]
    assert weights == [pytest.approx(1.0 * 1 / 100)]  # lambda = weight * step / warmup_steps
    with pytest.raises(ValueError, match=r"(?s)cannot resume MoCoV2LRC.*embedding_dim 128 in "
                       r"the checkpoint, 64 now"):  # fmt: skip
        main(["fit", *small_run("moco_lrc", tmp_path / "other", cache, "--ckpt_path", ckpt,
              "--model.init_args.lrc.embedding_dim", "64")])  # fmt: skip


def test_finetune_with_wrong_backbone_lists_keys(tmp_path: Path, cache: Path) -> None:
    weights = tmp_path / "wide.pt"
    torch.save(UNet2d(width=8, depth=3).state_dict(), weights)
    with pytest.raises(ValueError, match=r"wide\.pt.*\n.*shape mismatch"):
        main(["fit", *small_run("finetune", tmp_path, cache,
              "--model.init_args.pretrained", str(weights))])  # fmt: skip


def test_precompute_subcommand_fills_cache(tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    args = ["precompute", "--config", str(CONFIGS / "moco_lrc.yaml"),
            "--data.data", str(ROOT / "data" / "chaos-t2-demo"), "--data.cache_dir", str(cache),
            "--data.image_size", "32"]  # fmt: skip
    assert main([*args, "--data.shard", "0/2"]) == 0
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    assert main(args) == 0
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 4
    assert "4 case(s) ready" in capsys.readouterr().out


def test_export_errors_name_the_file(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "missing.ckpt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_lists_extra_subcommands(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "precompute" in out and "export" in out and "fit" in out


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_print_config(config: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / f"{config}.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: lrc_lightning.models." in out
    assert "data: data/chaos-t2-demo" in out


def test_supervised_config_pretrains_on_the_labelled_cases_only(cache: Path) -> None:
    """The paper's supervised setting pre-trains on the labelled cases: with k = 1, one
    patient's labels, not every pool case's (which a fine-tuning at k = 1 would then have
    seen)."""
    import yaml

    from lrc_lightning import LRCDataModule

    data = yaml.safe_load((CONFIGS / "supervised_lrc.yaml").read_text())["data"]
    data.update(data=str(ROOT / "data" / "chaos-t2-demo"), cache_dir=str(cache), image_size=64)
    module = LRCDataModule(**data)
    module.setup("fit")
    assert module.split is not None and len(module.split.pool) == 2
    pretrained = {v.case_id for v in module.train_dataset().volumes}
    assert pretrained == {c.case_id for c in module.split.labelled} and len(pretrained) == 1
