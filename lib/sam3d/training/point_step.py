"""The point models' step (SAM-Med3D's ViT, the early-fusion click network): a first prompt, then corrective
clicks on the errors of the previous answer (`sam3d.training.interactive`), on windows of `WindowDataset`."""

from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from ..data.training import WindowDataset
from .interactive import InteractiveConfig, _batch_last_round, _sample_rounds, click_config
from .losses import loss_from_recipe
from .step import TrainingStep
from .validation import validate


class PointStep(TrainingStep):
    """`forward(images, labels, seeds, clicks)` -> (mean loss over the micro-batch, Dice per round averaged over it).
    `clicks` (B, 3): a sample's given first click (a click on air, whose answer is empty), or -1s."""

    batch_keys = ("click",)

    def __init__(self, sam: nn.Module, cfg: InteractiveConfig, loss_fn: nn.Module, autocast=None) -> None:
        super().__init__()
        self.sam, self.cfg, self.loss_fn = sam, cfg, loss_fn
        self.autocast = autocast or nullcontext

    @classmethod
    def from_recipe(cls, model, recipe, root, sidecar, engine_cfg, autocast) -> "PointStep":
        return cls(model, click_config(recipe, engine_cfg), loss_from_recipe(recipe), autocast)

    def dataset(self, volumes, engine_cfg, sampling, seed: int) -> WindowDataset:
        return WindowDataset(volumes, engine_cfg, sampling, seed=seed)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, seeds, clicks=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        core, cfg = self.sam, self.cfg
        given = [None] * len(seeds)
        if clicks is not None:
            given = [tuple(int(v) for v in c) if c[0] >= 0 else None for c in clicks]
        with self.autocast():
            emb = core.encode_image(images)
        if cfg.grad_rounds == "last":
            return _batch_last_round(core, emb, labels, seeds, cfg, self.loss_fn, self.autocast, given)
        total = images.new_zeros((), dtype=torch.float32)
        dice_rounds = np.zeros(cfg.rounds)
        for b in range(images.shape[0]):
            loss_b, dice_b = _sample_rounds(
                core,
                emb[b : b + 1],
                labels[b : b + 1],
                int(seeds[b]),
                cfg,
                self.loss_fn,
                self.autocast,
                core.img_size,
                first_click=given[b],
            )
            total = total + loss_b
            dice_rounds += dice_b
        n = images.shape[0]
        return total / n, torch.as_tensor(dice_rounds / n, dtype=torch.float32)

    def validate(self, dataset, samples: int, clicks: int, device) -> dict:
        return validate(self.sam, dataset, samples, clicks, self.cfg, self.loss_fn, self.autocast, device)
