"""RefSAM3D's 3D adapter (eq. 1): a residual bottleneck with a depth-wise 3D convolution, after an encoder block.

Adapter(X) = X + Act(DWConv3d(X W_down)) W_up. The up-projection starts at zero, so an adapter is the identity
until it learns: a pretrained (frozen) encoder with fresh adapters computes exactly what it computed before.
"""

import torch
from torch import nn


class Adapter3D(nn.Module):
    """On channels-last tokens (B, D, H, W, C), as the encoder blocks hold them."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        # depth-wise: one 3x3x3 filter per channel, the spatial awareness a per-token MLP lacks
        self.dwconv = nn.Conv3d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x).permute(0, 4, 1, 2, 3)
        h = self.dwconv(h).permute(0, 2, 3, 4, 1)
        return x + self.up(self.act(h))
