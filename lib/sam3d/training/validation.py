"""Click validation of a point or text model on fixed windows: `center` clicks, Dice per click, HD95 and NSD last."""

from dataclasses import replace

import numpy as np
import torch

from ..metrics import dice, segmentation_metrics
from .interactive import _sample_rounds


@torch.no_grad()
def validate(model, dataset, samples: int, clicks: int, icfg, loss_fn, autocast, device) -> dict:
    """`center` clicks on the first `samples` (unaugmented) windows of `dataset`; Dice per click, and at the last
    click HD95 and NSD from the harness's metrics."""
    was_training = model.training
    model.eval()
    cfg = replace(icfg, rounds=clicks, mask_only_rounds=0, protocols=("center",), protocol_probs=(1.0,), box_prob=0.0)
    dice_sum = np.zeros(clicks)
    last = {"hd95": [], "nsd": []}
    spacing = (cfg.spacing_mm,) * 3
    for i in range(samples):
        item = dataset[i]
        img, lab = item["image"][None].to(device), item["label"][None].to(device)
        gt = item["label"][0].numpy() > 0.5
        with autocast():
            emb = model.encode_image(img)

        def on_round(r, pred, gt=gt):
            m = segmentation_metrics(pred, gt, spacing) if r == clicks else {"dice": dice(pred, gt)}
            dice_sum[r - 1] += m["dice"]
            if r == clicks:
                last["hd95"].append(m["hd95"])
                last["nsd"].append(m["nsd"])

        _sample_rounds(model, emb, lab, item["seed"], cfg, loss_fn, autocast, model.img_size, on_round)
    model.train(was_training)
    row = {f"dice_{k + 1}": float(d / samples) for k, d in enumerate(dice_sum)}
    finite = [h for h in last["hd95"] if np.isfinite(h)]
    row["hd95_last"] = float(np.mean(finite)) if finite else float("inf")
    row["nsd_last"] = float(np.mean(last["nsd"]))
    return row
