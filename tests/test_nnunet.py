"""nnU-Net for real: its own planning and preprocessing of a tiny CHAOS dataset, LRC
pre-training of the network it plans, and its own load_pretrained_weights on the export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DEMO_MR, require_thirdparty
from .helpers import write_tiny_chaos_volumes

pytestmark = pytest.mark.thirdparty

DATASET = "Dataset901_ChaosTiny"


def write_tiny_raw_dataset(raw: Path) -> Path:
    """The four shipped CHAOS T2 patients, 12 central slices, in-plane 64 x 64 (5 mm), as
    an nnU-Net raw dataset (imagesTr/<case>_0000.nii.gz, labelsTr, dataset.json)."""
    folder = raw / DATASET
    cases = write_tiny_chaos_volumes(folder, nnunet_names=True)
    labels = json.loads((DEMO_MR / "dataset.json").read_text())["labels"]
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2"},  # not "CT": z-score normalisation
        "labels": {name: int(value) for value, name in labels.items()},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }))  # fmt: skip
    return folder


def _nnunet_env(root: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), OMP_NUM_THREADS="1",
               nnUNet_compile="false", **extra)  # fmt: skip
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, encoding="utf-8",
                          errors="replace", timeout=900)  # fmt: skip
    assert done.returncode == 0, f"{args[:3]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory) -> Path:
    """nnU-Net's own nnUNetv2_plan_and_preprocess (2d and 3d_fullres) of the tiny dataset;
    a fixed split (4 cases are fewer than nnU-Net's 5 folds)."""
    require_thirdparty("nnunetv2")
    root = tmp_path_factory.mktemp("nnunet")
    write_tiny_raw_dataset(root / "raw")
    command = Path(sys.executable).with_name("nnUNetv2_plan_and_preprocess")
    _run([str(command), "-d", "901", "-c", "2d", "3d_fullres", "-np", "1",
          "--verify_dataset_integrity"], _nnunet_env(root), root)  # fmt: skip
    folder = root / "preprocessed" / DATASET
    split = [{"train": ["chaos_t2_001", "chaos_t2_002", "chaos_t2_003"], "val": ["chaos_t2_005"]}]
    (folder / "splits_final.json").write_text(json.dumps(split))
    return folder


#: Run with nnU-Net's environment: its trainer (as nnUNetv2_train builds it, on the CPU)
#: loads the file with its own load_pretrained_weights; then `iterations` steps of its own
#: training start from it.
_NNUNET_LOADS = """
import sys, torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.run.run_training import get_trainer_from_args
configuration, weights, checkpoint, iterations = sys.argv[1:4] + [int(sys.argv[4])]
trainer = get_trainer_from_args("901", configuration, 0, "nnUNetTrainer", "nnUNetPlans",
                                device=torch.device("cpu"))
trainer.initialize()
fresh = {k: v.clone() for k, v in trainer.network.state_dict().items()}
load_pretrained_weights(trainer.network, weights)
pretrained = torch.load(checkpoint, weights_only=False)["state_dict"]
loaded, same, changed = trainer.network.state_dict(), 0, 0
for key, value in loaded.items():
    if ".seg_layers." in key:  # nnU-Net keeps its own output layers
        assert torch.equal(value, fresh[key]), key
        continue
    assert torch.equal(value, pretrained["backbone.network." + key]), key
    same += 1
    changed += not torch.equal(value, fresh[key])
print(f"EQUAL {same} CHANGED {changed} OF {len(loaded)}")
if iterations:
    trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = iterations, 1
    trainer.num_epochs = 1
    trainer.run_training()
    print("TRAINED", trainer.output_folder)
"""


def _nnunet_loads(preprocessed: Path, configuration: str, weights: Path, ckpt: Path,
                  iterations: int) -> tuple[int, int, int]:  # fmt: skip
    root = preprocessed.parents[1]
    script = root / "nnunet_loads.py"
    script.write_text(_NNUNET_LOADS)
    env = _nnunet_env(root, nnUNet_n_proc_DA="0")  # nnU-Net's augmentation in this process
    out = _run([sys.executable, str(script), configuration, str(weights), str(ckpt),
                str(iterations)], env, root)  # fmt: skip
    same, changed, total = map(int, out.split("EQUAL ")[1].split()[::2][:3])
    if iterations:
        assert "TRAINED" in out
    return same, changed, total


def test_2d_pretraining_cli_writes_weights_that_nnunet_loads_and_trains_from(
    preprocessed: Path, tmp_path: Path
) -> None:
    from lrc_lightning.tools.cli import main

    out = tmp_path / "lrc_2d.pth"
    assert main(["nnunet-pretrain", "--dataset", str(preprocessed), "--configuration", "2d",
                 "--out", str(out), "--steps", "2", "--samples-per-epoch", "4",
                 "--queue-size", "16", "--accelerator", "cpu"]) == 0  # fmt: skip
    ckpt = tmp_path / "lrc_2d.pth.run" / "last.ckpt"
    same, changed, total = _nnunet_loads(preprocessed, "2d", out, ckpt, iterations=2)
    # Every tensor but the 4 (weight, bias) pairs of the 4 deep-supervision output layers.
    assert total - same == 8
    assert changed > same // 2  # pre-training moved the weights away from nnU-Net's init

    # Exported again from the checkpoint: the same file content.
    again = tmp_path / "again.pth"
    assert main(["export", "--format", "nnunet", "--ckpt", str(ckpt), "--out", str(again)]) == 0
    import torch

    first, second = (torch.load(p, weights_only=True)["network_weights"] for p in (out, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_3d_fullres_pretraining_trains_the_3d_network_nnunet_loads(
    preprocessed: Path, tmp_path: Path
) -> None:
    from lrc_lightning import LRCConfig
    from lrc_lightning.frameworks.nnunet import NnUNetPretrainData, pretrain

    data = NnUNetPretrainData(preprocessed, "3d_fullres", samples_per_epoch=2)
    batch = next(iter(data.train_dataloader()))
    assert batch["image_v1"].shape == (2, 1, 12, 64, 64)  # the plans' batch and patch size
    assert batch["superpixels_v1"].shape == (2, 12, 64, 64)
    # Supervoxels span slices (3D regions): some region id is on more than one slice.
    ids = batch["superpixels_v1"][0]
    assert any(len({int(z) for z in (ids == r).nonzero()[:, 0]}) > 1 for r in ids.unique()[1:5])

    out = tmp_path / "lrc_3d.pth"
    pretrain(preprocessed, "3d_fullres", out, max_steps=1, samples_per_epoch=2,
             lrc=LRCConfig(feature_level=-2), queue_size=8,
             trainer_options={"accelerator": "cpu", "enable_progress_bar": False})  # fmt: skip
    same, changed, total = _nnunet_loads(preprocessed, "3d_fullres", out,
                                         tmp_path / "lrc_3d.pth.run" / "last.ckpt", 0)  # fmt: skip
    assert total - same == 8 and changed > 0


def test_moco_baseline_without_lrc_exports_weights_that_nnunet_loads(
    preprocessed: Path, tmp_path: Path
) -> None:
    """pretrain(baseline=True): MoCo v2 alone on nnU-Net's network (the benchmark's moco
    arm), no LRC head, its export loaded by nnU-Net; only the encoder was trained."""
    import torch

    from lrc_lightning.nnunet import pretrain

    out = tmp_path / "moco_2d.pth"
    pretrain(preprocessed, "2d", out, max_steps=1, samples_per_epoch=2, batch_size=2,
             queue_size=8, baseline=True,
             trainer_options={"accelerator": "cpu", "enable_progress_bar": False})  # fmt: skip
    ckpt = tmp_path / "moco_2d.pth.run" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert not any(k.startswith("lrc_") for k in saved["state_dict"])
    assert "lrc" not in saved["hyper_parameters"] and saved["hyper_parameters"]["plans"]
    same, changed, total = _nnunet_loads(preprocessed, "2d", out, ckpt, 0)
    assert total - same == 8 and changed > 0
    # The same initialisation again (pretrain seeds with 0 before building the network):
    # MoCo's loss reads the pooled bottleneck only, so the decoder keeps it, the encoder not.
    import pytorch_lightning as pl

    from lrc_lightning.nnunet import NnUNetMoCo, read_nnunet_setup

    pl.seed_everything(0)
    plans, dataset_json, _ = read_nnunet_setup(preprocessed, "2d")
    initial = NnUNetMoCo(plans, dataset_json, "2d").backbone.network.state_dict()
    exported = torch.load(out, weights_only=True)["network_weights"]
    decoder = [k for k in exported if k.startswith("decoder.stages.")]
    assert decoder and all(torch.equal(exported[k], initial[k]) for k in decoder)
    encoder = [k for k in exported if k.startswith("encoder.") and k.endswith(".weight")]
    assert sum(not torch.equal(exported[k], initial[k]) for k in encoder) > len(encoder) // 2


def test_pretraining_reads_only_the_cases_it_is_given(preprocessed: Path) -> None:
    from lrc_lightning.frameworks.nnunet import NnUNetPretrainData

    every = NnUNetPretrainData(preprocessed, "2d").views.identifiers
    assert len(every) >= 2
    kept = NnUNetPretrainData(preprocessed, "2d", cases=every[1:]).views.identifiers
    assert kept == every[1:]  # e.g. the validation patients left out
    with pytest.raises(ValueError, match=r"cases \['nobody'\] are not among its preprocessed"):
        NnUNetPretrainData(preprocessed, "2d", cases=[every[0], "nobody"])


def test_configuration_and_dataset_errors_name_what_to_run(preprocessed: Path, tmp_path) -> None:
    from lrc_lightning.frameworks.nnunet import NnUNetPretrainData, export_nnunet_weights

    with pytest.raises(ValueError, match=r"nnUNetPlans\.json: no configuration '3d_lowres'.*'2d'"):
        NnUNetPretrainData(preprocessed, "3d_lowres")
    with pytest.raises(FileNotFoundError, match="nnUNetv2_plan_and_preprocess"):
        NnUNetPretrainData(tmp_path, "2d")
    with pytest.raises(ValueError, match=r"2D.*3D|3 values.*2D"):
        NnUNetPretrainData(preprocessed, "2d", patch_size=(8, 64, 64))
    import torch

    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"backbone.w": torch.zeros(1)}, "hyper_parameters": {}}, plain)
    with pytest.raises(ValueError, match=r"plain\.ckpt: not a checkpoint of .*NnUNetMoCoLRC"):
        export_nnunet_weights(plain, tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()
