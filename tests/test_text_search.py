"""Whole-volume text search (zoom-out, zoom-in) and click refinement on a real CT, with a tiny RefSAM3D."""

import nibabel as nib
import numpy as np
import pytest
import torch

from offline import no_network  # noqa: F401 - fixture
from sam3d.engine import EngineConfig, LoadedModel, Sam3DInputError
from sam3d.engine.text_search import TextEngine
from sam3d.models import build_network
from sam3d.text import load_text_encoder


@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder()


@pytest.fixture
def ct(shared_data):
    return shared_data / "totalseg_ct" / "image.nii.gz"


def _engine(text_encoder, vocabulary=(), normalize="zscore_foreground", max_windows=4):
    torch.manual_seed(0)
    net = build_network("refsam3d_tiny", vocabulary=list(vocabulary))
    cfg = EngineConfig(spacing=(3.0, 3.0, 3.0), normalize=normalize, max_windows=max_windows)
    return TextEngine(LoadedModel(net.eval(), None, None, "refsam3d_tiny"), cfg, text_encoder=text_encoder)


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_search_geometry_finds_the_structure_on_the_image_grid(text_encoder, ct, no_network):  # noqa: F811
    """A network that marks the window's bright voxels: zoom-out, zoom-in and the way back to the image grid
    must put the mask where the bright voxels of the image are."""
    eng = _engine(text_encoder, normalize="none", max_windows=200)  # enough to cover the bone
    net = eng.model

    def bright(emb, points=None, boxes=None, mask_input=None, multimask_output=False, text=None):
        _, _, image = net.unpack(emb)
        return (image - 200.0) * 0.1, torch.ones(image.shape[0], 1)  # bone (> 200 HU)

    net.decode = bright
    res = eng.segment_text(str(ct), "the spine")
    img = nib.load(str(ct))
    reference = np.asarray(img.dataobj) > 200
    assert res.mask.shape == img.shape and np.allclose(res.affine, img.affine, atol=1e-4)
    assert _dice(res.mask > 0, reference) > 0.95
    assert res.info["windows"][0]["start"] == "zoom-out" and len(res.info["windows"]) > 1


def test_text_then_clicks_with_the_real_network(text_encoder, ct, no_network):  # noqa: F811
    eng = _engine(text_encoder)
    first = eng.segment_text(str(ct), "liver")
    assert first.mask.shape == nib.load(str(ct)).shape and first.mask.dtype == np.uint8
    again = eng.segment_text(str(ct), "liver")  # the same request: the cached answer
    assert np.array_equal(again.mask, first.mask) and again.timings["encode"] == 0.0
    clicked = eng.segment_text(str(ct), "liver", foreground=[[40, 50, 60]])
    assert clicked.mask.shape == first.mask.shape and not np.array_equal(clicked.mask, first.mask)
    assert clicked.info["windows"][0]["size"] == eng.model.img_size
    both = eng.segment_text(str(ct), "liver", foreground=[[40, 50, 60]], background=[[45, 50, 60]])
    assert not np.array_equal(both.mask, clicked.mask)  # the background click changes the answer
    with pytest.raises(Sam3DInputError, match="outside the image"):
        eng.segment_text(str(ct), "liver", foreground=[[999, 0, 0]])


def test_empty_and_unknown_text(text_encoder, ct, no_network):  # noqa: F811
    eng = _engine(text_encoder, vocabulary=["liver", "spleen", "kidney_left"])
    with pytest.raises(Sam3DInputError, match="empty text"):
        eng.segment_text(str(ct), "   ")
    res = eng.segment_text(str(ct), "banana bread recipe")
    assert res.mask.sum() == 0 and res.info["score"] < 0.4 and "not a structure" in res.info["message"]
    known = eng.segment_text(str(ct), "Left kidney")
    assert known.info["closest_name"] == "left kidney" and known.info["text_similarity"] > 0.9
    assert "message" not in known.info
    syn = eng.segment_text(str(ct), "hepatic parenchyma")
    assert syn.info["closest_name"] in ("liver", "hepatic parenchyma")


def test_refuses_a_network_without_text(text_encoder):
    net = build_network("sam3d_small", img_size=32, encoder_depth=1, encoder_global_attn_indexes=(0,))
    with pytest.raises(ValueError, match="text"):
        TextEngine(LoadedModel(net, None, None, "x"), text_encoder=text_encoder)
