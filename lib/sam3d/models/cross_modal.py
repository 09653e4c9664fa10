"""RefSAM3D's cross-modal prompt: text tokens projected into the visual width (eq. 3), attended to by each encoder
stage's features (eq. 6-8), fused into a dense prompt for the mask decoder and a sparse text token.
"""

import torch
from torch import nn


class CrossModalProjector(nn.Module):
    """Eq. 3: f_i^s = MLP(f_i) for every text token (a single linear layer with `layers=1`, for the ablation)."""

    def __init__(self, text_dim: int, visual_dim: int, layers: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(text_dim)  # text towers' token scales differ (MiniLM vs CLIP)
        if layers == 1:
            self.mlp = nn.Linear(text_dim, visual_dim)
        else:
            self.mlp = nn.Sequential(nn.Linear(text_dim, visual_dim), nn.GELU(), nn.Linear(visual_dim, visual_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(tokens))


class StageCrossAttention(nn.Module):
    """Eq. 6-7 for one stage: queries from the stage's tokens, keys and values from the text; residual, normed."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, visual: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """visual (B, N, C), text (B, L, C), text_mask (B, L) True for real tokens -> (B, N, C)."""
        out, _ = self.attn(self.norm_q(visual), text, text, key_padding_mask=~text_mask, need_weights=False)
        return self.norm_out(visual + out)


class HierarchicalCrossAttention(nn.Module):
    """Eq. 6-8 over the stages: O = [O_1, ..., O_N] concatenated and projected to the decoder's width.

    Returns the dense cross-modal prompt (B, out_dim, g, g, g) and every stage's text-aware features O_i
    (B, C, g, g, g), which the decoder fuses on its way up. `stages` picks which stages take part (the ablation
    "without hierarchical fusion" uses the last one alone); the others pass through unchanged.
    """

    def __init__(self, dim: int, num_heads: int, num_stages: int, out_dim: int, stages: tuple[int, ...]) -> None:
        super().__init__()
        self.stages = tuple(stages)
        self.blocks = nn.ModuleList(StageCrossAttention(dim, num_heads) for _ in self.stages)
        self.fuse = nn.Linear(dim * len(self.stages), out_dim)
        # zero: without text training the dense prompt adds nothing, as SAM's no-mask embedding would
        nn.init.zeros_(self.fuse.weight)
        nn.init.zeros_(self.fuse.bias)
        self.num_stages = num_stages

    def forward(self, stages: list[torch.Tensor], text: torch.Tensor, text_mask: torch.Tensor):
        """stages: N tensors (B, g, g, g, C) channels-last -> (dense (B, out, g, g, g), [O_i (B, C, g, g, g)])."""
        b, d, h, w, c = stages[0].shape
        out = [s.permute(0, 4, 1, 2, 3) for s in stages]
        attended = []
        for block, i in zip(self.blocks, self.stages):
            o = block(stages[i].reshape(b, d * h * w, c), text, text_mask)
            attended.append(o)
            out[i] = o.transpose(1, 2).reshape(b, c, d, h, w)
        dense = self.fuse(torch.cat(attended, dim=-1)).transpose(1, 2).reshape(b, -1, d, h, w)
        return dense, out


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, C), (B, L) -> (B, C): the mean over real tokens (the pooled sentence, after projection)."""
    m = mask.to(tokens.dtype)[..., None]
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1)
