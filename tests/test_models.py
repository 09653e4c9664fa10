"""Model shapes and prompt handling per preset, and window attention against a naive reference.

The naive reference pads the normalised tokens with zeros up to a multiple of the window, runs full attention
of every query (padded ones too) in each window with the official relative-position terms written out from
../shared/conformance/README.md (point 5), and crops. It runs in float64, so any indexing slip shows at 1e-6.
"""

import math

import pytest
import torch

from sam3d.models import PRESETS, Sam3DConfig, build_sam3d
from sam3d.models.image_encoder import Block3D

# ---------------------------------------------------------------------------------------------- naive reference


def naive_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """All S^3 queries of a cubic grid x (B, S, S, S, C) against all S^3 keys; returns (B, S, S, S, C).

    logit[(qd,qh,qw),(kd,kh,kw)] = q.k / sqrt(hd) + q[qd,qh,qw].Td[qd-kw+S-1] + q[qd,qh,kd].Th[qh-kw+S-1]
                                   + q[qd,qh,kh].Tw[kh-kw+S-1]
    """
    b, s = x.shape[0], x.shape[1]
    assert x.shape[1:4] == (s, s, s)
    heads = attn.num_heads
    hd = x.shape[-1] // heads
    qkv = attn.qkv(x).reshape(b, s, s, s, 3, heads, hd)
    i = torch.arange(s)
    rel = i[:, None] - i[None, :] + s - 1  # rel[a, kw] = a - kw + S - 1
    td, th, tw = attn.rel_pos_d[rel], attn.rel_pos_h[rel], attn.rel_pos_w[rel]  # (S, S, hd)
    out = torch.empty(b, s, s, s, heads, hd, dtype=x.dtype)
    for bi in range(b):
        for h in range(heads):
            q, k, v = (qkv[bi, :, :, :, j, h] for j in range(3))  # (S, S, S, hd), indexed [d, h, w]
            logits = torch.einsum("abcx,defx->abcdef", q, k) / math.sqrt(hd)  # [qd,qh,qw,kd,kh,kw]
            term_d = torch.einsum("abcx,afx->abcf", q, td)  # q[qd,qh,qw] . Td[qd - kw]   -> [qd,qh,qw,kw]
            term_h = torch.einsum("abdx,bfx->abdf", q, th)  # q[qd,qh,kd] . Th[qh - kw]   -> [qd,qh,kd,kw]
            term_w = torch.einsum("abex,efx->abef", q, tw)  # q[qd,qh,kh] . Tw[kh - kw]   -> [qd,qh,kh,kw]
            logits = (
                logits
                + term_d[:, :, :, None, None, :]
                + term_h[:, :, None, :, None, :]
                + term_w[:, :, None, None, :, :]
            )
            p = logits.reshape(s**3, s**3).softmax(-1)
            out[bi, :, :, :, h] = (p @ v.reshape(s**3, hd)).reshape(s, s, s, hd)
    return attn.proj(out.reshape(b, s, s, s, heads * hd))


def naive_block(blk: Block3D, x: torch.Tensor) -> torch.Tensor:
    b, d, h, w, c = x.shape
    y = blk.norm1(x)
    ws = blk.window_size
    if ws == 0:
        a = naive_attention(blk.attn, y)
    else:
        dp, hp, wp = (math.ceil(n / ws) * ws for n in (d, h, w))
        padded = torch.zeros(b, dp, hp, wp, c, dtype=x.dtype)
        padded[:, :d, :h, :w] = y  # zero tokens after norm1, no mask
        full = torch.empty_like(padded)
        for i in range(0, dp, ws):
            for j in range(0, hp, ws):
                for k in range(0, wp, ws):
                    full[:, i : i + ws, j : j + ws, k : k + ws] = naive_attention(
                        blk.attn, padded[:, i : i + ws, j : j + ws, k : k + ws]
                    )
        a = full[:, :d, :h, :w]
    x = x + a
    return x + blk.mlp(blk.norm2(x))


