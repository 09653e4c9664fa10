"""sam3d's `/infer/{model}` and `/activelearning/{strategy}` routes (infer_api) in-process, in front of a real app.

The app is apps/sam3d/main.py's, on small synthetic volumes with the ball model of tests/fakes.py; MONAI Label's
own `/info` route sits beside the routes under test. A `blocking` task whose clicks wait for the test shows the
queue: which requests compute, which wait, which are refused, and that `/info` answers meanwhile.
"""

import asyncio
import gzip
import importlib.util
import io
import json
import tempfile
import threading
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import yaml
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from requests_toolbelt import MultipartDecoder

from sam3d.monailabel import AppConfigError, Sam3DPointInfer, TaskSpec, load_app_config
from sam3d.monailabel.app_config import RequestLimits
from sam3d.monailabel.infer_api import check_image_id, install, parse_params

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

from tiny_datastore import write_studies  # noqa: E402

BALL = {"factory": "fakes:build_ball_model", "ball_radius": 3, "spacing": [2, 2, 2]}
LIMITS = {
    "limits.max_points": "5",
    "limits.infer_threads": "1",
    "limits.infer_queue": "1",
    "limits.max_request_mb": "0.5",
}
CLICK = {"foreground": [[10, 10, 10]], "label": "liver"}


