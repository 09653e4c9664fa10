"""The `sam3d_text` infer task in-process with a tiny RefSAM3D checkpoint: text or label as the prompt, clicks,
HTTP errors, missing weights."""

import nibabel as nib
import numpy as np
import pytest
import torch
from fastapi import HTTPException

from offline import no_network  # noqa: F401 - fixture
from sam3d.engine import save_checkpoint
from sam3d.models import build_network
from sam3d.monailabel import TaskSpec
from sam3d.monailabel.infer_text import Sam3DTextInfer

LABELS = {"liver": 5, "spleen": 1, "kidney_left": 3}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "refsam3d_tiny.safetensors"
    network = {"vocabulary": ["liver", "spleen", "kidney_left"]}
    save_checkpoint(build_network("refsam3d_tiny", **network), path, {"preset": "refsam3d_tiny", "network": network})
    return path


@pytest.fixture(scope="module")
def ct(shared_data):
    return str(shared_data / "totalseg_ct" / "image.nii.gz")


def task(checkpoint, **more) -> Sam3DTextInfer:
    cfg = {
        "preset": "refsam3d_tiny",
        "checkpoint": str(checkpoint),
        "spacing": [3.0, 3.0, 3.0],
        "max_windows": 2,
        **more,
    }
    return Sam3DTextInfer(TaskSpec("sam3d_text", "refsam3d", cfg, "text task", dict(LABELS)), device="cpu")


def _422(t, request, match):
    with pytest.raises(HTTPException) as e:
        t(request)
    assert e.value.status_code == 422 and match in e.value.detail, e.value.detail


def test_label_alone_then_text_and_clicks(checkpoint, ct, tmp_path, no_network):  # noqa: F811
    t = task(checkpoint)
    assert t.info()["type"] == "deepgrow" and t.status()[0] == "not_loaded"
    out, res = t({"image": ct, "label": "liver"})
    mask = np.asarray(nib.load(out).dataobj)
    assert mask.shape == nib.load(ct).shape
    assert res["label"] == "liver" and res["closest_name"] == "liver" and res["windows"][0]["start"] == "zoom-out"
    assert res["label_names"] == {"liver": 1} and res["model_id"] and "score" in res
    out2, res2 = t({"image": ct, "text": "the liver", "label": "liver", "foreground": [[60, 50, 56]]})
    assert res2["label"] == "the liver" and res2["windows"][0]["size"] == 32
    assert not np.array_equal(np.asarray(nib.load(out2).dataobj), mask)
    _, unknown = t({"image": ct, "text": "a banana"})
    assert unknown["voxels"] == 0 and unknown["score"] < 0.4 and "not a structure" in unknown["message"]


def test_errors_are_http(checkpoint, ct, no_network):  # noqa: F811
    t = task(checkpoint)
    _422(t, {"image": ct}, "no text")
    _422(t, {"image": ct, "text": "   "}, "no text")
    _422(t, {"image": ct, "label": "femur_left"}, "unknown label")
    _422(t, {"image": ct, "text": "liver", "roi": [1, 1, 5, 5, 1, 5]}, "box")
    _422(t, {"image": ct, "text": "liver", "foreground": [[1, 2]]}, "foreground")
    _422(t, {"image": ct, "text": "liver", "foreground": [[900, 2, 3]]}, "outside the image")
    with pytest.raises(HTTPException) as e:
        t({"image": ct + ".missing", "text": "liver"})
    assert e.value.status_code == 404
    _, res = t({"image": ct, "text": "femur_left"})  # typed text is not held to the declared labels
    assert res["text"] == "left femur"


def test_missing_weights_is_503(tmp_path, ct):
    t = task(tmp_path / "none.safetensors")
    assert t.status()[0] == "weights_missing"
    with pytest.raises(HTTPException) as e:
        t({"image": ct, "text": "liver"})
    assert e.value.status_code == 503 and "checkpoint" in e.value.detail


def test_registered_as_the_text_kind_of_the_app_config(checkpoint, ct, no_network):  # noqa: F811
    """configs/app.yaml plus a `sam3d_text` task (model refsam3d) as --conf adds it: a text task, because its
    preset is a text model."""
    from pathlib import Path

    from sam3d.monailabel import load_app_config

    repo = Path(__file__).resolve().parents[1]
    conf = {
        "infers.sam3d_text.model": "refsam3d",
        "infers.sam3d_text.checkpoint": str(checkpoint),
        "infers.sam3d_text.spacing": "[3, 3, 3]",
        "infers.sam3d_text.max_windows": "2",
        "device": "cpu",
    }
    spec = load_app_config(conf, repo / "configs").infers["sam3d_text"]
    assert spec.kind == "text" and spec.error is None, spec.error
    t = Sam3DTextInfer(spec, device="cpu", strict_labels=True, preload=False)
    _, res = t({"image": ct, "label": "liver"})
    assert res["task"] == "sam3d_text" and res["closest_name"] == "liver" and res["checkpoint"] == str(checkpoint)
