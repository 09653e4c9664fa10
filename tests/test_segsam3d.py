"""SegSAM-3D: the sinusoidal code of eq. 3, feature sampling (eq. 4), the semantic point prompt (eq. 5-8) and
multi-layer feature sampling (eq. 9), on tiny networks."""

import math

import pytest
import torch

from sam3d.models import PRESETS, Sam3DConfig, build_sam3d
from sam3d.models.segsam3d import LayerAggregation, SemanticPointPrompt, sample_features, sinusoidal_code

TINY = dict(
    img_size=32,
    patch_size=8,
    encoder_embed_dim=48,
    encoder_depth=3,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(0, 1, 2),
    prompt_embed_dim=48,
    decoder_num_heads=4,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=16,
    mask_in_chans=8,
)


def _tiny(**more):
    torch.manual_seed(0)
    return build_sam3d("sam3d_small", **{**TINY, **more}).eval()


def test_sinusoidal_code_is_eq3_on_hand_computed_points():
    code = sinusoidal_code(torch.tensor([[0.0, 32.0, 64.0], [16.0, 96.0, 112.0]]), 128)
    s2 = math.sqrt(0.5)
    expected = torch.tensor(
        [
            [0, 1, 1, 0, 0, -1],  # 0, pi/2, pi
            [s2, s2, -1, 0, -s2, s2],
        ]
    )  # pi/4, 3pi/2, 7pi/4
    torch.testing.assert_close(code, expected, atol=1e-6, rtol=0)
    # per-axis sizes (W, H, D of eq. 3)
    torch.testing.assert_close(
        sinusoidal_code(torch.tensor([8.0, 8.0, 8.0]), (32, 16, 64))[0::2],
        torch.sin(torch.tensor([math.pi / 2, math.pi, math.pi / 4])),
        atol=1e-6,
        rtol=0,
    )


def test_sampled_feature_at_a_cell_centre_is_that_cell():
    features = torch.randn(2, 5, 4, 4, 4)
    # window of 32 voxels over 4 cells: cell i's centre is voxel index 8 * i + 3.5
    cells = torch.tensor([[[1, 2, 3], [0, 0, 0]], [[3, 1, 0], [2, 2, 1]]])
    got = sample_features(features, 8 * cells.float() + 3.5, 32)
    for b in range(2):
        for n in range(2):
            i, j, k = cells[b, n].tolist()
            torch.testing.assert_close(got[b, n], features[b, :, i, j, k])
    # half-way between two cells along the last axis: their mean (trilinear)
    mid = sample_features(features, torch.tensor([[[11.5, 19.5, 7.5]]]).expand(2, 1, 3), 32)
    torch.testing.assert_close(mid[0, 0], (features[0, :, 1, 2, 0] + features[0, :, 1, 2, 1]) / 2)


def test_semantic_prompt_moves_smoothly_with_the_click():
    torch.manual_seed(0)
    sp = SemanticPointPrompt(48, 32, num_heads=4, mlp_dim=64)
    emb = torch.randn(1, 48, 4, 4, 4)
    p = torch.tensor([[[12.0, 14.0, 9.0]]])
    with torch.no_grad():
        base = sp.refine(p, emb)
        steps = [float((sp.refine(p + torch.tensor([0.0, 0.0, d]), emb) - base).norm()) for d in (0.25, 0.5, 1.0)]
        far = float((sp.refine(torch.tensor([[[28.0, 2.0, 25.0]]]), emb) - base).norm())
    assert 0 < steps[0] < steps[1] < steps[2] < 0.5 * far  # continuous in p, and far clicks differ more
    assert steps[2] < 3 * steps[1] and steps[1] < 3 * steps[0]  # no jump within a voxel


