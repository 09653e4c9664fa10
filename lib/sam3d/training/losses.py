"""Segmentation losses on mask logits: DiceCE (SAM-Med3D) and Dice + focal (SegSAM-3D), from MONAI.

`dice_ce` with `balanced: true` averages the binary cross-entropy over the target's voxels and over the rest
separately and takes the mean of the two: a 1000-voxel target in a 128^3 window otherwise weighs 1/2000 of the
CE, and a network that starts by predicting nothing stays there (the sigmoid saturates and Dice's gradient
vanishes with it; the CE gradient does not, but is spread over 2M voxels). This is what the CPU recipe uses.
"""

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss
from torch import nn

LOSSES = ("dice_ce", "dice_focal")


class BalancedDiceCELoss(nn.Module):
    """Dice (MONAI, sigmoid) + mean of the BCE over target voxels and over background voxels."""

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, squared_pred: bool = False) -> None:
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, squared_pred=squared_pred, reduction="mean")
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        fg = target > 0.5
        parts = [ce[m].mean() for m in (fg, ~fg) if bool(m.any())]
        return self.lambda_dice * self.dice(logits, target) + self.lambda_ce * torch.stack(parts).mean()


class EmptyTargetPenalty(nn.Module):
    """`loss` plus, for each sample whose target is empty (a click on air), log(1 + V / `voxels`) of its soft
    predicted volume V, averaged over the batch. Dice gives a false blob on an empty target no gradient (its
    numerator is 0 whatever the blob's size) and the CE spreads its push over the whole window; this term is 0
    for an empty answer and pushes each voxel of a blob by 1 / (V + `voxels`), as Dice pushes a false positive
    beside a target of about that size."""

    def __init__(self, loss: nn.Module, voxels: float) -> None:
        super().__init__()
        self.loss, self.voxels = loss, float(voxels)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = self.loss(logits, target)
        empty = target.flatten(1).amax(1) < 0.5
        if bool(empty.any()):
            volume = torch.sigmoid(logits[empty].float()).flatten(1).sum(1)
            out = out + torch.log1p(volume / self.voxels).sum() / logits.shape[0]
        return out


def build_loss(name: str = "dice_ce", balanced: bool = False, empty_target_voxels: float = 0.0, **kwargs) -> nn.Module:
    """A loss of (logits (B, 1, ...), binary target (B, 1, ...)); sigmoid inside, averaged over the batch.
    `empty_target_voxels` > 0 adds `EmptyTargetPenalty` with that scale."""
    loss = _segmentation_loss(name, balanced, **kwargs)
    return EmptyTargetPenalty(loss, empty_target_voxels) if empty_target_voxels > 0 else loss


def _segmentation_loss(name: str, balanced: bool, **kwargs) -> nn.Module:
    if name == "dice_ce":
        if balanced:
            return BalancedDiceCELoss(**kwargs)
        return DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean", **kwargs)
    if name == "dice_focal":
        if balanced:
            raise ValueError("balanced applies to dice_ce; dice_focal weights the hard voxels itself")
        return DiceFocalLoss(sigmoid=True, squared_pred=True, reduction="mean", **kwargs)
    raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")


def loss_from_recipe(recipe: dict) -> nn.Module:
    """The recipe's `loss` section (`name` and the loss's settings); Dice + CE when it has none."""
    settings = dict(recipe.get("loss") or {})
    return build_loss(settings.pop("name", "dice_ce"), **settings)
