"""`Sam3DPredictor`, the front door: a path or an array in, masks on the image's own grid out, one verb per action,
and unsupported prompts refused with the reason."""

import nibabel as nib
import numpy as np
import pytest
import torch

from sam3d import Sam3DPredictor
from sam3d.engine.checkpoint import save_checkpoint
from sam3d.models import build_network, model_kind


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = build_network("clicknet_small", img_size=16, filters=8, blocks_down=[1, 1, 1])
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_checkpoint(net, path, {"preset": "clicknet_small", "network": net.config.to_dict()})
    return path


def test_kinds_come_from_the_preset():
    assert model_kind("clicknet_small") == model_kind("sam_med3d_turbo") == "point"
    assert model_kind("refsam3d_small") == "text" and model_kind("autosam3d_small") == "auto"
    with pytest.raises(ValueError, match="unknown model preset"):
        model_kind("nope")


def test_a_path_and_the_same_array_give_the_same_mask(tiny_checkpoint, shared_data):
    predictor = Sam3DPredictor.from_pretrained(str(tiny_checkpoint))
    assert predictor.kind == "point" and predictor.model_config["preset"] == "clicknet_small"
    path = shared_data / "totalseg_ct" / "image.nii.gz"
    predictor.set_image(path)
    from_path, scores = predictor.predict(points=[[60, 50, 56]], point_labels=[1])
    img = nib.load(str(path))
    predictor.set_image(np.asarray(img.dataobj, dtype=np.float32), affine=img.affine)
    from_array, _ = predictor.predict(points=[[60, 50, 56]], point_labels=[1])
    assert from_path.shape == img.shape and from_path.dtype == np.uint8 and scores.shape == (1,)
    assert np.array_equal(from_path, from_array)
    two, _ = predictor.predict(points=[[60, 50, 56], [30, 30, 30]], point_labels=[1, 0])
    assert two.shape == img.shape


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p.predict(points=[[1, 2, 3]], point_labels=[1], multimask=True), "one mask per prompt"),
        (lambda p: p.predict(points=[[1, 2, 3]], text="liver"), "does not read text"),
        (lambda p: p.predict(points=[[1, 2, 3]], point_labels=[2]), "point_labels"),
        (lambda p: p.predict(points=[[1, 2, 3], [4, 5, 6]], point_labels=[1]), "2 points but 1"),
        (lambda p: p.predict(box=[1, 2, 3]), "box must be"),
        (lambda p: p.segment_all(), "needs an automatic model"),
    ],
)
def test_unsupported_prompts_are_refused_with_the_reason(tiny_checkpoint, call, message):
    predictor = Sam3DPredictor.from_pretrained(str(tiny_checkpoint))
    predictor.set_image(np.random.default_rng(0).normal(size=(20, 20, 20)))
    with pytest.raises(ValueError, match=message):
        call(predictor)


def test_no_image_and_bad_arrays_are_refused(tiny_checkpoint):
    predictor = Sam3DPredictor.from_pretrained(str(tiny_checkpoint))
    with pytest.raises(ValueError, match="set_image first"):
        predictor.predict(points=[[1, 2, 3]])
    with pytest.raises(ValueError, match="3D array"):
        predictor.set_image(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="4x4"):
        predictor.set_image(np.zeros((4, 4, 4)), affine=np.eye(3))


def test_an_automatic_model_segments_all_and_refuses_prompts(shared_data):
    predictor = Sam3DPredictor.from_pretrained("autosam3d")  # the shipped 3D-SAutoMed weights
    predictor.set_image(shared_data / "totalseg_ct" / "image.nii.gz")
    labels, names = predictor.segment_all()
    assert (
        names["liver"] in np.unique(labels)
        and labels.shape == nib.load(str(shared_data / "totalseg_ct" / "image.nii.gz")).shape
    )
    with pytest.raises(ValueError, match="segment_all"):
        predictor.predict(points=[[60, 50, 56]])


def test_a_model_without_weights_says_so():
    from sam3d.engine import WeightsMissingError

    with pytest.raises(WeightsMissingError, match="checkpoint not found"):
        Sam3DPredictor.from_pretrained("segsam3d")


def test_a_new_foreground_click_after_a_background_one_continues_the_sequence():
    from sam3d.engine.interactive import _extends

    roi = ("roi", None)
    before = [(1, 2, 3, True), (9, 9, 9, False), roi]  # clients send the foreground and background lists apart
    assert _extends([(1, 2, 3, True), (4, 5, 6, True), (9, 9, 9, False), roi], before)
    assert not _extends([(4, 5, 6, True), (9, 9, 9, False), roi], before)  # a click taken back: start afresh
    assert not _extends([(1, 2, 3, True), (9, 9, 9, False), ("roi", [[0, 0, 0], [5, 5, 5]])], before)
