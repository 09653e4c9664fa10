"""SAM's 2D ViT image encoder, key-compatible with Meta's checkpoints (`image_encoder.*` of sam_vit_b_01ec64.pth).

Same modules, names and arithmetic as `segment_anything.modeling.image_encoder` (windowed blocks with padding,
decomposed relative positions, the conv neck), so a SAM state_dict loads with `strict=True` apart from the LoRA
tensors; the qkv projections are `LoRALinear` (rank 0: plain SAM). Smaller sizes are the same network with other
numbers; `adapt_sam_state_dict` resizes a checkpoint's position tables to another image size.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..common import LayerNorm3d, MLPBlock
from ..lora import LoRALinear


class LayerNorm2d(LayerNorm3d):
    """LayerNorm over the channel axis of an (N, C, H, W) tensor (SAM's): the 3D one on a depth of 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.unsqueeze(2)).squeeze(2)


def _rel_pos(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """(q_size, k_size, C) relative-position terms; a table of another length is linearly resized, as SAM does."""
    max_dist = 2 * max(q_size, k_size) - 1
    if table.shape[0] != max_dist:
        table = F.interpolate(table.reshape(1, table.shape[0], -1).permute(0, 2, 1), size=max_dist, mode="linear")
        table = table.reshape(-1, max_dist).permute(1, 0)
    q = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    return table[((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


class SliceAttention(nn.Module):
    """Multi-head self-attention over an (H, W) token grid with decomposed relative positions; qkv with LoRA."""

    def __init__(
        self, dim: int, num_heads: int, input_size: tuple[int, int], lora_rank: int, lora_alpha: float
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = LoRALinear(dim, dim * 3, rank=lora_rank, alpha=lora_alpha)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        rh, rw = _rel_pos(h, h, self.rel_pos_h), _rel_pos(w, w, self.rel_pos_w)
        r_q = q.reshape(-1, h, w, q.shape[-1])
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
        attn = (attn.view(-1, h, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(-1, h * w, h * w)
        x = (attn.softmax(dim=-1) @ v).view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(x)


class SliceBlock(nn.Module):
    """Pre-norm transformer block; windowed (zero-padded windows, no masking, as SAM) or global attention."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, grid: int, lora_rank: int, lora_alpha: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        size = (window_size, window_size) if window_size else (grid, grid)
        self.attn = SliceAttention(dim, num_heads, size, lora_rank, lora_alpha)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut, x = x, self.norm1(x)
        if self.window_size:
            b, h, w, c = x.shape
            s = self.window_size
            ph, pw = (s - h % s) % s, (s - w % s) % s
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            x = x.view(b, hp // s, s, wp // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, c)
            x = self.attn(x)
            x = x.view(b, hp // s, wp // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)[:, :h, :w]
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H, W, C)


class SliceEncoderViT(nn.Module):
    """(B, in_chans, img_size, img_size) -> (B, out_chans, img_size / patch, img_size / patch)."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
        lora_rank: int = 0,
        lora_alpha: float = 1.0,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            SliceBlock(
                embed_dim,
                num_heads,
                mlp_ratio,
                0 if i in global_attn_indexes else window_size,
                grid,
                lora_rank,
                lora_alpha,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))


def adapt_sam_state_dict(
    state: dict[str, torch.Tensor], encoder: SliceEncoderViT, prefix: str = "image_encoder."
) -> dict[str, torch.Tensor]:
    """A SAM checkpoint's encoder tensors for `encoder`: prefix stripped, position tables resized to its image size.

    SAMed does the same to run SAM at 512 or 224 pixels: pos_embed bicubically, relative tables linearly.
    """
    own = encoder.state_dict()
    out = {}
    for key, value in state.items():
        if prefix and not key.startswith(prefix):
            continue
        key = key[len(prefix) :]
        if key in own and own[key].shape != value.shape:
            if key == "pos_embed":
                value = F.interpolate(
                    value.permute(0, 3, 1, 2), size=own[key].shape[1:3], mode="bicubic", align_corners=False
                ).permute(0, 2, 3, 1)
            elif key.endswith(("rel_pos_h", "rel_pos_w")):
                value = F.interpolate(value.T[None], size=own[key].shape[0], mode="linear", align_corners=False)[0].T
        out[key] = value
    return out
