"""The early-fusion click model: prompts enter as input channels beside the image, as in nnInteractive and DeepGrow.

One window (B, 1, S, S, S) and its prompts become five channels: the image, the previous mask (binary), a map of
the positive clicks, one of the negative clicks (a Gaussian ball per click, the maximum where they meet) and the
box (1 inside, 0 outside). A MONAI network turns them into the logits of the window at full resolution. Nothing
is cached between clicks but the window itself, so the whole network runs again on every click: it is sized for
that on a CPU.

SegSAM-3D's two ideas (../shared/papers/segsam3d.txt, eq. 3-9) are options of this family, both off by default and
both zero-initialised, so a network started from the plain weights first answers exactly as they do:
- `feature_stages`: multi-layer feature aggregation (eq. 9). The chosen encoder stages are average-pooled to the
  bottleneck's grid, projected to its width and summed with softmax weights; the sum is added to the bottleneck
  before the decoder (a residual form of eq. 9: a UNet's decoder already takes the deepest stage, and its skips
  the others at their own resolutions).
- `semantic_prompts`: semantic point prompts (eq. 3-8). Per click, the bottleneck feature sampled at the click
  (eq. 4) and its sinusoidal position code (eq. 3) are fused with a learnt global token by cross-attention and an
  MLP (eq. 5-8); SP(p), plus a learnt embedding of the click's sign, modulates the bottleneck features in a
  Gaussian ball around the click (early fusion has no click token to add it to, as the late-fusion decoder has).

It speaks the same interface as the late-fusion ViT (`sam3d.models.sam3d.Sam3D`): `encode_image` (here the
window itself), `decode(points, boxes, mask_input)`, `img_size`, `low_res_size` (= `img_size`), `supports_boxes`,
so the engine, the training step and the evaluation serve either family unchanged.
"""

from dataclasses import asdict, dataclass, fields

import torch
from monai.networks.nets import DynUNet, SegResNet
from torch import nn

from .geodesic import geodesic_click_maps
from .segsam3d import LayerAggregation, SemanticPointPrompt

PROMPT_CHANNELS = 4  # previous mask, positive clicks, negative clicks, box


