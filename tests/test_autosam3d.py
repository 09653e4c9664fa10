"""3D-SAutoMed network: local 3D awareness, the history token, the box-prompt generator, multi-class output."""

import pytest
import torch

from sam3d.engine import load_model, save_checkpoint
from sam3d.models import AUTOSAM3D_PRESETS, AutoSam3D, build_network
from sam3d.models.autosam3d.boxes import label_boxes

S = AUTOSAM3D_PRESETS["autosam3d_tiny"].img_size
K = len(AUTOSAM3D_PRESETS["autosam3d_tiny"].class_names)


def _model(seed=0, **overrides) -> AutoSam3D:
    torch.manual_seed(seed)
    return build_network("autosam3d_tiny", **overrides).eval()


def _slices(n=8, seed=1) -> torch.Tensor:
    return torch.randn(n, 1, S, S, generator=torch.Generator().manual_seed(seed))


def _logits_at(model, slices, t):
    """Slice t's logits from the raw slices (encoder, then t's neighbours), with the initial history and no boxes."""
    with torch.no_grad():
        f = model.encode(slices)
        return model.step(f[t - 1 : t], f[t : t + 1], f[t + 1 : t + 2], model.initial_history(1))["logits"]


def test_inter_slice_attention_sees_the_neighbours_only():
    model, x, t = _model(), _slices(), 3
    base = _logits_at(model, x, t)
    assert base.shape == (1, K + 1, S // 8 * 4, S // 8 * 4)
    below = x.clone()
    below[t - 1] = torch.randn(1, S, S)
    assert not torch.allclose(_logits_at(model, below, t), base, atol=1e-5)
    far = x.clone()
    far[t + 3] = torch.randn(1, S, S)
    torch.testing.assert_close(_logits_at(model, far, t), base)
    # without the local module, slice t-1 no longer matters
    plain = _model(local_attention=False)
    torch.testing.assert_close(_logits_at(plain, below, t), _logits_at(plain, x, t))


def test_history_token_changes_across_slices_and_steers_the_next_one():
    model, x = _model(), _slices()
    with torch.no_grad():
        f = model.encode(x)
        hist = model.initial_history(1)
        seen = [hist]
        for t in range(1, 5):
            hist = model.step(f[t - 1 : t], f[t : t + 1], f[t + 1 : t + 2], hist)["history"]
            seen.append(hist)
        assert hist.shape == (1, AUTOSAM3D_PRESETS["autosam3d_tiny"].history_tokens, model.config.embed_dim)
        for a, b in zip(seen, seen[1:]):
            assert not torch.allclose(a, b, atol=1e-4)
        trio = (f[4:5], f[5:6], f[6:7])
        assert not torch.allclose(model.step(*trio, seen[1])["logits"], model.step(*trio, seen[3])["logits"], atol=1e-5)
    assert _model(history_tokens=0).step(f[0:1], f[1:2], f[2:3])["history"] is None


def test_box_generator_shapes_and_previous_box_seeds_the_anchor():
    model, x = _model(), _slices(3)
    with torch.no_grad():
        f = model.encode(x)
        trio = (f[0:1], f[1:2], f[2:3])
        first = model.step(*trio)
        default = model.box_generator.default_anchor.sigmoid()[None]
        torch.testing.assert_close(first["anchors"], default)  # t = 0: the learned default query
        prev = torch.tensor([[[0.3, 0.4, 0.2, 0.1], [0.6, 0.6, 0.3, 0.3], [0.5, 0.5, 0.5, 0.5]]])
        present = torch.tensor([[True, False, True]])
        out = model.step(*trio, prev_boxes=prev, prev_present=present)
        assert out["anchors"][0, 0].tolist() == pytest.approx(prev[0, 0].tolist())
        assert out["anchors"][0, 2].tolist() == pytest.approx(prev[0, 2].tolist())
        torch.testing.assert_close(out["anchors"][0, 1], default[0, 1])  # absent there: the default again
        assert len(out["boxes"]) == model.config.box_depth and out["boxes"][-1].shape == (1, K, 4)
        assert ((out["boxes"][-1] > 0) & (out["boxes"][-1] < 1)).all()
        # the box head starts at zero: the first layer's box is the anchor it was seeded with
        torch.testing.assert_close(out["boxes"][0], out["anchors"], atol=1e-5, rtol=0)
        assert not torch.allclose(out["logits"], first["logits"], atol=1e-5)  # the prompts reach the masks
    assert _model(box_prompts=False).step(*trio)["boxes"] == []


def test_label_boxes():
    lab = torch.zeros(1, 10, 20, dtype=torch.long)
    lab[0, 2:4, 5:15] = 2  # rows 2-3, columns 5-14
    boxes, present = label_boxes(lab, 3)
    assert present.tolist() == [[False, True, False]]
    assert boxes[0, 1].tolist() == pytest.approx([0.5, 0.3, 0.5, 0.2])
    assert boxes[0, 0].tolist() == [0, 0, 0, 0]


def test_checkpoint_round_trip_keeps_classes(tmp_path):
    model = _model(class_names=["liver", "aorta"])
    path = tmp_path / "auto.safetensors"
    save_checkpoint(model, path, {"preset": "autosam3d_tiny", "network": model.config.to_dict()})
    loaded = load_model({"checkpoint": str(path)})
    assert isinstance(loaded.model, AutoSam3D) and loaded.model.class_names == ["liver", "aorta"]
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
