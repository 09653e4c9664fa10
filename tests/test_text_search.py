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


def _bright_voxel_engine(text_encoder):
    eng = _engine(text_encoder, normalize="none", max_windows=200)  # enough to cover the bone
    net = eng.model

    def bright(emb, points=None, boxes=None, mask_input=None, multimask_output=False, text=None):
        _, _, image = net.unpack(emb)
        return (image - 200.0) * 0.1, torch.ones(image.shape[0], 1)  # bone (> 200 HU)

    net.decode = bright
    return eng


def test_search_geometry_finds_the_structure_on_the_image_grid(text_encoder, ct, no_network):  # noqa: F811
    """A network that marks the window's bright voxels: zoom-out, zoom-in and the way back to the image grid
    must put the mask where the bright voxels of the image are."""
    eng = _bright_voxel_engine(text_encoder)
    res = eng.segment_text(str(ct), "the spine")
    img = nib.load(str(ct))
    reference = np.asarray(img.dataobj) > 200
    assert res.mask.shape == img.shape and np.allclose(res.affine, img.affine, atol=1e-4)
    assert _dice(res.mask > 0, reference) > 0.95
    assert res.info["windows"][0]["start"] == "zoom-out" and len(res.info["windows"]) > 1


def test_a_scan_of_three_slices_is_searched_as_a_slab(text_encoder, ct, tmp_path, no_network):  # noqa: F811
    """The zoom-out keeps proportions: three slices stay a thin slab (not stretched through the window), and the
    answer comes back on the thin image's grid."""
    img = nib.load(str(ct))
    thin = nib.Nifti1Image(np.asarray(img.dataobj)[..., 50:53], img.affine)
    nib.save(thin, str(tmp_path / "thin.nii.gz"))
    res = _bright_voxel_engine(text_encoder).segment_text(str(tmp_path / "thin.nii.gz"), "the spine")
    reference = np.asarray(thin.dataobj) > 200
    assert res.mask.shape == thin.shape and _dice(res.mask > 0, reference) > 0.9


def test_zoom_out_keeps_proportions_and_comes_back():
    from sam3d.engine.text_search import zoom_out, zoom_out_layout, zoom_out_logits_to_volume

    where, inner = zoom_out_layout((120, 60, 3), 32)
    assert inner == (32, 16, 1) and where == (slice(0, 32), slice(8, 24), slice(15, 16))
    volume = torch.zeros(120, 60, 3)
    volume[30:90, 20:40, :] = 1.0
    window = zoom_out(volume, 32, fill=-5.0)
    assert window[0, 0, 0] == -5.0 and window[where].min() == 0.0  # padding outside, the volume inside
    back = zoom_out_logits_to_volume(window[None, None] - 0.5, (120, 60, 3)) > 0
    assert _dice(back.numpy(), volume.numpy() > 0) > 0.95


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
