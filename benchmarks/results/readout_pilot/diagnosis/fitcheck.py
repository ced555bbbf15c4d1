"""Does the readout fit the TRAINING patient's kidneys? Plain loop, no Lightning."""

import sys

import numpy as np
import torch
import torch.nn.functional as F

from lrc_lightning.evaluation.label_efficiency import Benchmark, build_parser
from lrc_lightning.models import FineTuneSegmentation
from lrc_lightning.models.metrics import soft_dice_loss

torch.set_num_threads(1)
mode = sys.argv[1]
LR = float(sys.argv[2])
STEPS = int(sys.argv[3])
WIDTH = sys.argv[4]
HEAD = sys.argv[5]
args = build_parser().parse_args(
    [
        "--data",
        "/work/shared/data/chaos-t2",
        "--size",
        "128",
        "--width",
        WIDTH,
        "--depth",
        "4",
        "--cache-dir",
        "/work/runs/cache",
        "--work-dir",
        "/work/runs/work",
        "--out",
        "/work/runs/diag",
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
    ]
)
b = Benchmark(args)
torch.manual_seed(1)
m = FineTuneSegmentation(b.backbone(), num_classes=5, class_names=b.organs)
dm = b.datamodule(None, ["chaos_t2_005"], mode="finetune", augment=(mode != "noaug"))
dm.prepare_data()
dm.setup("fit")
if HEAD == "mlp":
    import torch.nn as nn

    w = int(WIDTH)
    m.head = nn.Sequential(
        nn.Conv2d(w, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 5, 1)
    )
opt = torch.optim.AdamW(m.parameters(), LR, weight_decay=1e-4)
step = 0
vol = dm.volumes(dm.split.labelled)[0]
img = torch.from_numpy(np.asarray(vol.image, np.float32)).unsqueeze(1)
lab = vol.label_ids()
print("per-slice organ px", [(lab == c).sum() for c in range(5)])
while step < STEPS:
    for batch in dm.train_dataloader():
        logits = m(batch["image"])
        if mode == "ce":
            loss = F.cross_entropy(logits, batch["label"], ignore_index=-1)
        elif mode == "dice":
            loss = soft_dice_loss(logits, batch["label"])
        else:
            loss = m.segmentation_loss(logits, batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            m.eval()
            with torch.no_grad():
                p = m.predict_volume(img).numpy()
            m.train()
            with torch.no_grad():
                pt = torch.cat([m(c).argmax(1) for c in img.split(16)]).numpy()
            dt = [
                round(
                    2
                    * ((pt == c) & (lab == c)).sum()
                    / ((pt == c).sum() + (lab == c).sum() + 1e-9),
                    3,
                )
                for c in range(1, 5)
            ]
            d = [
                round(
                    2 * ((p == c) & (lab == c)).sum() / ((p == c).sum() + (lab == c).sum() + 1e-9),
                    3,
                )
                for c in range(1, 5)
            ]
            cnt = [(batch["label"] == c).sum().item() for c in range(5)]
            print(
                mode, step, round(loss.item(), 3), "train-vol dice", d, "trainmode", dt, flush=True
            )
        if step >= STEPS:
            break
