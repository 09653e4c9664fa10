"""SAM's mask decoder for many classes at once, with the historical-information token (3D-SAutoMed eq. 3).

Tokens into the two-way transformer: one mask token per class and one for the background, the history
(K_his x C, carried from the slices segmented before), and the box prompts of the generator. After the
transformer the history tokens have read the current slice; an MLP and a LayerNorm (the information filter)
make the history handed to the next slice. Masks: hypernetwork MLPs on the upscaled image tokens, as SAM,
one per class: (B, 1 + K, 4H, 4W) logits whose argmax makes the classes non-overlapping.
"""

import torch
from torch import nn

from ..common import MLP, MLPBlock
from ..transformer import TwoWayTransformer
from .slice_encoder import LayerNorm2d


class MultiClassMaskDecoder(nn.Module):
    def __init__(
        self, num_classes: int, dim: int, depth: int, num_heads: int, mlp_dim: int, history_tokens: int
    ) -> None:
        super().__init__()
        self.num_outputs = num_classes + 1  # background first
        self.history_tokens = history_tokens
        self.transformer = TwoWayTransformer(depth, dim, num_heads, mlp_dim)
        self.mask_tokens = nn.Embedding(self.num_outputs, dim)
        self.no_mask_embed = nn.Embedding(1, dim)  # SAM's dense prompt when no mask is given
        if history_tokens:
            self.history_init = nn.Embedding(history_tokens, dim)  # the history before any slice
            self.history_filter = nn.Sequential(MLPBlock(dim, mlp_dim), nn.LayerNorm(dim))
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(self.num_outputs))

    def initial_history(self, batch: int) -> torch.Tensor | None:
        return self.history_init.weight.expand(batch, -1, -1) if self.history_tokens else None

    def forward(
        self, image: torch.Tensor, image_pe: torch.Tensor, prompts: torch.Tensor | None, history: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """image (B, C, H, W), image_pe (1, C, H, W), prompts (B, K, C) or None, history (B, K_his, C) or None.

        Returns logits (B, 1 + K, 4H, 4W) and the filtered history (B, K_his, C) (None without history tokens).
        """
        b, c, h, w = image.shape
        parts = [self.mask_tokens.weight.expand(b, -1, -1)]
        if self.history_tokens:
            parts.append(self.initial_history(b) if history is None else history)
        if prompts is not None:
            parts.append(prompts)
        tokens = torch.cat(parts, dim=1)
        src = image + self.no_mask_embed.weight.reshape(1, -1, 1, 1)
        hs, src = self.transformer(src, image_pe.expand(b, -1, -1, -1), tokens)
        n = self.num_outputs
        new_history = self.history_filter(hs[:, n : n + self.history_tokens]) if self.history_tokens else None
        up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        logits = (hyper @ up.flatten(2)).view(b, n, *up.shape[2:])
        return logits, new_history
