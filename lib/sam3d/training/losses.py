"""Segmentation losses on mask logits: DiceCE (SAM-Med3D) and Dice + focal (SegSAM-3D), from MONAI."""

from monai.losses import DiceCELoss, DiceFocalLoss
from torch import nn

LOSSES = ("dice_ce", "dice_focal")


def build_loss(name: str = "dice_ce", **kwargs) -> nn.Module:
    """A loss of (logits (B, 1, ...), binary target (B, 1, ...)); sigmoid inside, averaged over the batch."""
    if name == "dice_ce":
        return DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean", **kwargs)
    if name == "dice_focal":
        return DiceFocalLoss(sigmoid=True, squared_pred=True, reduction="mean", **kwargs)
    raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
