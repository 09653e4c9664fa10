"""Field-standard segmentation metrics of one binary prediction against its reference, in mm; and the one hard
Dice that training, validation and the engines use.

Dice, IoU, HD95, average symmetric surface distance and normalised surface Dice come from MONAI's
implementations (`monai.metrics.compute_*`, the functions behind `DiceMetric`, `MeanIoU`,
`HausdorffDistanceMetric(percentile=95)`, `SurfaceDistanceMetric(symmetric=True)` and `SurfaceDiceMetric`), with
the voxel spacing. Both masks are first cropped to the bounding box of their union with a one-voxel border of
background, which changes no value and makes the surface metrics cost the structure's size, not the image's.

Conventions where a mask is empty (the reference never is in an evaluation):

- empty prediction: Dice = IoU = NSD = 0, HD95 = ASSD = inf (written `inf` in results.csv; summaries average
  the finite values and count the others);
- Dice/IoU/NSD of two empty masks: 1, HD95/ASSD: 0.

`noc` is the number of clicks to reach a Dice threshold (NoC@80/85/90 with 0.80/0.85/0.90), capped at the click
budget: a target that never reaches it counts as the budget and as a failure (RITM's convention).
"""

import math
import warnings

import numpy as np
import torch

NSD_TOLERANCE_MM = 2.0
NOC_THRESHOLDS = (0.80, 0.85, 0.90)
METRICS = ("dice", "iou", "hd95", "assd", "nsd", "volume_error")


def dice(pred, target) -> float:
    """Hard Dice of two binary masks (numpy or torch, any shape); 1 when both are empty."""

    def as_tensor(x):
        return x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))

    return float(batch_dice(as_tensor(pred)[None], as_tensor(target)[None])[0])


def batch_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) hard Dice per sample of two (B, ...) binary masks (bool, or > 0.5); 1 where both are empty."""
    p, t = (pred > 0.5).flatten(1), (target > 0.5).flatten(1)
    total = (p.sum(1) + t.sum(1)).float()
    overlap = 2 * (p & t).sum(1).float()
    return torch.where(total > 0, overlap / total.clamp_min(1), torch.ones_like(total))


def _crop_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    union = pred | gt
    idx = [np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    sl = tuple(slice(i[0], i[-1] + 1) for i in idx)
    return np.pad(pred[sl], 1), np.pad(gt[sl], 1)


def segmentation_metrics(pred, gt, spacing=(1.0, 1.0, 1.0), nsd_tolerance_mm: float = NSD_TOLERANCE_MM) -> dict:
    """dice, iou, hd95 (mm), assd (mm), nsd (at `nsd_tolerance_mm`), volume_error ((|P| - |G|) / |G|)."""
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
        compute_surface_dice,
    )

    pred = np.asarray(pred) != 0
    gt = np.asarray(gt) != 0
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the reference's {gt.shape}")
    spacing = [float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))]
    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    volume_error = (n_pred - n_gt) / n_gt if n_gt else (0.0 if n_pred == 0 else math.inf)
    if n_pred == 0 and n_gt == 0:
        return {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0, "volume_error": 0.0}
    if n_pred == 0 or n_gt == 0:
        return {"dice": 0.0, "iou": 0.0, "hd95": math.inf, "assd": math.inf, "nsd": 0.0, "volume_error": volume_error}

    p, g = _crop_pair(pred, gt)
    p = torch.from_numpy(p)[None, None].float()
    g = torch.from_numpy(g)[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's deprecation notices inside get_mask_edges
        out = {
            "dice": compute_dice(p, g, include_background=True),
            "iou": compute_iou(p, g, include_background=True),
            "hd95": compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=spacing),
            "assd": compute_average_surface_distance(p, g, include_background=True, symmetric=True, spacing=spacing),
            "nsd": compute_surface_dice(p, g, [float(nsd_tolerance_mm)], include_background=True, spacing=spacing),
        }
    out = {k: float(v.reshape(-1)[0]) for k, v in out.items()}
    out["volume_error"] = volume_error
    return out


def noc(dices, threshold: float, budget: int | None = None) -> tuple[int, bool]:
    """(clicks to reach `threshold`, failed): the first 1-based click with Dice >= threshold, else (budget, True)."""
    dices = list(dices)
    budget = len(dices) if budget is None else int(budget)
    for i, d in enumerate(dices[:budget], start=1):
        if d is not None and not math.isnan(d) and d >= threshold:
            return i, False
    return budget, True
