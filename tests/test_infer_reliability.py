"""Reliability of `/infer` and `/activelearning` behind a real `monailabel start_server` (issue 16, items 2 and 3).

The bad-input catalogue: every malformed or hostile request is a 4xx with its reason (or a documented 200), and
the server answers `/info` and a good click after each. The concurrency test: `/info` and `/datastore` answer while
20 clicks compute, and the clicks beyond the queue are refused with 429 and Retry-After, never a 500.

Clicks run the ball model of tests/fakes.py; `sam3d_slow` is the same model taking `decode_seconds` per click
(`build_slow_ball_model` below, which the server imports from this module), so that clicks overlap for sure.
"""

import concurrent.futures
import json
import shutil
import time

import pytest
import requests
import yaml

from fakes import BallModel
from monailabel_server import log_tail, running_server

pytestmark = pytest.mark.reliability

CLICK = {"foreground": [[60, 50, 56]], "label": "liver"}
MAX_POINTS = 50
MAX_REQUEST_MB = 8  # the CT below is 2.2 MB
THREADS, QUEUE = 2, 4


class SlowBallModel(BallModel):
    """The ball model, `decode_seconds` per click (sleeping, as a network computing in C++ leaves Python free)."""

    def __init__(self, radius: float, decode_seconds: float):
        super().__init__(radius)
        self.decode_seconds = decode_seconds

    def decode(self, *args, **kwargs):
        time.sleep(self.decode_seconds)
        return super().decode(*args, **kwargs)


def build_slow_ball_model(config: dict) -> SlowBallModel:
    return SlowBallModel(float(config.get("ball_radius", 3)), float(config["decode_seconds"]))