@dataclass(frozen=True)
class ClickNetConfig:
    img_size: int = 64
    backbone: str = "segresnet"  # segresnet (MONAI SegResNet) | dynunet (nnU-Net's residual UNet, MONAI DynUNet)
    filters: int = 8  # channels of the first stage; each deeper stage doubles them
    blocks_down: tuple[int, ...] = (1, 2, 2, 4)  # residual blocks per encoder stage (segresnet)
    click_sigma: float = 2.0  # voxels: the radius of a click's ball in the prompt maps
    feature_stages: tuple[int, ...] = ()  # SegSAM-3D eq. 9: encoder stages (0 = shallowest) added to the bottleneck
    semantic_prompts: bool = False  # SegSAM-3D eq. 3-8: each click modulates the bottleneck features around it
    geodesic_maps: bool = False  # DeepIGeoS: +/- clicks' geodesic distance over the image as two more input maps
    geodesic_beta: float = 30.0  # weight of intensity steps (the window is z-scored) against spatial steps
    geodesic_scale: float = 16.0  # voxels: a map is exp(-distance / scale)

    @classmethod
    def from_dict(cls, values: dict) -> "ClickNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}; known: {sorted(known)}")
        values = dict(values)
        for name in ("blocks_down", "feature_stages"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def __post_init__(self) -> None:
        stages = len(self.blocks_down)
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {sorted(BACKBONES)}")
        if self.img_size % (2 ** (stages - 1)):
            raise ValueError(f"img_size {self.img_size} must be divisible by 2^{stages - 1} (the encoder's strides)")
        if (self.feature_stages or self.semantic_prompts or self.geodesic_maps) and self.backbone != "segresnet":
            raise ValueError("feature_stages, semantic_prompts and geodesic_maps need the segresnet backbone")
        if any(not 0 <= i < stages for i in self.feature_stages):
            raise ValueError(f"feature_stages {list(self.feature_stages)}: the encoder has stages 0..{stages - 1}")

    @property
    def bottleneck_channels(self) -> int:
        return self.filters * 2 ** (len(self.blocks_down) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks_down"] = list(self.blocks_down)
        d["feature_stages"] = list(self.feature_stages)
        return d


def _segresnet(c: ClickNetConfig, in_channels: int) -> nn.Module:
    return SegResNet(
        spatial_dims=3,
        init_filters=c.filters,
        in_channels=in_channels,
        out_channels=1,
        blocks_down=c.blocks_down,
        blocks_up=(1,) * (len(c.blocks_down) - 1),
    )


def _dynunet(c: ClickNetConfig, in_channels: int) -> nn.Module:
    n = len(c.blocks_down)
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=1,
        kernel_size=[3] * n,
        strides=[1] + [2] * (n - 1),
        upsample_kernel_size=[2] * (n - 1),
        filters=[c.filters * 2**i for i in range(n)],
        res_block=True,
    )


BACKBONES = {"segresnet": _segresnet, "dynunet": _dynunet}

# What the train task's `trainable` freezes (README "Learning while annotating"). The prompts enter with the image
# at the first convolution, which is thus the prompt encoder; the encoder stages after it are the image encoder. The
# SegSAM-3D additions and the geodesic input are prompt parts. No attention layer: no LoRA.
FROZEN_BY_TRAINABLE: dict[str, dict[str, list[str]]] = {
    "segresnet": {
        "prompt+decoder": ["net.down_layers"],
        "decoder": ["net.convInit", "net.down_layers", "geodesic_in", "aggregation", "click_modulation"],
        "all": [],
    },
    "dynunet": {
        "prompt+decoder": ["net.downsamples", "net.bottleneck"],
        "decoder": ["net.input_block", "net.downsamples", "net.bottleneck"],
        "all": [],
    },
}

CLICKNET_PRESETS: dict[str, ClickNetConfig] = {
    "clicknet_small": ClickNetConfig(),
    "clicknet_dynunet": ClickNetConfig(backbone="dynunet", filters=8, blocks_down=(1, 1, 1, 1, 1)),
    # SegSAM-3D on the default click model (configs/models/clicknet.yaml: clicknet_geodesic): the same network, its
    # weights load as they are (the additions start at 0)
    "segsam3d_clicknet": ClickNetConfig(geodesic_maps=True, feature_stages=(0, 1, 2, 3), semantic_prompts=True),
    "clicknet_geodesic": ClickNetConfig(geodesic_maps=True),
}


def voxel_grid(size: int, device=None) -> torch.Tensor:
    """(S, S, S, 3) voxel indices of a cube."""
    axis = torch.arange(size, dtype=torch.float32, device=device)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)


def gaussian_balls(grid: torch.Tensor, centres: torch.Tensor, sigma: float) -> torch.Tensor:
    """(..., 3) grid and (B, N, 3) centres -> (B, N, grid voxels): a Gaussian ball of `sigma` voxels per centre."""
    d2 = ((grid.reshape(1, 1, -1, 3) - centres.float()[:, :, None, :]) ** 2).sum(-1)
    return torch.exp(-d2 / (2 * sigma**2))


class StageAggregation(nn.Module):
    """Eq. 9 on a UNet encoder: chosen stages pooled to the bottleneck's grid, projected to its width by
    zero-initialised 1x1x1 convolutions, summed with softmax weights (`LayerAggregation`) and added to the
    bottleneck."""

    def __init__(self, stages: tuple[int, ...], stage_channels: list[int], out_channels: int) -> None:
        super().__init__()
        self.stages = stages
        self.proj = nn.ModuleList(nn.Conv3d(stage_channels[i], out_channels, kernel_size=1) for i in stages)
        for conv in self.proj:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.mix = LayerAggregation(len(stages))

    def forward(self, bottleneck: torch.Tensor, stage_outputs: list[torch.Tensor]) -> torch.Tensor:
        grid = bottleneck.shape[-3:]
        features = [
            proj(nn.functional.adaptive_avg_pool3d(stage_outputs[i], grid)) for proj, i in zip(self.proj, self.stages)
        ]
        return bottleneck + self.mix(features)


