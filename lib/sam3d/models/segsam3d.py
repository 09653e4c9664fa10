"""SegSAM-3D's two additions to the 3D SAM (../shared/papers/segsam3d.txt, Sections II.B-C).

`LayerAggregation`: multi-layer feature sampling, F_agg = sum_i w_i F_i over chosen encoder blocks with
softmax-normalised learnable weights (eq. 9); the encoder's neck then projects F_agg to the decoder's width.

`SemanticPointPrompt`: per click p, the sinusoidal code P(p) of eq. 3 projected to the embedding width, the visual
vector V(p) sampled trilinearly from the image embedding at p (eq. 4), a learnable global token T_g, one
cross-attention of [T_g, P(p)] onto [T_g, V(p)] (eq. 5-6) and an MLP (eq. 7); the refined global token T'_g is
SP(p) (eq. 8). SP(p) is added to the click's token (Fourier code + label embedding) through a zero-initialised
projection, so a network that starts from a plain model's weights starts with that model's answers.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock
from .transformer import Attention


class LayerAggregation(nn.Module):
    """Softmax-weighted sum of same-shaped block outputs (channels last)."""

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_layers))  # equal weights at the start, as eq. 9 leaves open

    @property
    def weights(self) -> torch.Tensor:
        return self.logits.softmax(0)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        w = self.weights.to(features[0].dtype)
        return sum(wi * f for wi, f in zip(w, features))


def sinusoidal_code(points: torch.Tensor, size: int | tuple[int, int, int]) -> torch.Tensor:
    """Eq. 3: (..., 3) voxel coordinates along the window's axes -> (..., 6) [sin, cos] of 2*pi*p/size per axis."""
    sizes = torch.as_tensor((size,) * 3 if isinstance(size, int) else size, dtype=torch.float32, device=points.device)
    a = 2 * math.pi * points.float() / sizes
    return torch.stack([torch.sin(a), torch.cos(a)], dim=-1).flatten(-2)


def sample_features(features: torch.Tensor, points: torch.Tensor, size: int) -> torch.Tensor:
    """Eq. 4: (B, C, d, h, w) features at (B, N, 3) window voxel indices -> (B, N, C), trilinear.

    Feature cell i spans voxels [i, i + 1) * size / d, so voxel index p sits at (p + 0.5) / size of the grid's
    extent (align_corners=False); grid_sample wants its coordinates in (w, h, d) order.
    """
    grid = (2 * (points.float() + 0.5) / size - 1).flip(-1)[:, :, None, None, :]  # (B, N, 1, 1, 3)
    out = F.grid_sample(features, grid.to(features.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, :, :, 0, 0].transpose(1, 2)


class SemanticPointPrompt(nn.Module):
    """(points (B, N, 3), image embedding (B, C, d, h, w)) -> SP(p) (B, N, C), already through the output projection."""

    def __init__(self, embed_dim: int, input_image_size: int, num_heads: int = 4, mlp_dim: int = 512) -> None:
        super().__init__()
        self.input_image_size = input_image_size
        self.pos_proj = nn.Linear(6, embed_dim)  # "projected to the embedding width"
        self.global_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.cross_attn = Attention(embed_dim, num_heads)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.mlp = MLPBlock(embed_dim, mlp_dim)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def refine(self, points: torch.Tensor, image_embedding: torch.Tensor) -> torch.Tensor:
        """T'_g per point, before the output projection: (B, N, C)."""
        b, n, _ = points.shape
        c = image_embedding.shape[1]
        pos = self.pos_proj(sinusoidal_code(points, self.input_image_size).to(image_embedding.dtype))  # P(p)
        vis = sample_features(image_embedding, points, self.input_image_size)  # V(p)
        tg = self.global_token.to(image_embedding.dtype).expand(b * n, 1, c)
        queries = torch.cat([tg, pos.reshape(b * n, 1, c)], dim=1)  # T_g (+) P(p)
        keys = torch.cat([tg, vis.reshape(b * n, 1, c)], dim=1)  # T_g (+) V(p)
        x = self.norm1(queries + self.cross_attn(queries, keys, keys))
        x = self.norm2(x + self.mlp(x))
        return x[:, 0].reshape(b, n, c)  # the updated global token

    def forward(self, points: torch.Tensor, image_embedding: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.refine(points, image_embedding))