class BlockingEngine:
    """An engine whose clicks wait until the test lets them finish; counts the clicks that are computing."""

    def __init__(self):
        self.computing = 0
        self.go = threading.Event()

    def segment(self, image_path, foreground, background, roi=None, label="structure"):
        from sam3d.engine import SegmentResult

        self.computing += 1
        self.go.wait(timeout=60)
        shape = nib.load(image_path).shape
        return SegmentResult(
            np.zeros(shape, np.uint8), np.eye(4), {"load": 0.0, "encode": 0.0, "decode": 0.0}, {"model": "blocking"}
        )

    def write_label(self, result, path):
        nib.save(nib.Nifti1Image(result.mask, result.affine), path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(app, TestClient, blocking engine, temp folder of the requests' files)."""
    from monailabel.config import settings
    from monailabel.endpoints import activelearning, infer, info

    tmp = tmp_path_factory.mktemp("infer_api")
    studies = tmp / "studies"
    write_studies(studies, 2)
    (tmp / "ball.yaml").write_text(yaml.safe_dump(BALL))
    requests_tmp = tmp / "requests_tmp"
    requests_tmp.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(settings, "MONAI_LABEL_SESSION_PATH", str(tmp / "sessions"))
        mp.setattr(settings, "MONAI_LABEL_AUTO_UPDATE_SCORING", False)
        mp.setattr(settings, "MONAI_LABEL_DATASTORE_AUTO_RELOAD", False)
        mp.setattr(tempfile, "tempdir", str(requests_tmp))  # uploads and results land here
        main_py = REPO / "apps" / "sam3d" / "main.py"
        spec = importlib.util.spec_from_file_location("sam3d_app_main_infer_api", main_py)
        main = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(main)
        app = main.MyApp(
            str(main_py.parent), str(studies), {"model": str(tmp / "ball.yaml"), "device": "cpu", **LIMITS}
        )
        engine = BlockingEngine()
        app._infers["blocking"] = Sam3DPointInfer(
            TaskSpec("blocking", "blocking", {"factory": "test"}, "waits", {"liver": 1}),
            device="cpu",
            engine_factory=lambda config, device: engine,
        )
        for module in (activelearning, infer, info):  # MONAI Label's endpoints find the app through app_instance
            mp.setattr(module, "app_instance", lambda: app)
        fastapi_app = FastAPI()
        fastapi_app.include_router(info.router)
        install(fastapi_app, app)
        yield app, TestClient(fastapi_app), engine, requests_tmp


def nifti(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def post_infer(client, image="img0", params=None, model="sam3d_point", **kw):
    query = {"image": image, **kw.pop("query", {})}
    body = params if isinstance(params, str) else json.dumps(CLICK if params is None else params)
    return client.post(f"/infer/{model}", params=query, data={"params": body}, **kw)


# ---- configuration ---------------------------------------------------------------------------------------------


def test_limits_have_defaults_and_come_from_conf():
    default = load_app_config({}, config_dir=REPO / "configs").limits
    assert default == RequestLimits() and default.max_points == 1000 and default.infer_threads >= 1
    limits = load_app_config(LIMITS, config_dir=REPO / "configs").limits
    assert (limits.max_points, limits.infer_threads, limits.infer_queue, limits.max_request_mb) == (5, 1, 1, 0.5)


@pytest.mark.parametrize(
    "conf, fragment",
    [
        ({"limits.max_points": "-1"}, "limits.max_points"),
        ({"limits.infer_threads": "0"}, "limits.infer_threads must be > 0"),
        ({"limits.queue": "3"}, "unknown limits"),
        ({"limits": "7"}, "limits must be a mapping"),
    ],
)
def test_bad_limits_stop_the_server_with_the_reason(conf, fragment):
    with pytest.raises(AppConfigError, match=fragment):
        load_app_config(conf, config_dir=REPO / "configs")


# ---- checks before anything is computed -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, fragment",
    [
        ("[1, 2, 3]", "got list"),
        ("null", "got NoneType"),
        ('"text"', "got str"),
        ("{broken", "JSON object"),
        ('{"roi": [NaN, 0, 1, 1, 0, 1]}', "NaN is not a number"),
        ('{"foreground": [[Infinity, 1, 1]]}', "Infinity is not a number"),
        ("[" * 100_000, "JSON object"),
        ('{"image": "/etc/passwd"}', "may not set image"),
        ('{"model": "other", "session": {}}', "may not set model, session"),
        (json.dumps({"foreground": [[1, 1, 1]] * 4, "background": [[2, 2, 2]] * 2}), "at most 5"),
    ],
)
def test_malformed_params_are_422_with_the_reason(params, fragment):
    with pytest.raises(HTTPException) as e:
        parse_params(params, max_points=5)
    assert e.value.status_code == 422 and fragment in e.value.detail


def test_wellformed_params_pass():
    assert parse_params("", 5) == {} and parse_params("{}", 5) == {}
    assert parse_params(json.dumps({"foreground": [[1, 2, 3]] * 5, "label": "x"}), 5)["label"] == "x"


def test_images_are_datastore_ids_never_paths(served, shared_data):
    app = served[0]
    ds = app.datastore()
    check_image_id("img0", ds)
    check_image_id(np.zeros((2, 2, 2)), ds)  # Python callers may give an array
    for image, status in [
        ("", 422),
        ("nope", 404),
        ("..", 404),
        ("/etc/passwd", 404),
        (ds.get_image_uri("img1"), 404),
        (str(shared_data / "totalseg_ct" / "image.nii.gz"), 404),
        ("img0/../img1", 404),
    ]:
        with pytest.raises(HTTPException) as e:
            check_image_id(image, ds)
        assert e.value.status_code == status, image
    with pytest.raises(HTTPException) as e:  # the app itself refuses a path from any other caller (batch infer)
        app.infer({"model": "sam3d_point", "image": ds.get_image_uri("img0"), **CLICK})
    assert e.value.status_code == 404 and "not a path" in e.value.detail


# ---- the routes --------------------------------------------------------------------------------------------------


def test_a_click_answers_in_monai_labels_shapes(served):
    _, client, _, _ = served
    r = post_infer(client)
    assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/form-data")
    parts = {
        p.headers[b"Content-Disposition"].split(b'name="')[1].split(b'"')[0]: p
        for p in MultipartDecoder(r.content, r.headers["content-type"]).parts
    }
    assert json.loads(parts[b"params"].text)["label"] == "liver"
    mask = nifti(parts[b"image"].content)
    assert mask.shape == (28, 26, 24) and np.asarray(mask.dataobj)[10, 10, 10] == 1
    assert post_infer(client, query={"output": "json"}).json()["task"] == "sam3d_point"
    image = post_infer(client, query={"output": "image"})
    assert nifti(image.content).shape == (28, 26, 24)


def test_an_upload_is_segmented_and_its_files_are_removed(served):
    app, client, _, requests_tmp = served
    upload = Path(app.datastore().get_image_uri("img1")).read_bytes()
    r = post_infer(client, image="", query={"output": "json"}, files={"file": ("x.nii.gz", io.BytesIO(upload))})
    assert r.status_code == 200 and r.json()["label"] == "liver"
    bad = post_infer(
        client, image="", params={"foreground": [[99, 1, 1]]}, files={"file": ("x.nii.gz", io.BytesIO(upload))}
    )
    assert bad.status_code == 422 and "outside the image" in bad.json()["detail"]
    assert list(requests_tmp.iterdir()) == []


@pytest.mark.parametrize(
    "case, status, fragment",
    [
        ("unknown_model", 404, "no model 'nope'; known: sam3d_point"),
        ("path_image", 404, "not a path"),
        ("unknown_image", 404, "not in the datastore"),
        ("no_image", 422, "no image"),
        ("list_params", 422, "JSON object"),
        ("too_many_points", 422, "at most 5"),
        ("bad_output", 422, "output"),
        ("dicom_seg_output", 422, "needs a DICOMweb datastore"),
        ("unknown_session", 404, "unknown or has expired"),
        ("escaping_session", 404, "unknown or has expired"),
        ("too_large", 413, "Content Too Large"),
        ("whole_slide", 404, "no whole-slide model"),
        ("bad_point", 422, "voxel indices"),
    ],
)
def test_bad_requests_are_4xx_with_the_reason(served, case, status, fragment):
    app, client, _, _ = served
    kw = {}
    if case == "unknown_model":
        kw["model"] = "nope"
    elif case == "path_image":
        kw["image"] = app.datastore().get_image_uri("img0")
    elif case == "unknown_image":
        kw["image"] = "nope"
    elif case == "no_image":
        kw["image"] = ""
    elif case == "list_params":
        kw["params"] = "[1, 2, 3]"
    elif case == "too_many_points":
        kw["params"] = {"foreground": [[1, 1, 1]] * 6}
    elif case == "bad_output":
        kw["query"] = {"output": "pdf"}
    elif case == "dicom_seg_output":
        kw["query"] = {"output": "dicom_seg"}
    elif case in ("unknown_session", "escaping_session"):
        kw["query"] = {"session_id": "0f5b" if case == "unknown_session" else "../studies"}
    elif case == "too_large":
        kw["files"] = {"file": ("x.nii.gz", io.BytesIO(b"0" * (600 << 10)))}
    elif case == "whole_slide":
        kw["model"] = "wsi/sam3d_point"
    elif case == "bad_point":
        kw["params"] = {"foreground": [[1, 2]]}
    r = post_infer(client, **kw)
    assert r.status_code == status, r.text
    assert fragment in r.text


def test_active_learning_names_the_known_strategies(served):
    _, client, _, _ = served
    r = client.post("/activelearning/most_uncertain", json={"client_id": "a"})
    assert r.status_code == 404 and "known: random, first, uncertainty" in r.json()["detail"]
    assert client.post("/activelearning/first", json=[1, 2]).status_code == 422
    assert (
        client.post(
            "/activelearning/first", content=b"{broken", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    assert client.post("/activelearning/first", json={"client_id": "x" * (70 << 10)}).status_code == 413
    assert client.post("/activelearning/first", json={"client_id": "a"}).json()["id"] in ("img0", "img1")


# ---- the queue -------------------------------------------------------------------------------------------------


def test_info_answers_while_clicks_compute_and_requests_beyond_the_queue_are_429(served):
    """One thread computes, one request waits (limits), the others are refused at once; /info is never held."""
    app, _, engine, _ = served
    transport = httpx.ASGITransport(app=served[1].app)

    async def scenario():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

            def click():
                return client.post(
                    "/infer/blocking", params={"image": "img0", "output": "json"}, data={"params": json.dumps(CLICK)}
                )

            clicks = [asyncio.create_task(click()) for _ in range(5)]
            while engine.computing < 1:
                await asyncio.sleep(0.01)
            info = await client.get("/info/")
            for _ in range(1000):  # the three beyond the thread and the queue are answered at once
                if sum(c.done() for c in clicks) == 3:
                    break
                await asyncio.sleep(0.01)
            refused = [c.result() for c in clicks if c.done()]
            engine.go.set()
            answered = await asyncio.gather(*clicks)
            return info, refused, answered

    info, refused, answered = asyncio.run(scenario())
    assert info.status_code == 200 and "blocking" in info.json()["models"]
    assert engine.computing == 2  # the thread's click, then the one that waited
    assert sorted(r.status_code for r in answered) == [200, 200, 429, 429, 429]
    assert [r.status_code for r in refused] == [429, 429, 429]
    too_many = next(r for r in answered if r.status_code == 429)
    assert int(too_many.headers["retry-after"]) >= 1 and "busy" in too_many.json()["detail"]


def test_a_second_install_replaces_the_first(served):
    """POST /reload re-creates the app, which installs its routes again: they replace the earlier ones."""
    app, client, _, _ = served
    routes = client.app.router.routes
    before = len(routes)
    install(client.app, app)
    assert len(routes) == before
    assert post_infer(client, query={"output": "json"}).status_code == 200
