"""SegSAM-3D's two ideas on the early-fusion click model (sam3d.models.clicknet: `feature_stages`, `semantic_prompts`):
a network started from the plain model's weights answers exactly as it does, each idea can be switched off, and
once trained the clicks' image features change the answer where they are."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sam3d.engine.model_config import load_model_config
from sam3d.models import ClickNetConfig, build_network

REPO = Path(__file__).resolve().parents[1]
TINY = {"img_size": 16, "filters": 8, "blocks_down": [1, 1, 1, 1]}  # four stages, as the presets
SERVED = load_model_config("clicknet", REPO / "configs")["preset"]  # the default click model's network


def _net(preset=SERVED, **kw):
    torch.manual_seed(0)
    return build_network(preset, **{**TINY, **kw}).eval()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 1, 16, 16, 16, generator=g)
    coords = torch.tensor([[[4.0, 5.0, 6.0], [12.0, 11.0, 10.0]], [[8.0, 8.0, 8.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, 0], [1, -1]])  # the second sample's second click is padding
    return image, (coords, labels), torch.zeros(2, 1, 16, 16, 16)


def _randomise_zero_inits(net):
    """What training does to the zero-initialised projections: make them matter."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("aggregation.", "click_modulation.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_started_from_the_plain_weights_it_answers_as_they_do():
    """The shipped default's network, every weight of it (its geodesic input too), inside SegSAM-3D's."""
    plain, seg = _net(), _net("segsam3d_clicknet")
    missing, unexpected = seg.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(("aggregation.", "click_modulation.")) for k in missing)
    image, points, prev = _inputs()
    with torch.no_grad():
        want, _ = plain.decode(image, points=points, mask_input=prev)
        got, _ = seg.decode(image, points=points, mask_input=prev)
    assert torch.equal(got, want)


def test_the_shipped_default_weights_load_whole_into_it():
    """configs/train/segsam3d_clicknet.yaml starts from models/clicknet.safetensors with init_strict: false; a weight
    of the default that SegSAM-3D's network lacked would be dropped without an error."""
    seg = build_network("segsam3d_clicknet")
    missing, unexpected = seg.load_state_dict(load_file(str(REPO / "models" / "clicknet.safetensors")), strict=False)
    assert not unexpected and all(k.startswith(("aggregation.", "click_modulation.")) for k in missing)


def test_it_sees_images_as_the_default_does():
    """The same engine settings (spacing, intensity and CT window, precision) as the default click model."""
    own = ("name", "preset", "network", "checkpoint")
    default, seg = (load_model_config(m, REPO / "configs") for m in ("clicknet", "segsam3d_clicknet"))
    assert {k: v for k, v in seg.items() if k not in own} == {k: v for k, v in default.items() if k not in own}


def test_each_idea_switches_off_to_the_plain_network():
    plain_keys = set(_net().state_dict())
    assert set(_net("segsam3d_clicknet", feature_stages=[], semantic_prompts=False).state_dict()) == plain_keys
    only_agg = set(_net("segsam3d_clicknet", semantic_prompts=False).state_dict()) - plain_keys
    only_sp = set(_net("segsam3d_clicknet", feature_stages=[]).state_dict()) - plain_keys
    assert only_agg and all(k.startswith("aggregation.") for k in only_agg)
    assert only_sp and all(k.startswith("click_modulation.") for k in only_sp)


def test_trained_semantic_prompts_follow_the_clicks_and_ignore_padding():
    seg = _net("segsam3d_clicknet", feature_stages=[])
    seg.load_state_dict(_net().state_dict(), strict=False)
    _randomise_zero_inits(seg)
    image, (coords, labels), prev = _inputs()
    with torch.no_grad():
        base, _ = seg.decode(image, points=(coords, labels), mask_input=prev)
        moved = coords.clone()
        moved[1, 1] = torch.tensor([15.0, 15.0, 15.0])  # the padding click elsewhere: nothing changes
        same, _ = seg.decode(image, points=(moved, labels), mask_input=prev)
        _, plain_features = seg.net.encode(torch.cat([image, seg.prompt_maps(2, (coords, labels), None, prev)], 1))
    assert torch.allclose(same, base, atol=1e-5)
    # the modulation is the clicks' own: a click's sign and the features sampled under it decide it
    flipped = labels.clone()
    flipped[0, 0] = 0
    with torch.no_grad():
        bottleneck = plain_features[-1]
        a = seg.click_modulation(bottleneck, coords, labels) - bottleneck
        b = seg.click_modulation(bottleneck, coords, flipped) - bottleneck
    assert a.abs().sum() > 0 and not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_trained_aggregation_changes_the_answer_and_learns():
    seg = _net("segsam3d_clicknet", semantic_prompts=False)
    image, points, prev = _inputs()
    seg.train()
    logits, _ = seg.decode(image, points=points, mask_input=prev)
    logits.mean().backward()
    grads = {n: p.grad for n, p in seg.named_parameters() if n.startswith("aggregation.proj")}
    assert grads and all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.endswith("weight"))
    before = logits.detach()
    _randomise_zero_inits(seg)
    with torch.no_grad():
        after, _ = seg.decode(image, points=points, mask_input=prev)
    assert not torch.allclose(after, before)


def test_settings_that_do_not_fit_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="segresnet"):
        ClickNetConfig(backbone="dynunet", semantic_prompts=True)
    with pytest.raises(ValueError, match="stages 0..3"):
        ClickNetConfig(feature_stages=(0, 4))
    cfg = ClickNetConfig.from_dict({"feature_stages": [1, 2], "semantic_prompts": True})
    assert ClickNetConfig.from_dict(cfg.to_dict()) == cfg  # the checkpoint's sidecar round-trips