class ClickModulation(nn.Module):
    """Semantic point prompts (eq. 3-8) in an early-fusion network: SP(p) of every click, plus its sign's embedding,
    through SegSAM-3D's zero-initialised output projection, spread over a Gaussian ball (one cell) around the click on
    the features' grid and added there. Padding clicks (label -1) add nothing."""

    def __init__(self, channels: int, img_size: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.prompt = SemanticPointPrompt(channels, img_size, num_heads=4, mlp_dim=2 * channels)
        self.sign = nn.Embedding(2, channels)  # negative, positive

    def forward(self, features: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        g = features.shape[-1]
        sign = self.sign(labels.clamp_min(0)).to(features.dtype)
        sp = self.prompt.out_proj(self.prompt.refine(coords, features) + sign)
        cells = (coords.float() + 0.5) * (g / self.img_size) - 0.5  # click positions on the features' grid
        balls = gaussian_balls(voxel_grid(g, features.device), cells, 1.0) * (labels >= 0)[..., None]  # (B, N, g^3)
        return features + torch.einsum("bnc,bnv->bcv", sp, balls.to(sp.dtype)).view_as(features)


class ClickNet3D(nn.Module):
    """Image + prompt maps -> logits of the window; see the module's docstring."""

    def __init__(self, config: ClickNetConfig) -> None:
        super().__init__()
        self.config = config
        self.net = BACKBONES[config.backbone](config, 1 + PROMPT_CHANNELS)
        width = config.bottleneck_channels
        self.aggregation = (
            StageAggregation(
                config.feature_stages, [config.filters * 2**i for i in range(len(config.blocks_down))], width
            )
            if config.feature_stages
            else None
        )
        self.click_modulation = ClickModulation(width, config.img_size) if config.semantic_prompts else None
        self.geodesic_in = None
        if config.geodesic_maps:  # added to the first convolution's output; zero-initialised, as the SegSAM-3D parts
            self.geodesic_in = nn.Conv3d(2, config.filters, kernel_size=3, padding=1, bias=False)
            nn.init.zeros_(self.geodesic_in.weight)
        self.register_buffer("_grid", voxel_grid(config.img_size), persistent=False)

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
                mask_input = nn.functional.interpolate(
                    mask_input.float(), size=(s, s, s), mode="trilinear", align_corners=False
                )
            maps[:, 0] = (mask_input[:, 0] > 0).float()
        if points is not None:
            coords, labels = points  # (B, N, 3) window voxel indices, (B, N): 1 positive, 0 negative, -1 padding
            balls = gaussian_balls(grid, coords, self.config.click_sigma)  # (B, N, S^3)
            for channel, value in ((1, 1), (2, 0)):
                chosen = (labels == value)[..., None].float()
                maps[:, channel] = (balls * chosen).amax(1).view(batch, s, s, s) if coords.shape[1] else 0
        if boxes is not None:  # (B, 2, 3) inclusive corners (lo, hi) in window voxel indices
            lo, hi = boxes[:, 0].float(), boxes[:, 1].float()
            inside = (
                (grid[None] >= lo[:, None, None, None] - 0.5) & (grid[None] <= hi[:, None, None, None] + 0.5)
            ).all(-1)
            maps[:, 3] = inside.float()
        return maps

    def decode(
        self, image_embedding: torch.Tensor, points=None, boxes=None, mask_input=None, multimask_output: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in window voxel indices -> (logits (B, 1, S, S, S), confidence (B, 1)).

        The confidence is the mean probability over the voxels called foreground (0 when none is), a cheap
        stand-in for SAM's IoU head.
        """
        x = torch.cat(
            [
                image_embedding,
                self.prompt_maps(image_embedding.shape[0], points, boxes, mask_input).to(image_embedding.dtype),
            ],
            dim=1,
        )
        logits = self._run_network(x, points, image_embedding)
        with torch.no_grad():
            prob = torch.sigmoid(logits.float())
            fg = prob > 0.5
            score = (prob * fg).flatten(1).sum(1) / fg.flatten(1).sum(1).clamp_min(1)
        return logits, score[:, None]

    def _run_network(self, x: torch.Tensor, points, image: torch.Tensor) -> torch.Tensor:
        if self.aggregation is None and self.click_modulation is None and self.geodesic_in is None:
            return self.net(x)
        h = self.net.convInit(x)  # SegResNet.encode, with the geodesic maps joining after its first convolution
        if self.geodesic_in is not None:
            c = self.config
            h = h + self.geodesic_in(geodesic_click_maps(image, points, c.geodesic_beta, c.geodesic_scale).to(h.dtype))
        stages = []  # shallowest first; the last is the bottleneck
        for down in self.net.down_layers:
            h = down(h)
            stages.append(h)
        bottleneck = h
        if self.aggregation is not None:
            bottleneck = self.aggregation(bottleneck, stages)
        if self.click_modulation is not None and points is not None and points[0].shape[1]:
            bottleneck = self.click_modulation(bottleneck, *points)
        return self.net.decode(bottleneck, stages[::-1])
