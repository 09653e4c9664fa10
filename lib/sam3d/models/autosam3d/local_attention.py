"""Local 3D awareness (3D-SAutoMed eq. 1-2): inter-slice attention at each location, intra-slice attention, MLP."""

import torch
from torch import nn

from ..common import MLPBlock
from ..transformer import Attention


class InterIntraSliceAttention(nn.Module):
    """z1 = Inter-SA([f(t-1), f(t), f(t+1)]) + f(t); z2 = Intra-SA(z1) + z1; z = MLP(z2) + z2 (pre-norm).

    Inter-SA attends over the three features at the same (h, w) only; a learned embedding per neighbour tells
    the slice below from the one above, which plain attention over three tokens could not.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.slice_embed = nn.Parameter(torch.zeros(3, dim))
        nn.init.normal_(self.slice_embed, std=0.02)
        self.norm_inter = nn.LayerNorm(dim)
        self.inter = Attention(dim, num_heads)
        self.norm_intra = nn.LayerNorm(dim)
        self.intra = Attention(dim, num_heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, prev: torch.Tensor, cur: torch.Tensor, nxt: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """prev, cur, nxt: (B, C, H, W) encoder features of slices t-1, t, t+1; pos: (1, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = cur.shape
        trio = torch.stack([prev, cur, nxt], dim=1)  # (B, 3, C, H, W)
        trio = trio.permute(0, 3, 4, 1, 2).reshape(b * h * w, 3, c) + self.slice_embed
        t = self.norm_inter(trio)
        f_t = cur.permute(0, 2, 3, 1).reshape(b * h * w, 1, c)
        z1 = (self.inter(t[:, 1:2], t, t) + f_t).reshape(b, h * w, c)  # the middle slice's output only
        q = self.norm_intra(z1)
        qk = q + pos.flatten(2).transpose(1, 2)  # positions inside the slice
        z2 = self.intra(qk, qk, q) + z1
        z = self.mlp(self.norm_mlp(z2)) + z2
        return z.transpose(1, 2).reshape(b, c, h, w)
