"""3D prompt encoder: clicks and boxes as random-Fourier positional codes, previous masks as a dense map."""

import math

import torch
from torch import nn

from .common import LayerNorm3d


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier features of normalised 3D coordinates: [sin a, cos a, sin a] (SAM-Med3D's layout)."""

    def __init__(self, num_pos_feats: int, scale: float = 1.0, swap_dense_axes: bool = True) -> None:
        super().__init__()
        self.swap_dense_axes = swap_dense_axes
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((3, num_pos_feats)))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """coords in [0, 1]^3, last axis -> 3 * num_pos_feats channels."""
        g = self.positional_encoding_gaussian_matrix
        a = 2 * math.pi * ((2 * coords - 1).to(g.dtype) @ g)
        return torch.cat([torch.sin(a), torch.cos(a), torch.sin(a)], dim=-1)

    def dense(self, size: tuple[int, int, int]) -> torch.Tensor:
        """(C, D, H, W) code of the embedding grid's cell centres.

        The official grid pairs coordinate 0 with tensor axis 1 and coordinate 1 with axis 0 (`swap_dense_axes`),
        so a click's code matches the grid's code at the click mirrored across the first diagonal. Published weights
        were trained with it and need it; a network trained from scratch learns much faster without it.
        """
        g = self.positional_encoding_gaussian_matrix
        axes = [(torch.arange(n, device=g.device, dtype=torch.float32) + 0.5) / n for n in size]
        a0, a1, a2 = torch.meshgrid(*axes, indexing="ij")
        grid = [a1, a0, a2] if self.swap_dense_axes else [a0, a1, a2]
        return self._encode(torch.stack(grid, dim=-1)).permute(3, 0, 1, 2)

    def points(self, coords: torch.Tensor, image_size: int) -> torch.Tensor:
        """(B, N, 3) voxel indices along input axes 2, 3, 4 -> (B, N, C); +0.5 moves them to voxel centres."""
        return self._encode((coords.float() + 0.5) / image_size)


class PromptEncoder3D(nn.Module):
    """Sparse (points, boxes) and dense (low-res mask logits) prompt embeddings.

    `num_point_embeddings` = 2 (negative, positive) as in SAM-Med3D-turbo, whose boxes are unusable;
    4 adds the two box-corner embeddings.
    """

    def __init__(
        self,
        embed_dim: int = 384,
        image_embedding_size: int = 8,
        input_image_size: int = 128,
        mask_in_chans: int = 16,
        num_point_embeddings: int = 2,
        swap_dense_axes: bool = True,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = (image_embedding_size,) * 3
        self.input_image_size = input_image_size
        self.mask_input_size = 4 * image_embedding_size
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3, swap_dense_axes=swap_dense_axes)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    @property
    def supports_boxes(self) -> bool:
        return len(self.point_embeddings) >= 4

    def get_dense_pe(self) -> torch.Tensor:
        return self.pe_layer.dense(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        if pad:  # a "not a point" token, as SAM appends when no box is given
            coords = torch.cat([coords, torch.zeros_like(coords[:, :1])], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        emb = self.pe_layer.points(coords, self.input_image_size)
        labels = labels[..., None]
        emb = torch.where(labels == -1, torch.zeros_like(emb), emb)
        emb = emb + (labels == -1) * self.not_a_point_embed.weight
        emb = emb + (labels == 0) * self.point_embeddings[0].weight
        emb = emb + (labels == 1) * self.point_embeddings[1].weight
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 2, 3) opposite corners as voxel indices -> (B, 2, C)."""
        if not self.supports_boxes:
            raise ValueError("this model has no box embeddings (SAM-Med3D-turbo's layout); use clicks instead")
        emb = self.pe_layer.points(boxes, self.input_image_size)
        return emb + torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bs = next(t for t in (points[0] if points else None, boxes, masks, torch.empty(1)) if t is not None).shape[0]
        device = self.no_mask_embed.weight.device
        sparse = torch.empty((bs, 0, self.embed_dim), device=device, dtype=self.no_mask_embed.weight.dtype)
        if points is not None:
            sparse = torch.cat([sparse, self._embed_points(points[0], points[1], pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense
