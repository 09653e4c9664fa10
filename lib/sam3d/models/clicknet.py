"""The early-fusion click model: prompts enter as input channels beside the image, as in nnInteractive and DeepGrow.

One window (B, 1, S, S, S) and its prompts become five channels: the image, the previous mask (binary), a map of
the positive clicks, one of the negative clicks (a Gaussian ball per click, the maximum where they meet) and the
box (1 inside, 0 outside). A MONAI network turns them into the logits of the window at full resolution. Nothing
is cached between clicks but the window itself, so the whole network runs again on every click: it is sized for
that on a CPU.

It speaks the same interface as the late-fusion ViT (`sam3d.models.sam3d.Sam3D`): `encode_image` (here the
window itself), `decode(points, boxes, mask_input)`, `img_size`, `low_res_size` (= `img_size`), `supports_boxes`,
so the engine, the training step and the evaluation serve either family unchanged.
"""

from dataclasses import asdict, dataclass, fields

import torch
from monai.networks.nets import DynUNet, SegResNet
from torch import nn

PROMPT_CHANNELS = 4  # previous mask, positive clicks, negative clicks, box


@dataclass(frozen=True)
class ClickNetConfig:
    img_size: int = 64
    backbone: str = "segresnet"  # segresnet (MONAI SegResNet) | dynunet (nnU-Net's residual UNet, MONAI DynUNet)
    filters: int = 8  # channels of the first stage; each deeper stage doubles them
    blocks_down: tuple[int, ...] = (1, 2, 2, 4)  # residual blocks per encoder stage (segresnet)
    click_sigma: float = 2.0  # voxels: the radius of a click's ball in the prompt maps

    @classmethod
    def from_dict(cls, values: dict) -> "ClickNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}; known: {sorted(known)}")
        values = dict(values)
        if "blocks_down" in values:
            values["blocks_down"] = tuple(values["blocks_down"])
        return cls(**values)

    def __post_init__(self) -> None:
        stages = len(self.blocks_down)
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {sorted(BACKBONES)}")
        if self.img_size % (2 ** (stages - 1)):
            raise ValueError(f"img_size {self.img_size} must be divisible by 2^{stages - 1} (the encoder's strides)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks_down"] = list(self.blocks_down)
        return d


def _segresnet(c: ClickNetConfig, in_channels: int) -> nn.Module:
    return SegResNet(spatial_dims=3, init_filters=c.filters, in_channels=in_channels, out_channels=1,
                     blocks_down=c.blocks_down, blocks_up=(1,) * (len(c.blocks_down) - 1))


def _dynunet(c: ClickNetConfig, in_channels: int) -> nn.Module:
    n = len(c.blocks_down)
    return DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=1, kernel_size=[3] * n,
                   strides=[1] + [2] * (n - 1), upsample_kernel_size=[2] * (n - 1),
                   filters=[c.filters * 2**i for i in range(n)], res_block=True)


BACKBONES = {"segresnet": _segresnet, "dynunet": _dynunet}

CLICKNET_PRESETS: dict[str, ClickNetConfig] = {
    "clicknet_small": ClickNetConfig(),
    "clicknet_dynunet": ClickNetConfig(backbone="dynunet", filters=8, blocks_down=(1, 1, 1, 1, 1)),
}


class ClickNet3D(nn.Module):
    """Image + prompt maps -> logits of the window; see the module's docstring."""

    def __init__(self, config: ClickNetConfig) -> None:
        super().__init__()
        self.config = config
        self.net = BACKBONES[config.backbone](config, 1 + PROMPT_CHANNELS)
        s = config.img_size
        axis = torch.arange(s, dtype=torch.float32)
        self.register_buffer("_grid", torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1),
                             persistent=False)  # (S, S, S, 3) voxel indices

    @property
    def img_size(self) -> int:
        return self.config.img_size

    @property
    def low_res_size(self) -> int:
        return self.config.img_size  # the previous answer comes back at full resolution

    @property
    def supports_boxes(self) -> bool:
        return True

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S, S) normalised window -> itself: early fusion has no prompt-free part to cache."""
        return image

    def prompt_maps(self, batch: int, points=None, boxes=None, mask_input=None) -> torch.Tensor:
        """(B, 4, S, S, S): previous mask (logits > 0), positive and negative click balls, box."""
        s, grid = self.img_size, self._grid
        maps = grid.new_zeros((batch, PROMPT_CHANNELS, s, s, s))
        if mask_input is not None:
            if mask_input.shape[-3:] != (s, s, s):
                mask_input = nn.functional.interpolate(mask_input.float(), size=(s, s, s), mode="trilinear",
                                                       align_corners=False)
            maps[:, 0] = (mask_input[:, 0] > 0).float()
        if points is not None:
            coords, labels = points  # (B, N, 3) window voxel indices, (B, N): 1 positive, 0 negative, -1 padding
            d2 = ((grid.view(1, 1, -1, 3) - coords.float()[:, :, None, :]) ** 2).sum(-1)  # (B, N, S^3)
            balls = torch.exp(-d2 / (2 * self.config.click_sigma**2))
            for channel, value in ((1, 1), (2, 0)):
                chosen = (labels == value)[..., None].float()
                maps[:, channel] = (balls * chosen).amax(1).view(batch, s, s, s) if coords.shape[1] else 0
        if boxes is not None:  # (B, 2, 3) inclusive corners (lo, hi) in window voxel indices
            lo, hi = boxes[:, 0].float(), boxes[:, 1].float()
            inside = ((grid[None] >= lo[:, None, None, None] - 0.5) & (grid[None] <= hi[:, None, None, None] + 0.5)).all(-1)
            maps[:, 3] = inside.float()
        return maps

    def decode(self, image_embedding: torch.Tensor, points=None, boxes=None, mask_input=None,
               multimask_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in window voxel indices -> (logits (B, 1, S, S, S), confidence (B, 1)).

        The confidence is the mean probability over the voxels called foreground (0 when none is), a cheap
        stand-in for SAM's IoU head.
        """
        x = torch.cat([image_embedding, self.prompt_maps(image_embedding.shape[0], points, boxes, mask_input)
                       .to(image_embedding.dtype)], dim=1)
        logits = self.net(x)
        with torch.no_grad():
            prob = torch.sigmoid(logits.float())
            fg = prob > 0.5
            score = (prob * fg).flatten(1).sum(1) / fg.flatten(1).sum(1).clamp_min(1)
        return logits, score[:, None]
