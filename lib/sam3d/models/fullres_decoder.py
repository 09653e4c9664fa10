"""RefSAM3D's lightweight mask decoder, which reaches the window's full resolution.

SAM's two-way transformer (prompt tokens <-> image tokens), then four 2x transposed-convolution steps from the
16x-downsampled token grid back to the window (MONAI's UnetrUpBlock), each fusing one encoder stage's features
brought to its scale, deepest stage first (the multi-layer aggregation, MLAM, U-Net-like); at full resolution the
features are concatenated with the image itself and fused by a 3D convolution; SAM's hypernetwork turns the mask
token into the per-voxel weights of the final features.
"""

import torch
from monai.networks.blocks import Convolution, UnetrUpBlock, UpSample
from torch import nn

from .common import MLP
from .transformer import TwoWayTransformer

UP_STEPS = 4  # 2^4 = the patch size 16


class FullResMaskDecoder(nn.Module):
    def __init__(
        self,
        transformer_dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        stage_dim: int,
        channels: tuple[int, ...],
        iou_head_hidden_dim: int,
        in_chans: int = 1,
    ) -> None:
        super().__init__()
        if len(channels) != UP_STEPS:
            raise ValueError(f"the full-resolution decoder needs {UP_STEPS} channel counts, got {channels}")
        self.transformer = TwoWayTransformer(depth, transformer_dim, num_heads, mlp_dim, 2)
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_token = nn.Embedding(1, transformer_dim)
        ins = (transformer_dim, *channels[:-1])
        self.up = nn.ModuleList(
            UnetrUpBlock(3, i, o, kernel_size=3, upsample_kernel_size=2, norm_name="instance", res_block=True)
            for i, o in zip(ins, channels)
        )
        # a stage's features (on the token grid) to step k's scale: 1x1 conv, then trilinear upsampling
        self.skip = nn.ModuleList(
            UpSample(
                3,
                stage_dim,
                o,
                scale_factor=2 ** (k + 1),
                mode="nontrainable",
                interp_mode="trilinear",
                align_corners=False,
            )
            for k, o in enumerate(channels)
        )
        self.image_fusion = Convolution(
            3, channels[-1] + in_chans, channels[-1], kernel_size=3, act="GELU", norm="instance"
        )
        self.hypernetwork = MLP(transformer_dim, transformer_dim, channels[-1], 3)
        self.iou_head = MLP(transformer_dim, iou_head_hidden_dim, 1, 3)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        stages: list[torch.Tensor],
        image: torch.Tensor,
    ):
        """Mask logits at the image's resolution (B, 1, S, S, S) and the IoU prediction (B, 1).

        image_embedding, dense: (B|1, C, g, g, g); sparse: (B, N, C); stages: shallow to deep, (B|1, C_s, g, g, g);
        image: (B|1, in_chans, S, S, S).
        """
        b = max(sparse.shape[0], dense.shape[0], image_embedding.shape[0])
        out_tokens = torch.cat([self.iou_token.weight, self.mask_token.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse.expand(b, -1, -1)], dim=1)
        src = image_embedding.expand(b, -1, -1, -1, -1) + dense
        _, c, d, h, w = src.shape
        hs, src = self.transformer(src, image_pe.expand(b, -1, -1, -1, -1), tokens)
        x = src.transpose(1, 2).reshape(b, c, d, h, w)
        for k, (up, skip) in enumerate(zip(self.up, self.skip)):
            stage = stages[len(stages) - 1 - min(k, len(stages) - 1)]  # deepest first
            x = up(x, skip(stage.expand(b, -1, -1, -1, -1)))
        x = self.image_fusion(torch.cat([x, image.expand(b, -1, -1, -1, -1).to(x.dtype)], dim=1))
        weights = self.hypernetwork(hs[:, 1])
        masks = torch.einsum("bc,bcdhw->bdhw", weights, x)[:, None]
        return masks, self.iou_head(hs[:, 0])
