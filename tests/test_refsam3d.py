"""RefSAM3D network: adapters, projector, hierarchical cross-attention, full-resolution decoder, checkpoints."""

import pytest
import torch

from sam3d.engine import load_model, save_checkpoint
from sam3d.models import REFSAM3D_PRESETS, RefSam3D, RefSam3DConfig, build_network
from sam3d.models.adapter import Adapter3D
from sam3d.models.cross_modal import CrossModalProjector, HierarchicalCrossAttention

S = 32  # refsam3d_tiny's window


def _text(b=1, length=5, dim=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, length, dim, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[:, length - 1] = False  # padding must be ignored
    return tokens, mask


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_network("refsam3d_tiny").eval()


def test_adapter_starts_as_identity_and_keeps_shape():
    ad = Adapter3D(32, 8)
    x = torch.randn(2, 4, 4, 4, 32)
    assert torch.equal(ad(x), x)
    torch.nn.init.normal_(ad.up.weight)
    y = ad(x)
    assert y.shape == x.shape and not torch.allclose(y, x)


def test_projector_and_cross_attention_shapes():
    proj = CrossModalProjector(384, 32)
    tokens, mask = _text(2)
    p = proj(tokens)
    assert p.shape == (2, 5, 32)
    assert isinstance(CrossModalProjector(384, 32, layers=1).mlp, torch.nn.Linear)
    hca = HierarchicalCrossAttention(32, 2, 4, 48, stages=(0, 1, 2, 3))
    torch.nn.init.normal_(hca.fuse.weight)
    stages = [torch.randn(2, 2, 2, 2, 32) for _ in range(4)]
    dense, out = hca(stages, p, mask)
    assert dense.shape == (2, 48, 2, 2, 2)
    assert [o.shape for o in out] == [(2, 32, 2, 2, 2)] * 4
    # padding tokens do not matter
    p2 = p.clone()
    p2[:, -1] = 1e3
    dense2, _ = hca(stages, p2, mask)
    assert torch.allclose(dense, dense2, atol=1e-5)
    last_only = HierarchicalCrossAttention(32, 2, 4, 48, stages=(3,))
    _, out = last_only(stages, p, mask)
    assert torch.equal(out[0], stages[0].permute(0, 4, 1, 2, 3))


def test_stage_indexes_default_to_four_spread_blocks():
    assert REFSAM3D_PRESETS["refsam3d_turbo"].stages == (2, 5, 8, 11)
    assert REFSAM3D_PRESETS["refsam3d_small"].stages == (0, 2, 3, 5)
    with pytest.raises(ValueError, match="patch_size must be 16"):
        RefSam3DConfig(img_size=64, patch_size=8)


def test_full_resolution_output_for_text_clicks_and_both(model):
    img = torch.randn(1, 1, S, S, S)
    emb = model.encode_image(img)
    text = _text()
    logits, iou = model.decode(emb, text=text)
    assert logits.shape == (1, 1, S, S, S) and iou.shape == (1, 1)
    pts = (torch.tensor([[[10.0, 12.0, 14.0]]]), torch.tensor([[1]]))
    clicked, _ = model.decode(emb, points=pts, mask_input=logits, text=text)
    assert clicked.shape == (1, 1, S, S, S)
    assert not torch.allclose(clicked, logits)  # the click (and the previous mask) change the answer
    alone, _ = model.decode(emb, points=pts)  # clicks alone, as the interactive engine sends them
    assert alone.shape == (1, 1, S, S, S) and not torch.allclose(alone, clicked)
    other, _ = model.decode(emb, text=_text(seed=1))
    assert not torch.allclose(other, logits)  # the text matters
    batch, _ = model.decode(model.encode_image(torch.randn(2, 1, S, S, S)), text=_text(2))
    assert batch.shape == (2, 1, S, S, S)
    # the ablations of the paper's Table IV: a linear projector, the last stage alone
    ablated = build_network("refsam3d_tiny", projector_layers=1, hierarchical=False).eval()
    assert len(ablated.cross_attention.blocks) == 1 and isinstance(ablated.text_projector.mlp, torch.nn.Linear)
    assert ablated.decode(ablated.encode_image(img), text=text)[0].shape == (1, 1, S, S, S)


def test_frozen_encoder_gets_no_gradient_adapters_do(model):
    model.train()
    for p in model.image_encoder.parameters():
        p.requires_grad_(False)
    for ad in model.adapters:  # as after some training: the zero up-projection would block the down path
        torch.nn.init.normal_(ad.up.weight, std=0.02)
    emb = model.encode_image(torch.randn(1, 1, S, S, S))
    logits, iou = model.decode(emb, text=_text())
    (logits.sigmoid().mean() + iou.sum()).backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    for name in ("adapters", "text_projector", "cross_attention", "text_token", "mask_decoder"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    assert all(ad.down.weight.grad.abs().sum() > 0 for ad in model.adapters)


def test_checkpoint_round_trip_through_load_model(model, tmp_path):
    path = tmp_path / "refsam3d.safetensors"
    save_checkpoint(model, path, {"preset": "refsam3d_tiny", "network": {"vocabulary": ["liver", "spleen"]}})
    loaded = load_model({"checkpoint": str(path), "preset": "sam3d_small"})  # the file's network wins
    assert isinstance(loaded.model, RefSam3D)
    assert loaded.model.config.vocabulary == ("liver", "spleen")
    img, text = torch.randn(1, 1, S, S, S), _text()
    with torch.no_grad():
        a, _ = model.decode(model.encode_image(img), text=text)
        b, _ = loaded.model.decode(loaded.model.encode_image(img), text=text)
    assert torch.allclose(a, b, atol=1e-5)


def test_turbo_encoder_weights_fit_refsam3d_turbo():
    """The encoder and prompt encoder keep SAM-Med3D's names and shapes: turbo weights initialise them."""
    small = {"encoder_depth": 4, "encoder_global_attn_indexes": (1, 3)}
    ref = build_network("refsam3d_turbo", **small).state_dict()
    turbo = build_network("sam_med3d_turbo", **small).state_dict()
    shared = [k for k in turbo if k.startswith(("image_encoder.", "prompt_encoder.pe_layer", "prompt_encoder.mask"))]
    assert shared and all(ref[k].shape == turbo[k].shape for k in shared)
