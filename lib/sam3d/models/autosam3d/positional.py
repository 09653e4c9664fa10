"""SAM's random-Fourier positional code in 2D: for the image grid and for box coordinates in [0, 1]."""

import math

import torch
from torch import nn


class PositionEmbeddingRandom2D(nn.Module):
    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((2, num_pos_feats)))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) points (x, y) in [0, 1] -> (..., 2 * num_pos_feats)."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, h: int, w: int) -> torch.Tensor:
        """(1, C, h, w) code of the cell centres."""
        m = self.positional_encoding_gaussian_matrix
        y = (torch.arange(h, device=m.device, dtype=m.dtype) + 0.5) / h
        x = (torch.arange(w, device=m.device, dtype=m.dtype) + 0.5) / w
        grid = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return self.encode(grid).permute(2, 0, 1)[None]
