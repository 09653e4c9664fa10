"""The 3D candidate for the automatic model (issue 19): the click model's backbone with one input and K + 1 outputs.

A MONAI SegResNet as in `sam3d.models.clicknet` (the same stages and widths), but the image alone goes in and the
logits of background + the K classes come out, for a window of `img_size`^3 voxels on the model grid.
`sam3d.engine.auto.AutoEngine` runs it over a whole volume by sliding windows; `sam3d.training.auto_window_step`
trains it on windows. It is the equal-budget rival of the slice model 3D-SAutoMed (`sam3d.models.autosam3d`),
compared by configs/ablations/auto_backbone.yaml.
"""

from dataclasses import asdict, dataclass, fields

import torch
from monai.networks.nets import SegResNet
from torch import nn


@dataclass(frozen=True)
class AutoSeg3DConfig:
    class_names: tuple[str, ...] = ("spleen", "kidney_right", "kidney_left", "liver", "stomach")
    img_size: int = 64  # the window's side in voxels, in training and in the sliding-window inference
    filters: int = 8  # channels of the first stage; each deeper stage doubles them (the click model's)
    blocks_down: tuple[int, ...] = (1, 2, 2, 4)  # residual blocks per encoder stage (the click model's)

    @classmethod
    def from_dict(cls, values: dict) -> "AutoSeg3DConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})  # YAML/JSON give lists

    def __post_init__(self) -> None:
        problems = []
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            problems.append("class_names must be distinct names, at least one")
        if not self.blocks_down:
            problems.append("blocks_down needs at least one stage")
        elif self.img_size % (2 ** (len(self.blocks_down) - 1)):
            problems.append(f"img_size must be divisible by 2^{len(self.blocks_down) - 1} (the encoder's strides)")
        if self.filters % 8:
            problems.append("filters must be a multiple of 8 (SegResNet's group norm has 8 groups)")
        if problems:
            raise ValueError("invalid network config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


AUTOSEG3D_PRESETS: dict[str, AutoSeg3DConfig] = {
    # the five large abdominal organs of the shipped slice model, on 64^3 windows of the click model's 2 mm grid
    "autoseg3d_small": AutoSeg3DConfig(class_names=("spleen", "kidney_right", "kidney_left", "liver", "stomach")),
}


class AutoSeg3D(nn.Module):
    """(B, 1, S, S, S) normalised image -> (B, 1 + K, S, S, S) logits, background first."""

    def __init__(self, config: AutoSeg3DConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or AutoSeg3DConfig()
        self.img_size = c.img_size
        self.class_names = list(c.class_names)
        self.net = SegResNet(
            spatial_dims=3,
            init_filters=c.filters,
            in_channels=1,
            out_channels=len(c.class_names) + 1,
            blocks_down=c.blocks_down,
            blocks_up=(1,) * (len(c.blocks_down) - 1),
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