@pytest.fixture(scope="module")
def server(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer_reliability")
    studies = tmp / "studies"
    studies.mkdir()
    shutil.copy(shared_data / "totalseg_ct" / "image.nii.gz", studies / "ct.nii.gz")
    shutil.copy(shared_data / "totalseg_mr" / "image.nii.gz", studies / "mr.nii.gz")
    ball = {"ball_radius": 3, "spacing": [1.5, 1.5, 1.5], "intensity": {"clip": None, "normalize": "zscore_foreground"}}
    (tmp / "ball.yaml").write_text(yaml.safe_dump({"factory": "fakes:build_ball_model", **ball}))
    (tmp / "slow.yaml").write_text(
        yaml.safe_dump({"factory": "test_infer_reliability:build_slow_ball_model", "decode_seconds": 0.5, **ball})
    )
    conf = [
        ("model", tmp / "ball.yaml"),
        ("device", "cpu"),
        ("infers.sam3d_slow.model", tmp / "slow.yaml"),
        ("limits.max_points", MAX_POINTS),
        ("limits.max_request_mb", MAX_REQUEST_MB),
        ("limits.infer_threads", THREADS),
        ("limits.infer_queue", QUEUE),
    ]
    with running_server(tmp, studies, conf) as (url, proc, log):
        yield {"url": url, "proc": proc, "log": log, "studies": studies, "tmp": tmp}


def infer(server, params, image="ct", model="sam3d_point", query=None, files=None, timeout=120):
    """POST /infer as MONAI Label's clients send it: `params` a form field (sent as given when a string)."""
    body = params if isinstance(params, str) else json.dumps(params)
    return requests.post(
        f"{server['url']}/infer/{model}",
        params={"image": image, "output": "json", **(query or {})},
        files={"params": (None, body), **(files or {})},
        timeout=timeout,
    )


def assert_alive(server):
    assert server["proc"].poll() is None, log_tail(server["log"])
    assert requests.get(f"{server['url']}/info/", timeout=60).status_code == 200
    r = infer(server, CLICK)
    assert r.status_code == 200 and r.json()["label"] == "liver", r.text


def assert_refused(r, status, fragment, server):
    assert r.status_code == status, f"{r.status_code} {r.text}\n{log_tail(server['log'], 20)}"
    detail = r.json()["detail"]
    assert fragment in str(detail) and "Traceback" not in r.text


INFER_CATALOGUE = {  # case: (params, query overrides, status, fragment in the detail)
    "params_list": ("[1, 2, 3]", {}, 422, "got list"),
    "params_null": ("null", {}, 422, "got NoneType"),
    "params_broken_json": ('{"foreground": [[60, 50', {}, 422, "JSON object"),
    "params_deeply_nested": ("[" * 200_000, {}, 422, "JSON object"),
    "roi_nan": ('{"roi": [NaN, 40, 80, 60, 50, 60], "label": "liver"}', {}, 422, "NaN is not a number"),
    "point_infinity": ('{"foreground": [[1e400, 50, 56]]}', {}, 422, "voxel indices"),
    "roi_strings": ({"roi": ["a"] * 6}, {}, 422, "roi must be"),
    "roi_short": ({"roi": [1, 2, 3, 4]}, {}, 422, "roi must be"),
    "points_not_a_list": ({"foreground": "60,50,56"}, {}, 422, "voxel indices"),
    "label_not_text": ({"foreground": [[60, 50, 56]], "label": 5}, {}, 422, "structure name"),
    "too_many_points": ({"foreground": [[60, 50, 56]] * (MAX_POINTS + 1)}, {}, 422, f"at most {MAX_POINTS}"),
    "5000_points": ({"foreground": [[60, 50, 56]] * 5000}, {}, 422, f"at most {MAX_POINTS}"),
    "params_set_the_image": ({**CLICK, "image": "/etc/passwd"}, {}, 422, "may not set image"),
    "empty_image_id": (CLICK, {"image": ""}, 422, "no image"),
    "etc_passwd": (CLICK, {"image": "/etc/passwd"}, 404, "not a path"),
    "dot_dot": (CLICK, {"image": ".."}, 404, "not a path"),
    "shared_data_path": (CLICK, {"image": "SHARED_CT"}, 404, "not a path"),
    "own_studies_path": (CLICK, {"image": "STUDIES_CT"}, 404, "not a path"),
    "file_in_working_dir": (CLICK, {"image": "server.log"}, 404, "not in the datastore"),
    "unknown_image_id": (CLICK, {"image": "no_such_image"}, 404, "not in the datastore"),
    "unknown_model": (CLICK, {"model": "nope"}, 404, "no model 'nope'"),
    "escaping_session": (CLICK, {"session_id": "../../studies"}, 404, "unknown or has expired"),
    "unknown_output": (CLICK, {"output": "pdf"}, 422, "output"),
    "dicom_seg_output_without_dicomweb": (CLICK, {"output": "dicom_seg"}, 422, "needs a DICOMweb datastore"),
    "whole_slide": (CLICK, {"model": "wsi/sam3d_point"}, 404, "no whole-slide model"),
}


@pytest.mark.parametrize("case", list(INFER_CATALOGUE))
def test_bad_infer_request_is_a_4xx_with_the_reason_and_the_server_carries_on(server, shared_data, case):
    params, query, status, fragment = INFER_CATALOGUE[case]
    query = dict(query)
    image = {
        "SHARED_CT": str(shared_data / "totalseg_ct" / "image.nii.gz"),
        "STUDIES_CT": str(server["studies"] / "ct.nii.gz"),
    }.get(query.get("image"), query.get("image", "ct"))
    model = query.pop("model", "sam3d_point")
    query.pop("image", None)
    r = infer(server, params, image=image, model=model, query=query)
    assert_refused(r, status, fragment, server)
    assert_alive(server)


def test_an_oversized_upload_is_413_and_the_server_carries_on(server):
    big = b"\0" * ((MAX_REQUEST_MB << 20) + 1)
    r = infer(server, CLICK, image="", files={"file": ("big.nii.gz", big)})
    assert r.status_code == 413, r.text
    assert_alive(server)


ACTIVELEARNING_CATALOGUE = {  # case: (JSON body as sent, status, fragment of the answer)
    "unknown_strategy": ("most_uncertain", '{"client_id": "a"}', 404, "known: random, first, uncertainty"),
    "body_list": ("random", "[1, 2]", 422, "dict"),
    "body_broken_json": ("random", '{"client_id": ', 422, "JSON"),
    "body_too_large": ("random", json.dumps({"client_id": "x" * (70 << 10)}), 413, "Content Too Large"),
    # documented 200s: no params is MONAI Label's default request; any client id is a name (leases.py)
    "body_null": ("first", "null", 200, '"id"'),
    "client_id_not_text": ("first", '{"client_id": [1, 2]}', 200, '"id"'),
}


@pytest.mark.parametrize("case", list(ACTIVELEARNING_CATALOGUE))
def test_bad_activelearning_request_is_a_4xx_with_the_reason_and_the_server_carries_on(server, case):
    strategy, body, status, fragment = ACTIVELEARNING_CATALOGUE[case]
    r = requests.post(
        f"{server['url']}/activelearning/{strategy}",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == status, f"{r.status_code} {r.text}\n{log_tail(server['log'], 20)}"
    assert fragment in r.text and "Traceback" not in r.text
    assert_alive(server)


TASK_CATALOGUE = {  # case: (path, query, status, fragment in the detail)
    "unknown_scoring_method": ("scoring/nope", {}, 404, "no scoring method 'nope'"),
    "scoring_run_sync": ("scoring/nope", {"run_sync": "true"}, 404, "no scoring method"),
    "unknown_batch_model": ("batch/infer/nope", {}, 404, "no model 'nope'"),
    "batch_run_sync": ("batch/infer/sam3d_point", {"run_sync": "true"}, 400, "run_sync is not supported"),
}


@pytest.mark.parametrize("method", ["get", "post"])
def test_the_dicomweb_proxy_of_a_local_datastore_is_404_not_500(server, method):
    r = getattr(requests, method)(f"{server['url']}/proxy/dicom/qido/studies", timeout=60)
    assert_refused(r, 404, "the studies are a local folder", server)
    assert_alive(server)


@pytest.mark.parametrize("case", list(TASK_CATALOGUE))
def test_an_unknown_scoring_method_or_batch_model_is_404_before_any_process_starts(server, case):
    path, query, status, fragment = TASK_CATALOGUE[case]
    r = requests.post(f"{server['url']}/{path}", params=query, timeout=60)
    assert_refused(r, status, fragment, server)
    running = requests.get(
        f"{server['url']}/{path.rsplit('/', 1)[0]}/", params={"check_if_running": "true"}, timeout=60
    )
    assert running.status_code == 404  # MONAI Label's "no task running": none was started
    assert_alive(server)


def test_info_answers_while_20_clicks_compute_and_clicks_beyond_the_queue_are_429(server):
    """20 clicks at once on a model that takes 0.5 s per click: THREADS compute, QUEUE wait, the rest are refused
    at once; /info and /datastore answer all along (their latencies are printed, not asserted: the CPU is shared)."""
    url, n = server["url"], 20
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        clicks = [
            pool.submit(infer, server, {"foreground": [[60, 50, 56]], "label": f"s{i}"}, model="sam3d_slow")
            for i in range(n)
        ]
        answered_while_computing = []
        while not all(c.done() for c in clicks):
            for path in ("/info/", "/datastore/"):
                t = time.perf_counter()
                r = requests.get(url + path, timeout=60)
                assert r.status_code == 200, r.text
                if not all(c.done() for c in clicks):
                    answered_while_computing.append((path, time.perf_counter() - t))
            time.sleep(0.05)
        answers = [c.result() for c in clicks]
    statuses = sorted(r.status_code for r in answers)
    waits = sorted(s for _, s in answered_while_computing) or [float("nan")]
    print(
        f"\nclick statuses {statuses}; {len(answered_while_computing)} /info and /datastore answers while clicks "
        f"computed: median {waits[len(waits) // 2]:.3f} s, slowest {waits[-1]:.3f} s"
    )
    assert set(statuses) <= {200, 429}, [r.text for r in answers if r.status_code not in (200, 429)]
    assert statuses.count(200) >= THREADS and 429 in statuses
    assert answered_while_computing, "no /info or /datastore request was answered while clicks were computing"
    refused = next(r for r in answers if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1 and "busy" in refused.json()["detail"]
    assert_alive(server)
