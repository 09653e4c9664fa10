"""3D-SAutoMed over a volume (sam3d.engine.auto): slice order, one non-overlapping label volume on the image grid."""

import nibabel as nib
import numpy as np
import pytest
import torch

from sam3d.engine import LoadedModel, Sam3DInputError
from sam3d.engine.auto import AutoEngine, SliceGeometry, slice_schedule
from sam3d.engine.interactive import EngineConfig
from sam3d.models import build_network
from sam3d.models.autosam3d.boxes import label_boxes


@pytest.mark.parametrize("n", [1, 2, 7, 8])
def test_middle_schedule_covers_each_slice_once_from_the_middle(n):
    steps = slice_schedule(n, "middle")
    flat = [t for s in steps for t, _ in s]
    assert sorted(flat) == list(range(n)) and flat[0] == n // 2
    assert len(steps) == max(n // 2, n - 1 - n // 2) + 1  # both branches advance together
    for s in steps[1:]:  # each branch moves one slice away from the middle per step
        for t, b in s:
            assert (t > n // 2) == (b == 0)
    assert [t for s in slice_schedule(n, "top_down") for t, _ in s] == list(range(n - 1, -1, -1))
    with pytest.raises(ValueError):
        slice_schedule(n, "random")


def test_slice_geometry_round_trip():
    geo = SliceGeometry((20, 12), 32)
    x = torch.arange(20 * 12, dtype=torch.float32).reshape(1, 20, 12)
    sq = geo.to_model(x, fill=-1.0)
    assert sq.shape == (1, 1, 32, 32) and sq.min() == -1.0  # padded to a square, then resized
    back = geo.to_slice(sq)
    assert back.shape == (1, 1, 20, 12)
    assert torch.corrcoef(torch.stack([back.flatten(), x.flatten()]))[0, 1] > 0.99


@pytest.fixture
def engine():
    torch.manual_seed(0)
    model = build_network("autosam3d_tiny")
    return AutoEngine(
        LoadedModel(model, None, None, "autosam3d_tiny"), EngineConfig(spacing=(3.0, 3.0, 3.0)), order="middle"
    )


def _image(tmp_path, shape=(23, 17, 9)) -> str:
    """An oblique, anisotropic, LPS-ish image, so that the output grid has to be the image's own."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=shape).astype(np.float32)
    data[5:15, 4:12, 2:7] += 4.0  # a bright block
    affine = np.diag([-2.5, -2.0, 4.0, 1.0])
    c, s = np.cos(0.2), np.sin(0.2)
    affine[:3, :3] = affine[:3, :3] @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine[:3, 3] = [10, -20, 30]
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def test_label_volume_on_the_image_grid_with_classes(engine, tmp_path):
    path = _image(tmp_path)
    res = engine.segment(path)
    img = nib.load(path)
    assert res.mask.shape == img.shape and np.allclose(res.affine, img.affine)
    assert res.mask.dtype == np.uint8 and set(np.unique(res.mask)) <= {0, 1, 2, 3}  # one class per voxel
    assert res.info["label_names"] == {"liver": 1, "spleen": 2, "kidney_right": 3}
    assert sum(res.info["voxels"].values()) == int((res.mask > 0).sum())
    out = tmp_path / "out.nii.gz"
    engine.write_label(res, str(out))
    saved = nib.load(str(out))
    assert np.array_equal(np.asarray(saved.dataobj), res.mask) and np.allclose(saved.affine, img.affine)
    again = engine.segment(path)  # same image, same weights: the cached answer
    assert again.info["cached"] and np.array_equal(again.mask, res.mask)
    with pytest.raises(Sam3DInputError):
        engine.segment(path, order="sideways")


def test_model_grid_labels_follow_the_logits_argmax_and_state_is_carried(engine):
    """Every slice gets the argmax of its own logits (background first), so classes cannot overlap; each step
    receives the history and the boxes of the slice before it."""
    feats = torch.randn(5, engine.model.config.embed_dim, 4, 4)
    geo = SliceGeometry((16, 16), engine.model.img_size)
    seen, inputs = [], []
    real_step = engine.model.step

    def spy(*args, **kw):
        out = real_step(*args, **kw)
        seen.append(out)
        inputs.append(args)
        return out

    engine.model.step = spy
    with torch.no_grad():
        labels, confidence = engine._run_slices(feats, geo, "top_down")
    assert labels.shape == (16, 16, 5) and len(confidence) == 3
    assert all(c is None or 1 / 4 <= c <= 1 for c in confidence)  # the argmax of 4 classes: at least 1/4
    for i, t in enumerate(range(4, -1, -1)):  # top_down: slice 4 first
        assert torch.equal(labels[..., t], geo.to_slice(seen[i]["logits"]).argmax(1)[0].to(labels.dtype))
    assert inputs[0][4] is None  # the first slice: default anchors
    for i in range(1, 5):
        _, _, _, history, boxes, present = inputs[i]
        assert torch.equal(history, seen[i - 1]["history"])
        want_boxes, want_present = label_boxes(seen[i - 1]["logits"].argmax(1), 3)
        assert torch.equal(boxes, want_boxes) and torch.equal(present, want_present)
