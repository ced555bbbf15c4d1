"""Diagnose the readout on VALIDATION patients (never test): where do kidney pixels go?
usage: diag.py NAME SEED PATIENT[,PATIENT] [benchmark options...]"""

import json
import sys
import time

import numpy as np
import pytorch_lightning as pl
import torch

from lrc_lightning.evaluation.label_efficiency import Benchmark, build_parser
from lrc_lightning.models import FineTuneSegmentation

name, seed, patients, *rest = sys.argv[1:]
args = build_parser().parse_args(
    [
        "--data",
        "/work/shared/data/chaos-t2",
        "--size",
        "128",
        "--width",
        "8",
        "--depth",
        "4",
        "--cache-dir",
        "/work/runs/cache",
        "--work-dir",
        "/work/runs/work",
        "--out",
        "/work/runs/diag",
        "--channels-last",
        "--threads",
        "1",
        "--test-ids",
        "chaos_t2_001",
        "chaos_t2_002",
        "chaos_t2_015",
        "chaos_t2_021",
        "chaos_t2_033",
        "chaos_t2_038",
        "--val-ids",
        "chaos_t2_031",
        "chaos_t2_034",
        "chaos_t2_037",
        "--val-every",
        "0",
        "--patience",
        "0",
        *rest,
    ]
)
torch.set_num_threads(1)
bench = Benchmark(args)
a = bench.args
pl.seed_everything(int(seed), workers=True)
labelled = patients.split(",")
model = FineTuneSegmentation(
    bench.backbone(),
    num_classes=bench.num_classes,
    class_names=bench.organs,
    lr=a.finetune_lr or a.lr,
    warmup_steps=a.finetune_steps // 10,
)
dm = bench.datamodule(
    None, labelled, mode="finetune", intensity_scale=tuple(a.finetune_intensity_scale)
)
t = time.perf_counter()
bench._fit(a.finetune_steps, model, dm)
model.eval()
C = bench.num_classes
out = {"name": name, "argv": rest, "s": round(time.perf_counter() - t)}
for stage, cases in (("train", dm.split.labelled), ("val", dm.split.val)):
    conf = np.zeros((C, C), int)
    for v in dm.volumes(cases):
        img = torch.from_numpy(np.asarray(v.image, dtype=np.float32)).unsqueeze(1)
        pred = model.predict_volume(img).numpy().ravel()
        true = v.label_ids().ravel()
        keep = true >= 0
        pred, true = pred[keep], true[keep]
        conf += np.bincount(true * C + pred, minlength=C * C).reshape(C, C)
    dice = [2 * conf[c, c] / (conf[c].sum() + conf[:, c].sum()) for c in range(1, C)]
    out[stage] = {"dice": np.round(dice, 3).tolist(), "confusion_true_x_pred": conf.tolist()}
    print(name, stage, "dice", np.round(dice, 3).tolist(), flush=True)
    print(conf, flush=True)
json.dump(out, open(f"/work/runs/diag/{name}.json", "w"), indent=1)
