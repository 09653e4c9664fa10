"""Box-prompt generator (3D-SAutoMed eq. 4-5): per-class anchor queries refined over the slice, DAB-DETR style.

Each class owns one query. Its anchor is the box that class had on the previous slice (cx, cy, w, h in [0, 1]),
or a learned default box where there is none (the first slice, or the class was absent there). The query is the
anchor's positional code plus the class's semantic token (eq. 4); cross-attention layers over the slice's
features refine it and, as in DAB-DETR, each layer moves the anchor by a predicted offset in logit space (eq. 5).
The output is one box-prompt embedding per class and the boxes of every layer (for the box loss).
"""

import torch
from torch import nn

from ..common import MLP, MLPBlock
from ..transformer import Attention
from .positional import PositionEmbeddingRandom2D


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class AnchorDecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the slice (positions on both sides), MLP; post-norm as DETR."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, q_pos: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        x = q + q_pos
        q = self.norm1(q + self.self_attn(x, x, q))
        q = self.norm2(q + self.cross_attn(q + q_pos, keys + key_pos, keys))
        return self.norm3(q + self.mlp(q))


class BoxPromptGenerator(nn.Module):
    def __init__(self, num_classes: int, dim: int, num_heads: int, depth: int = 2, mlp_dim: int = 512) -> None:
        super().__init__()
        self.semantic = nn.Embedding(num_classes, dim)  # SeEmbed: which class a query stands for
        self.default_anchor = nn.Parameter(torch.zeros(num_classes, 4))  # logits: a centred box of half the slice
        self.box_pe = PositionEmbeddingRandom2D(dim // 4)
        self.anchor_proj = MLP(dim, dim, dim, 2)  # codes of the box centre and size -> the query's position
        self.layers = nn.ModuleList(AnchorDecoderLayer(dim, num_heads, mlp_dim) for _ in range(depth))
        self.box_head = MLP(dim, dim, 4, 3)
        nn.init.zeros_(self.box_head.layers[-1].weight)  # the first refinement keeps the anchor
        nn.init.zeros_(self.box_head.layers[-1].bias)
        self.prompt_proj = nn.Linear(dim, dim)

    def anchor_code(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, K, 4) cx, cy, w, h -> (B, K, C)."""
        return self.anchor_proj(torch.cat([self.box_pe.encode(boxes[..., :2]), self.box_pe.encode(boxes[..., 2:])], -1))

    def initial_anchors(self, batch: int, prev_boxes: torch.Tensor | None, prev_present: torch.Tensor | None):
        default = self.default_anchor.sigmoid().expand(batch, -1, -1)
        if prev_boxes is None:
            return default
        if prev_present is None:
            prev_present = torch.ones(prev_boxes.shape[:2], dtype=torch.bool, device=prev_boxes.device)
        return torch.where(prev_present[..., None], prev_boxes.to(default.dtype).clamp(1e-3, 1 - 1e-3), default)

    def forward(
        self,
        feats: torch.Tensor,
        feats_pos: torch.Tensor,
        prev_boxes: torch.Tensor | None = None,
        prev_present: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """feats (B, C, H, W), feats_pos (1, C, H, W), prev_boxes (B, K, 4), prev_present (B, K) bool.

        Returns the box-prompt embeddings (B, K, C), the boxes after each layer [(B, K, 4)], the initial anchors.
        """
        b = feats.shape[0]
        anchors = self.initial_anchors(b, prev_boxes, prev_present)
        keys = feats.flatten(2).transpose(1, 2)
        key_pos = feats_pos.flatten(2).transpose(1, 2)
        q = self.semantic.weight.expand(b, -1, -1)
        boxes, ref = [], anchors
        for layer in self.layers:
            q = layer(q, self.anchor_code(ref) + self.semantic.weight, keys, key_pos)
            new = (inverse_sigmoid(ref) + self.box_head(q)).sigmoid()
            boxes.append(new)
            ref = new.detach()  # DAB-DETR: each layer refines the last one's box without backpropagating through it
        prompts = self.prompt_proj(q) + self.anchor_code(boxes[-1])
        return prompts, boxes, anchors
