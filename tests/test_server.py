"""The app behind a real `monailabel start_server`, spoken to only through MONAI Label's own client.

The point task runs the ball model of tests/fakes.py (its mask is a ball around the first foreground click), so
every answer can be checked exactly: shape and affine of the returned volume, the clicked voxel inside, the
centroid on the click. A second task points at weights that do not exist.
"""

import gzip
import json
import re
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from monailabel_server import log_tail, running_server

REPO = Path(__file__).resolve().parents[1]
NOWEIGHTS = "sam3d_noweights"


class Server:
    def __init__(self, url, proc, log, tmp, studies, client):
        self.url, self.proc, self.log, self.tmp, self.studies, self.client = url, proc, log, tmp, studies, client

    def log_tail(self, n=60) -> str:
        return log_tail(self.log, n)

    def infer(self, image_id="", params=None, model="sam3d_point", file=None):
        try:
            return self.client.infer(model, image_id, dict(params or {}), file=file)
        except MONAILabelClientException as e:
            raise HttpError(e.msg) from None


class HttpError(Exception):
    def __init__(self, msg: str):
        super().__init__(msg)
        m = re.match(r"Status: (\d+); Response: (.*)", msg, re.S)
        self.status = int(m.group(1)) if m else None
        body = m.group(2) if m else msg
        try:
            self.detail = str(json.loads(body).get("detail"))
        except (ValueError, AttributeError):
            self.detail = body


@pytest.fixture(scope="module")
def server(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sam3d_server")
    studies = tmp / "studies"
    studies.mkdir()
    shutil.copy(shared_data / "totalseg_ct" / "image.nii.gz", studies / "ct.nii.gz")
    shutil.copy(shared_data / "totalseg_mr" / "image.nii.gz", studies / "mr.nii.gz")
    ball = tmp / "ball.yaml"
    ball.write_text(
        yaml.safe_dump(
            {
                "factory": "fakes:build_ball_model",
                "ball_radius": 3,
                "spacing": [1.5, 1.5, 1.5],
                "intensity": {"clip": None, "normalize": "zscore_foreground"},
                "cache_mb": 64,
                "max_windows": 4,
            }
        )
    )
    (tmp / "client").mkdir()
    conf = [
        ("model", ball),
        ("device", "cpu"),
        (f"infers.{NOWEIGHTS}.model", "sam3d_small"),
        (f"infers.{NOWEIGHTS}.checkpoint", tmp / "absent" / "sam3d_small.safetensors"),
        ("infers.sam3d_semantic_point.checkpoint", _tiny_segsam3d(tmp / "segsam3d.safetensors")),
        ("infers.sam3d_text.model", "refsam3d"),  # RefSAM3D behind the text task (the default names autosam3d)
        ("infers.sam3d_text.checkpoint", _tiny_refsam3d(tmp / "refsam3d.safetensors")),
        ("infers.sam3d_text.spacing", "[3, 3, 3]"),  # a tiny network's 32^3 windows: cover more of the CT
    ]
    with running_server(tmp, studies, conf) as (url, proc, log):
        yield Server(url, proc, log, tmp, studies, MONAILabelClient(url, tmpdir=str(tmp / "client")))


TINY_SEGSAM3D = {
    "encoder_embed_dim": 48,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": [0, 1],
    "feature_stages": [0, 1],
    "prompt_embed_dim": 48,
    "decoder_mlp_dim": 64,
    "iou_head_hidden_dim": 16,
}


def _tiny_segsam3d(path: Path) -> Path:
    """SegSAM-3D with both of its modules, random weights, semantic prompts switched on (non-zero projection)."""
    import torch

    from sam3d.engine import save_checkpoint
    from sam3d.models import build_sam3d

    torch.manual_seed(0)
    model = build_sam3d("segsam3d", **TINY_SEGSAM3D)
    torch.nn.init.normal_(model.semantic_prompt.out_proj.weight, std=0.1)
    save_checkpoint(model, path, {"preset": "segsam3d", "network": TINY_SEGSAM3D})
    return path


def _tiny_refsam3d(path: Path) -> Path:
    """RefSAM3D at its tiny size, random weights, trained (in name only) on three structures."""
    import torch

    from sam3d.engine import save_checkpoint
    from sam3d.models import build_network

    torch.manual_seed(0)
    network = {"vocabulary": ["liver", "spleen", "kidney_left"]}
    save_checkpoint(build_network("refsam3d_tiny", **network), path, {"preset": "refsam3d_tiny", "network": network})
    return path


def _check_ball(server, image_id, result_file, click):
    """The returned volume lies on the image's grid and holds a ball centred on the clicked voxel."""
    src = nib.load(server.studies / f"{image_id}.nii.gz")
    out = nib.load(result_file)
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-4)
    mask = np.asarray(out.dataobj)
    assert set(np.unique(mask)) <= {0, 1}
    assert mask[tuple(click)] == 1, "the clicked voxel is not in the mask"
    centroid = np.argwhere(mask).mean(0)
    assert np.abs(centroid - np.asarray(click)).max() <= 1.0, f"centroid {centroid} is off the click {click}"
    return mask