def test_semantic_prompts_start_as_the_plain_model_and_then_matter():
    plain, semantic = _tiny(), _tiny(semantic_prompts=True)
    missing, unexpected = semantic.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("semantic_prompt.") for k in missing)
    img = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    pts = (torch.tensor([[[10.0, 12.0, 14.0], [20.0, 8.0, 5.0]]]), torch.tensor([[1, 0]]))
    with torch.no_grad():
        emb = plain.encode_image(img)
        a, _ = plain.decode(emb, points=pts)
        b, _ = semantic.decode(emb, points=pts)
        torch.testing.assert_close(a, b)  # zero-initialised output projection
        torch.nn.init.normal_(semantic.semantic_prompt.out_proj.weight, std=0.1)
        c, _ = semantic.decode(emb, points=pts)
        flipped, _ = semantic.decode(emb, points=(pts[0], 1 - pts[1]))
    assert not torch.allclose(a, c)
    assert not torch.allclose(c, flipped)  # positive and negative clicks both reach the decoder


def test_padding_token_is_not_refined():
    m = _tiny(semantic_prompts=True)
    torch.nn.init.normal_(m.semantic_prompt.out_proj.weight, std=0.1)
    emb = torch.randn(1, 48, 4, 4, 4)
    pts = (torch.tensor([[[10.0, 12.0, 14.0]]]), torch.tensor([[1]]))
    sparse, _ = m.prompt_encoder(points=pts, boxes=None, masks=None)
    seen = {}
    hook = m.mask_decoder.register_forward_pre_hook(lambda mod, args, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        m.decode(emb, points=pts)
    hook.remove()
    got = seen["sparse_prompt_embeddings"]
    torch.testing.assert_close(got[:, 1], sparse[:, 1])  # SAM's "not a point" padding
    assert not torch.allclose(got[:, 0], sparse[:, 0])


def test_aggregation_weights_get_gradients_and_mix_the_stages():
    m = _tiny(feature_stages=(0, 1, 2))
    m.train()
    agg = m.image_encoder.aggregation
    torch.testing.assert_close(agg.weights, torch.full((3,), 1 / 3))  # softmax-normalised, equal at the start
    emb = m.encode_image(torch.randn(1, 1, 32, 32, 32))
    logits, _ = m.decode(emb, points=(torch.tensor([[[10.0, 12.0, 14.0]]]), torch.tensor([[1]])))
    logits.square().mean().backward()
    assert agg.logits.grad is not None and agg.logits.grad.abs().sum() > 0
    feats = [torch.full((1, 2, 2, 2, 4), float(v)) for v in (1, 2, 6)]
    mix = LayerAggregation(3)
    with torch.no_grad():
        mix.logits.copy_(torch.log(torch.tensor([1.0, 1.0, 2.0])))  # weights 1/4, 1/4, 1/2
        assert float(mix(feats).mean()) == pytest.approx(0.25 * 1 + 0.25 * 2 + 0.5 * 6)


def test_feature_stages_are_validated():
    with pytest.raises(ValueError, match="feature_stages"):
        Sam3DConfig.from_dict({**TINY, "feature_stages": [0, 1]})  # must end with the last block (2)
    with pytest.raises(ValueError, match="feature_stages"):
        Sam3DConfig.from_dict({**TINY, "feature_stages": [2, 0, 2]})
    assert PRESETS["segsam3d"].feature_stages == (1, 3, 5) and PRESETS["segsam3d"].semantic_prompts
    assert PRESETS["segsam3d_turbo"].feature_stages == PRESETS["sam_med3d_turbo"].encoder_global_attn_indexes


def test_segsam3d_turbo_starts_from_turbo_weights():
    """The turbo layout keeps every key of the published model; only SegSAM-3D's own modules are new."""
    turbo = build_sam3d("sam_med3d_turbo", **{**TINY, "encoder_depth": 4, "encoder_global_attn_indexes": (1, 3)})
    turbo_keys = set(turbo.state_dict())
    seg = build_sam3d(
        "segsam3d_turbo",
        **{**TINY, "encoder_depth": 4, "encoder_global_attn_indexes": (1, 3), "feature_stages": (1, 3)},
    )
    new = set(seg.state_dict()) - turbo_keys
    assert turbo_keys <= set(seg.state_dict())
    assert new and all(k.startswith(("semantic_prompt.", "image_encoder.aggregation.")) for k in new)
