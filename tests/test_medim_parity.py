"""Parity with medim 0.1.2's "SAM-Med3D" (the official SAM-Med3D-turbo network) under random weights.

medim builds the network with `pretrained=False` (no download; HF_HUB_OFFLINE=1 in case). Its seeded random
initialisation, with the zero-initialised tensors (relative-position tables, absolute position embedding) and
the norm parameters perturbed so that every path matters, is loaded into ours with strict=True. The two then
see the same input and the same prompts: rel = max|got - ref| / max|ref| < 1e-4 everywhere. Small encoders with
a window smaller than the grid cover the multi-window path that the turbo network's 8^3 grid never takes.
"""

import os
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from sam3d.models import build_sam3d

medim = pytest.importorskip("medim")

TOL = 1e-4


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max())


def randomize_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".rel_pos_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("pos_embed"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # LayerNorm weights (ones) and biases (zeros), and Linear/conv biases
                p.add_(0.02 * torch.randn(p.shape, generator=g))


def make_pair(medim_kwargs: dict, our_overrides: dict, seed: int):
    torch.manual_seed(seed)
    ref = medim.create_model("SAM-Med3D", pretrained=False, **medim_kwargs).eval()
    randomize_(ref, seed + 1)
    with torch.device("meta"):
        ours = build_sam3d("sam_med3d_turbo", **our_overrides)
    result = ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ref.eval(), ours.eval()


def run_prompts(model, emb, points, mask_input, multimask, ours: bool):
    pe = model.prompt_encoder
    sparse, dense = pe(points=points, boxes=None, masks=mask_input)
    low, iou = model.mask_decoder(
        image_embeddings=emb,
        image_pe=pe.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )
    if ours:  # the public entry point must give the same as the parts
        low2, iou2 = model.decode(emb, points=points, mask_input=mask_input, multimask_output=multimask)
        assert torch.equal(low, low2) and torch.equal(iou, iou2)
    return {"sparse": sparse, "dense": dense, "low_res_masks": low, "iou": iou}


def compare_session(ref, ours, emb, steps):
    """`steps`: (points (B,N,3), labels (B,N), use previous logits as mask input, multimask). Each step feeds
    medim's previous single-mask logits to both models, so every step is compared in isolation."""
    rels, prev = {}, None
    for i, (coords, labels, with_mask, multimask) in enumerate(steps):
        mask_input = prev if with_mask else None
        got = run_prompts(ours, emb, (coords, labels), mask_input, multimask, ours=True)
        want = run_prompts(ref, emb, (coords, labels), mask_input, multimask, ours=False)
        for k in got:
            rels[f"step{i}_{k}"] = rel(got[k], want[k])
        if not multimask:
            prev = want["low_res_masks"]
    return rels


def assert_close(rels):
    bad = {k: v for k, v in rels.items() if not v < TOL}
    assert not bad, f"rel >= {TOL:g}: {bad}"


@pytest.fixture(scope="module")
def turbo_pair():
    return make_pair({}, {}, seed=0)


@pytest.fixture(scope="module")
def turbo_embeddings(turbo_pair):
    ref, ours = turbo_pair
    x = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return ours.encode_image(x), ref.image_encoder(x)


def test_turbo_encoder(turbo_embeddings):
    got, want = turbo_embeddings
    assert got.shape == (1, 384, 8, 8, 8)
    assert rel(got, want) < TOL


def test_turbo_dense_pe(turbo_pair):
    ref, ours = turbo_pair
    assert rel(ours.prompt_encoder.get_dense_pe(), ref.prompt_encoder.get_dense_pe()) < TOL


def test_turbo_decoder_clicks(turbo_pair, turbo_embeddings):
    ref, ours = turbo_pair
    emb = turbo_embeddings[1]  # medim's embedding into both decoders: the decoder is compared on its own
    pos1, neg, pos2 = [64.0, 70.0, 60.0], [30.0, 90.0, 100.0], [80.0, 51.0, 66.0]
    steps = [
        (torch.tensor([[pos1]]), torch.tensor([[1]]), False, False),  # first click, no mask
        (torch.tensor([[pos1]]), torch.tensor([[1]]), False, True),  # multimask
        (torch.tensor([[pos1, neg]]), torch.tensor([[1, 0]]), True, False),  # + negative, previous logits
        (torch.tensor([[pos1, neg, pos2]]), torch.tensor([[1, 0, 1]]), True, False),
        (torch.tensor([[pos1, neg, pos2]]), torch.tensor([[1, 0, 1]]), True, True),
        (torch.tensor([[neg]]), torch.tensor([[0]]), False, False),  # a lone negative click
        # two prompt sets against one embedding
        (torch.tensor([[pos1, neg], [pos2, pos1]]), torch.tensor([[1, 0], [1, 1]]), False, False),
    ]
    with torch.no_grad():
        assert_close(compare_session(ref, ours, emb, steps))


@pytest.mark.parametrize("grid, window", [(8, 5), (6, 4)])
def test_multi_window_encoder(grid, window):
    """medim's encoder class with a window smaller than the grid (its SAM-Med3D builder fixes 14, which an 8^3
    grid never exceeds): grid 8, window 5 pads to 10^3 = 8 windows; grid 6, window 4 pads to 8^3 = 8 windows.
    Global blocks use S = grid. Turbo widths are not needed here: 48 channels, 2 heads, 3 blocks."""
    from medim.models.sam_med3d import ImageEncoderViT3D as MedimEncoder

    from sam3d.models.image_encoder import ImageEncoderViT3D

    size = dict(
        img_size=2 * grid,
        patch_size=2,
        embed_dim=48,
        depth=3,
        num_heads=2,
        out_chans=24,
        window_size=window,
        global_attn_indexes=(1,),
    )
    torch.manual_seed(5)
    ref = MedimEncoder(**size, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True).eval()
    randomize_(ref, 6)
    ours = ImageEncoderViT3D(**size).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.blocks[0].attn.rel_pos_d.shape == (2 * window - 1, 24)
    assert ours.blocks[1].attn.rel_pos_d.shape == (2 * grid - 1, 24)
    x = torch.randn(2, 1, 2 * grid, 2 * grid, 2 * grid, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got, want = ours(x), ref(x)
    assert got.shape == (2, 24, grid, grid, grid)
    assert rel(got, want) < TOL