def _good_request_works(server):
    f, params = server.infer("ct", {"foreground": [[60, 50, 56]], "label": "liver"})
    _check_ball(server, "ct", f, [60, 50, 56])


def test_info_lists_the_point_task_and_its_labels(server):
    info = server.client.info()
    task = info["models"]["sam3d_point"]
    assert task["type"] == "deepgrow" and task["dimension"] == 3
    assert task["labels"]["liver"] == 5 and task["labels"]["spleen"] == 1 and "structure" in task["labels"]
    assert "UNAVAILABLE" not in task["description"]
    assert task["sam3d"]["status"] in ("not_loaded", "ready")
    assert "liver" in info["labels"]
    assert set(info["strategies"]) >= {"random", "first"}


def test_task_without_weights_is_listed_and_says_what_to_set(server):
    task = server.client.info()["models"][NOWEIGHTS]
    assert task["sam3d"]["status"] == "weights_missing"
    assert "UNAVAILABLE" in task["description"] and "weights missing" in task["description"]
    assert f"--conf infers.{NOWEIGHTS}.checkpoint" in task["description"]

    with pytest.raises(HttpError) as e:
        server.infer("ct", {"foreground": [[60, 50, 56]], "label": "liver"}, model=NOWEIGHTS)
    assert e.value.status == 503
    assert "weights missing" in e.value.detail and "absent" in e.value.detail
    _good_request_works(server)  # the server keeps serving


@pytest.mark.parametrize(
    "image_id, click, background",
    [("ct", [60, 50, 56], [[20, 20, 20]]), ("mr", [40, 30, 10], []), ("mr", [116, 0, 19], [[5, 5, 5]])],
)
def test_click_returns_a_mask_on_the_image_grid(server, image_id, click, background):
    """CT (RAS) and MR (LPS), a corner voxel included: the click maps to the model grid and back exactly."""
    f, params = server.infer(image_id, {"foreground": [click], "background": background, "label": "liver"})
    _check_ball(server, image_id, f, click)
    assert params["task"] == "sam3d_point" and params["label"] == "liver"
    assert params["model"].endswith("ball.yaml") and params["network"] == "ball"
    assert params["windows"] and len(params["windows"][0]["start"]) == 3
    assert {"load", "encode", "decode", "total", "request"} <= set(params["timings"])
    assert "checkpoint" in params


def test_second_click_reuses_the_embedding(server):
    first = [60, 50, 56]
    server.infer("ct", {"foreground": [first], "label": "spleen"})
    f, params = server.infer("ct", {"foreground": [first, [62, 51, 57]], "label": "spleen"})
    assert params["embedding_cached"] is True
    assert params["timings"]["encode"] == 0.0
    _check_ball(server, "ct", f, first)  # the ball model follows the first positive click


def _corrupt(server) -> Path:
    path = server.tmp / "corrupt.nii.gz"
    path.write_bytes((server.studies / "ct.nii.gz").read_bytes()[:3000])  # a truncated gzip
    return path


def _flat(server) -> Path:
    path = server.tmp / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32), np.eye(4)), path)
    return path


def _not_gzip(server) -> Path:
    path = server.tmp / "garbage.nii.gz"
    path.write_bytes(gzip.compress(b"this is not an image at all" * 10))
    return path


