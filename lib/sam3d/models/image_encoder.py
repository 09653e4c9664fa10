"""3D ViT image encoder of SAM-Med3D (patch embedding, windowed/global blocks with 3D relative positions, neck).

The arithmetic follows the official SAM-Med3D-turbo network, quirks included (see
../shared/conformance/README.md): windowed blocks zero-pad the token grid up to the window without masking,
and the relative-position terms use the official broadcasting, in which all three tables are indexed by the
key's last coordinate.
"""

from collections.abc import Sequence

import torch
from torch import nn

from .common import LayerNorm3d, MLPBlock
from .segsam3d import LayerAggregation


def _relative_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """(size, size, C) with entry [i, j] = table[i - j + size - 1]."""
    if table.shape[0] != 2 * size - 1:
        raise ValueError(f"relative-position table has {table.shape[0]} rows, a grid of {size} needs {2 * size - 1}")
    idx = torch.arange(size, device=table.device)
    return table[idx[:, None] - idx[None, :] + size - 1]


class Attention3D(nn.Module):
    """Multi-head self-attention over a cubic token grid with 3D relative positions."""

    def __init__(self, dim: int, num_heads: int, grid_size: int, use_rel_pos: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            rows = 2 * grid_size - 1
            self.rel_pos_d = nn.Parameter(torch.zeros(rows, self.head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(rows, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(rows, self.head_dim))

    def attend(self, qkv: torch.Tensor, region: Sequence[int]) -> torch.Tensor:
        """Attention of the queries in grid[:d, :h, :w] to every token of a cubic grid.

        qkv: (B, P, P, P, 3*dim), already projected. Returns (B, d, h, w, dim) before `proj`.
        Queries outside `region` are skipped: their outputs would be discarded, but their q values still feed
        the relative-position terms of the real queries, exactly as in the official network.
        """
        b, p1, p2, p3, _ = qkv.shape
        if not p1 == p2 == p3:
            raise ValueError(f"token grid must be cubic, got {(p1, p2, p3)}")
        d, h, w = region
        heads, hd = self.num_heads, self.head_dim
        qkv = qkv.reshape(b, p1, p2, p3, 3, heads, hd).permute(4, 0, 5, 1, 2, 3, 6)
        q, k, v = (t.reshape(b * heads, p1, p2, p3, hd) for t in qkv.unbind(0))
        n_keys = p1 * p2 * p3
        q_rows = q[:, :d, :h, :w]
        keys = k.reshape(b * heads, n_keys, hd).transpose(1, 2)
        attn = (q_rows * self.scale).reshape(b * heads, d * h * w, hd) @ keys
        if self.use_rel_pos:
            rd = _relative_table(self.rel_pos_d, p1)
            rh = _relative_table(self.rel_pos_h, p2)
            rw = _relative_table(self.rel_pos_w, p3)
            q_band = q[:, :d, :h]  # every w: the official broadcasting reads q at (qd, qh, kd) and (qd, qh, kh)
            rel_d = torch.einsum("bdhwc,dkc->bdhwk", q_rows, rd[:d])
            rel_h = torch.einsum("bdhwc,hkc->bdhwk", q_band, rh[:h])
            rel_w = torch.einsum("bdhwc,wkc->bdhwk", q_band, rw)
            attn = (
                attn.view(b * heads, d, h, w, p1, p2, p3)
                + rel_d[:, :, :, :, None, None, :]
                + rel_h[:, :, :, None, :, None, :]
                + rel_w[:, :, :, None, None, :, :]
            ).view(b * heads, d * h * w, n_keys)
        attn = attn.softmax(dim=-1)
        out = attn @ v.reshape(b * heads, n_keys, hd)
        return out.view(b, heads, d, h, w, hd).permute(0, 2, 3, 4, 1, 5).reshape(b, d, h, w, heads * hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(self.qkv(x), x.shape[1:4]))


class Block3D(nn.Module):
    """Pre-norm transformer block; `window_size > 0` makes it a windowed block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, grid_size: int, window_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention3D(dim, num_heads, window_size if window_size > 0 else grid_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=nn.GELU)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, c = x.shape
        ws = self.window_size
        pd, ph, pw = (-s % ws for s in (d, h, w))
        qkv = self.attn.qkv(x)
        if pd or ph or pw:
            # A zero-padded token (zeros after norm1) projects to the qkv bias: pad with the bias directly.
            padded = self.attn.qkv.bias.expand(b, d + pd, h + ph, w + pw, 3 * c).clone()
            padded[:, :d, :h, :w] = qkv
            qkv = padded
        nd, nh, nw = (d + pd) // ws, (h + ph) // ws, (w + pw) // ws
        if nd * nh * nw == 1:
            return self.attn.proj(self.attn.attend(qkv, (d, h, w)))
        windows = (
            qkv.view(b, nd, ws, nh, ws, nw, ws, 3 * c).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws, ws, ws, 3 * c)
        )
        out = self.attn.attend(windows, (ws, ws, ws))
        out = out.view(b, nd, nh, nw, ws, ws, ws, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
        out = out.reshape(b, nd * ws, nh * ws, nw * ws, c)[:, :d, :h, :w]
        return self.attn.proj(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + (self._windowed_attention(y) if self.window_size > 0 else self.attn(y))
        return x + self.mlp(self.norm2(x))


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)  # channels last


class ImageEncoderViT3D(nn.Module):
    """(B, in_chans, S, S, S) -> (B, out_chans, S/p, S/p, S/p) image embedding."""

    def __init__(
        self,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        feature_stages: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        self.global_attn_indexes = tuple(global_attn_indexes)
        self.blocks = nn.ModuleList(
            Block3D(embed_dim, num_heads, mlp_ratio, grid, 0 if i in self.global_attn_indexes else window_size)
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )
        # SegSAM-3D's multi-layer feature sampling: the neck sees a weighted sum of these blocks' outputs
        self.feature_stages = tuple(feature_stages)
        self.aggregation = LayerAggregation(len(self.feature_stages)) if self.feature_stages else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        stages = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.feature_stages:
                stages.append(x)
        if self.aggregation is not None:
            x = self.aggregation(stages)
        return self.neck(x.permute(0, 4, 1, 2, 3))