def naive_encoder(enc, image: torch.Tensor) -> torch.Tensor:
    x = enc.patch_embed(image) + enc.pos_embed
    for blk in enc.blocks:
        x = naive_block(blk, x)
    return enc.neck(x.permute(0, 4, 1, 2, 3))


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Every parameter random, the zero-initialised rel-pos tables and position embedding included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


# ---------------------------------------------------------------------------------------------- window attention


@pytest.mark.parametrize(
    "grid, window",
    [
        ((8, 8, 8), 14),  # the turbo case: one 14^3 window, 512 real tokens of 2744
        ((6, 8, 10), 14),  # non-cubic, one window
        ((3, 3, 3), 4),  # one padded window
        ((2, 3, 4), 4),  # non-cubic, one window
        ((8, 8, 8), 4),  # 8 windows, no padding
        ((5, 7, 9), 4),  # non-cubic, padded to (8, 8, 12): 12 windows
        ((9, 4, 1), 4),  # padded to (12, 4, 4): 3 windows
    ],
)
def test_windowed_block_matches_naive_reference(grid, window):
    blk = Block3D(dim=16, num_heads=2, mlp_ratio=2.0, grid_size=8, window_size=window).double().eval()
    randomize_(blk, 1, scale=0.3)
    batch = 1 if window == 14 else 2  # a 14^3 window is 2744 naive queries per head
    x = torch.randn(batch, *grid, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = blk(x), naive_block(blk, x)
    assert got.shape == x.shape
    assert rel(got, want) < 1e-10


@pytest.mark.parametrize("size", [8, 5])
def test_global_block_matches_naive_reference(size):
    blk = Block3D(dim=16, num_heads=2, mlp_ratio=2.0, grid_size=size, window_size=0).double().eval()
    randomize_(blk, 3, scale=0.3)
    x = torch.randn(1, size, size, size, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel(blk(x), naive_block(blk, x)) < 1e-10


def test_global_block_refuses_a_non_cubic_grid():
    blk = Block3D(dim=16, num_heads=2, mlp_ratio=2.0, grid_size=8, window_size=0).eval()
    with pytest.raises(ValueError, match="cubic"):
        blk(torch.zeros(1, 8, 8, 6, 16))


def test_naive_reference_is_sensitive():
    """The reference is not vacuous: masking the padded keys (the common mistake) changes the block output."""
    blk = Block3D(dim=16, num_heads=2, mlp_ratio=2.0, grid_size=8, window_size=14).double().eval()
    randomize_(blk, 5, scale=0.3)
    x = torch.randn(1, 8, 8, 8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    masked = Block3D(dim=16, num_heads=2, mlp_ratio=2.0, grid_size=8, window_size=0).double().eval()
    state = blk.state_dict()
    for name in ("rel_pos_d", "rel_pos_h", "rel_pos_w"):  # offsets -7..7 of the 27-row tables
        state[f"attn.{name}"] = state[f"attn.{name}"][6:21]
    masked.load_state_dict(state)
    with torch.no_grad():
        assert rel(masked(x), naive_block(blk, x)) > 1e-3


def test_multi_window_model_img256_patch16():
    """img 256, patch 16: a 16^3 grid; window blocks pad to 28^3 (8 windows of 2744 tokens), global blocks use
    S=16. One head keeps the naive reference at ~1 s."""
    torch.manual_seed(0)
    model = build_sam3d(
        "sam_med3d_turbo",
        img_size=256,
        patch_size=16,
        encoder_embed_dim=16,
        encoder_depth=2,
        encoder_num_heads=1,
        encoder_global_attn_indexes=(1,),
        prompt_embed_dim=48,
        decoder_num_heads=2,
        decoder_mlp_dim=64,
        iou_head_hidden_dim=32,
    ).eval()
    randomize_(model, 7)
    enc = model.image_encoder
    assert enc.blocks[0].window_size == 14 and enc.blocks[1].window_size == 0
    assert enc.blocks[0].attn.rel_pos_d.shape == (27, 16) and enc.blocks[1].attn.rel_pos_d.shape == (31, 16)
    image = torch.randn(1, 1, 256, 256, 256, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        emb = model.encode_image(image)
        assert emb.shape == (1, 48, 16, 16, 16)
        assert rel(emb, naive_encoder(enc, image)) < 1e-4
        pts = (torch.tensor([[[200.0, 31.0, 128.0], [10.0, 250.0, 99.0]]]), torch.tensor([[1, 0]]))
        low, iou = model.decode(emb, points=pts)
        assert low.shape == (1, 1, 64, 64, 64) and iou.shape == (1, 1)
        low2, iou2 = model.decode(emb, points=pts, mask_input=low, multimask_output=True)
        assert low2.shape == (1, 3, 64, 64, 64) and iou2.shape == (1, 3)
        assert model.prompt_encoder.get_dense_pe().shape == (1, 48, 16, 16, 16)


# ---------------------------------------------------------------------------------------------- presets


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = build_sam3d("sam3d_small").eval()
    randomize_(model, 9, scale=0.02)
    return model


@pytest.fixture(scope="module")
def small_embedding(small):
    with torch.no_grad():
        return small.encode_image(torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(1)))


CLICKS = (torch.tensor([[[60.0, 64.0, 70.0], [20.0, 30.0, 40.0]]]), torch.tensor([[1, 0]]))
BOX = torch.tensor([[[40.0, 45.0, 50.0], [90.0, 80.0, 100.0]]])


def test_small_encode_shape(small, small_embedding):
    assert small.img_size == 128 and small.low_res_size == 32
    assert small_embedding.shape == (1, 192, 8, 8, 8)


def test_small_decode_with_points(small, small_embedding):
    with torch.no_grad():
        sparse, dense = small.prompt_encoder(points=CLICKS, boxes=None, masks=None)
        low, iou = small.decode(small_embedding, points=CLICKS)
    assert sparse.shape == (1, 3, 192)  # 2 clicks + the not-a-point token
    assert dense.shape == (1, 192, 8, 8, 8)
    assert low.shape == (1, 1, 32, 32, 32) and iou.shape == (1, 1)
    assert torch.isfinite(low).all()


def test_small_decode_with_boxes(small, small_embedding):
    assert small.supports_boxes and len(small.prompt_encoder.point_embeddings) == 4
    with torch.no_grad():
        sparse, _ = small.prompt_encoder(points=CLICKS, boxes=BOX, masks=None)
        assert sparse.shape == (1, 4, 192)  # 2 clicks + 2 corners, no padding token with a box
        sparse_box, _ = small.prompt_encoder(points=None, boxes=BOX, masks=None)
        assert sparse_box.shape == (1, 2, 192)
        low_box, iou_box = small.decode(small_embedding, boxes=BOX)
        low_both, _ = small.decode(small_embedding, points=CLICKS, boxes=BOX)
        low_pts, _ = small.decode(small_embedding, points=CLICKS)
    assert low_box.shape == (1, 1, 32, 32, 32) and iou_box.shape == (1, 1)
    assert not torch.equal(low_both, low_pts)  # the box counts


def test_small_decode_with_mask_input(small, small_embedding):
    with torch.no_grad():
        low, _ = small.decode(small_embedding, points=CLICKS)
        _, dense = small.prompt_encoder(points=CLICKS, boxes=None, masks=low)
        low2, iou2 = small.decode(small_embedding, points=CLICKS, mask_input=low)
    assert dense.shape == (1, 192, 8, 8, 8)
    assert low2.shape == (1, 1, 32, 32, 32) and iou2.shape == (1, 1)
    assert not torch.equal(low, low2)


def test_small_multimask(small, small_embedding):
    with torch.no_grad():
        low, iou = small.decode(small_embedding, points=CLICKS, multimask_output=True)
        single, single_iou = small.decode(small_embedding, points=CLICKS, multimask_output=False)
    assert low.shape == (1, 3, 32, 32, 32) and iou.shape == (1, 3)
    assert not any(torch.equal(single[0, 0], low[0, i]) for i in range(3))  # token 0 is not among tokens 1-3


def test_small_batch_of_prompt_sets(small, small_embedding):
    """One embedding, two prompt sets: each row equals its own single decode."""
    pts = torch.tensor([[[60.0, 64.0, 70.0]], [[20.0, 30.0, 40.0]]])
    labels = torch.tensor([[1], [0]])
    with torch.no_grad():
        low, iou = small.decode(small_embedding, points=(pts, labels))
        rows = [small.decode(small_embedding, points=(pts[i : i + 1], labels[i : i + 1]))[0] for i in range(2)]
    assert low.shape == (2, 1, 32, 32, 32) and iou.shape == (2, 1)
    for i in range(2):
        assert rel(low[i : i + 1], rows[i]) < 1e-5


def test_turbo_refuses_boxes():
    """The turbo prompt encoder has 2 point embeddings (negative, positive), as published: a box is refused
    with a ValueError, not an IndexError. (The encoder is shrunk: only the prompt side matters here.)"""
    model = build_sam3d("sam_med3d_turbo", encoder_embed_dim=24, encoder_depth=1, encoder_num_heads=2).eval()
    assert not model.supports_boxes and len(model.prompt_encoder.point_embeddings) == 2
    emb = torch.zeros(1, 384, 8, 8, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="box"):
        model.decode(emb, points=CLICKS, boxes=BOX)
    with torch.no_grad(), pytest.raises(ValueError, match="box"):
        model.decode(emb, boxes=BOX)


def test_turbo_preset_size():
    """The preset is the published network: 100,509,232 parameters plus the 3x128 PE buffer (README)."""
    with torch.device("meta"):
        model = build_sam3d("sam_med3d_turbo")
    assert sum(p.numel() for p in model.parameters()) == 100_509_232
    assert [tuple(b.shape) for b in model.buffers()] == [(3, 128)]
    assert [i for i, b in enumerate(model.image_encoder.blocks) if b.window_size == 0] == [2, 5, 8, 11]


def test_config_round_trip_and_validation():
    for cfg in PRESETS.values():
        assert Sam3DConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model settings"):
        Sam3DConfig.from_dict({"img_sz": 64})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_sam3d("sam3d_small", img_size=100)
    with pytest.raises(ValueError, match="unknown model preset"):
        build_sam3d("nope")


@pytest.mark.parametrize("swap", [True, False])
def test_dense_pe_matches_click_code_at_the_cell_centre(swap):
    """A click at a grid cell's centre has that cell's positional code, except that SAM-Med3D's grid (swap on,
    kept for its weights) holds it at the cell mirrored across the first diagonal."""
    from sam3d.models.prompt_encoder import PromptEncoder3D

    torch.manual_seed(0)
    enc = PromptEncoder3D(embed_dim=48, image_embedding_size=4, input_image_size=32, swap_dense_axes=swap)
    dense = enc.get_dense_pe()[0]  # (C, 4, 4, 4); each cell spans 8 voxels, centre at voxel 8 * i + 3.5
    cell = (1, 3, 2)
    click = torch.tensor([[[8 * c + 3.5 for c in cell]]])
    code = enc.pe_layer.points(click, 32)[0, 0]
    where = (cell[1], cell[0], cell[2]) if swap else cell
    torch.testing.assert_close(dense[(slice(None), *where)], code, atol=1e-5, rtol=0)
    if swap:  # and not at the clicked cell itself
        assert not torch.allclose(dense[(slice(None), *cell)], code, atol=1e-3)


def test_own_presets_train_without_the_axis_swap():
    assert PRESETS["sam_med3d_turbo"].swap_dense_pe_axes is True
    assert PRESETS["sam3d_small"].swap_dense_pe_axes is False
    assert Sam3DConfig.from_dict({}).swap_dense_pe_axes is True  # checkpoints saved before the option: turbo layout