@pytest.mark.parametrize(
    "case, status, fragment",
    [
        ("outside", 422, "outside the image"),
        ("no_prompt", 422, "no prompt"),
        ("bad_points", 422, "voxel indices"),
        ("overlong_label", 422, "at most 128"),
        ("unknown_image", 404, "not in the datastore"),
        ("corrupt_upload", 422, "cannot read image"),
        ("not_an_image_upload", 422, "cannot read image"),
        ("2d_upload", 422, "3D"),
    ],
)
def test_bad_input_is_a_4xx_with_a_message_and_the_server_carries_on(server, case, status, fragment):
    image, params, upload = "ct", {"foreground": [[60, 50, 56]], "label": "liver"}, None
    if case == "outside":
        params["foreground"] = [[60, 50, 500]]
    elif case == "no_prompt":
        params = {"label": "liver"}
    elif case == "bad_points":
        params["foreground"] = [[60, 50]]
    elif case == "overlong_label":
        params["label"] = "x" * 200
    elif case == "unknown_image":
        image = "no_such_image"
    elif case == "corrupt_upload":
        image, upload = "", _corrupt(server)
    elif case == "not_an_image_upload":
        image, upload = "", _not_gzip(server)
    elif case == "2d_upload":
        image, upload = "", _flat(server)
        params["foreground"] = [[30, 30, 0]]
    with pytest.raises(HttpError) as e:
        server.infer(image, params, file=str(upload) if upload else None)
    assert e.value.status == status, f"{case}: {e.value}\n{server.log_tail(20)}"
    assert fragment in e.value.detail
    assert len(e.value.detail) > 10 and "Traceback" not in e.value.detail
    _good_request_works(server)


def test_errors_leave_no_result_files_behind(server):
    for params in ({"foreground": [[60, 50, 500]], "label": "liver"}, {"label": "liver"}):
        with pytest.raises(HttpError):
            server.infer("ct", params)
    time.sleep(0.5)  # MONAI Label deletes a sent result file in a background task
    left = [p.name for p in (server.tmp / "server_tmp").iterdir() if p.name.startswith("sam3d_point_")]
    assert left == []


def test_server_is_still_alive(server):
    assert server.proc.poll() is None, server.log_tail()
    assert "sam3d_point" in server.client.info()["models"]


def test_segsam3d_task_answers_clicks_as_the_library_does(server):
    """The SegSAM-3D task (its own weights) answers through the server with the mask the library computes."""
    from sam3d.engine import EngineConfig, InteractiveEngine, load_model
    from sam3d.engine.model_config import load_model_config

    task = server.client.info()["models"]["sam3d_semantic_point"]
    assert task["type"] == "deepgrow" and task["sam3d"]["status"] in ("not_loaded", "ready")
    request = {"foreground": [[60, 50, 56]], "background": [[70, 50, 56]], "label": "liver"}
    f, params = server.infer("ct", request, model="sam3d_semantic_point")
    assert params["network"] == "segsam3d"
    out = nib.load(f)
    src = nib.load(server.studies / "ct.nii.gz")
    assert out.shape == src.shape and np.allclose(out.affine, src.affine, atol=1e-4)
    cfg = load_model_config("segsam3d", REPO / "configs", str(server.tmp / "segsam3d.safetensors"))
    engine = InteractiveEngine(load_model(cfg), EngineConfig.from_dict(cfg), device="cpu")
    expected = engine.segment(
        str(server.studies / "ct.nii.gz"), request["foreground"], request["background"], None, "liver"
    ).mask
    np.testing.assert_array_equal(np.asarray(out.dataobj), expected)


def test_text_task_answers_a_name_without_a_click(server):
    """`sam3d_text`: the label (or typed text) is the prompt; the answer lies on the image's grid; a text far from
    every trained name gets an empty mask and says so."""
    task = server.client.info()["models"]["sam3d_text"]
    assert task["sam3d"]["status"] in ("not_loaded", "ready") and "liver" in task["labels"]
    f, params = server.infer("ct", {"label": "liver"}, model="sam3d_text")
    out, src = nib.load(f), nib.load(server.studies / "ct.nii.gz")
    assert out.shape == src.shape and np.allclose(out.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}
    assert params["label"] == "liver" and params["closest_name"] == "liver" and params["task"] == "sam3d_text"
    _, typed = server.infer("ct", {"text": "the left kidney", "label": "kidney_left"}, model="sam3d_text")
    assert typed["closest_name"] in ("kidney_left", "left kidney")  # the trained name, or its words
    f, unknown = server.infer("ct", {"text": "a banana"}, model="sam3d_text")
    assert unknown["voxels"] == 0 and "not a structure" in unknown["message"]
    _good_request_works(server)
