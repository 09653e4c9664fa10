"""The datastore through a real `monailabel start_server`, as an attacker and a power cut would treat it: ids, tags and
file names that try to leave the studies folder, uploads that are not what they claim, and kill -9 in the middle of
saving a final label. Every refusal is a 4xx with its reason, the server answers the next request, nothing outside
the studies folder changes, and after a kill the datastore lists only whole files."""

import gzip
import io
import os
import shutil
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from sam3d.monailabel.local_server import log_tail, running_server

pytestmark = pytest.mark.reliability

TESTS = Path(__file__).resolve().parent
SERVER_FILES = {"server.log", "server_tmp", "sessions", "probe"}  # what running_server itself keeps in its folder
KILL_MARKER_ENV = "SAM3D_TEST_KILL_MARKER"

# Loaded into the server by Python at start-up (PYTHONPATH): the copy into a hidden file of labels/final (the
# datastore's temporary file) writes half of the label, says so in a marker file, and hangs until killed.
HANGING_SAVE = f'''
import os, shutil, time

_copy = shutil.copyfileobj


def _half_then_hang(src, dst, length=0):
    name = str(getattr(dst, "name", ""))
    if os.path.basename(name).startswith(".") and os.path.dirname(name).endswith(os.path.join("labels", "final")):
        data = src.read()
        dst.write(data[: len(data) // 2])
        dst.flush()
        os.fsync(dst.fileno())
        open(os.environ["{KILL_MARKER_ENV}"], "w").close()
        time.sleep(600)
    return _copy(src, dst, length)


shutil.copyfileobj = _half_then_hang
'''


def nifti_bytes(array, affine) -> bytes:
    img = nib.Nifti1Image(np.asarray(array), affine)
    return gzip.compress(img.to_bytes())


def huge_header_bytes() -> bytes:
    """A small .nii.gz whose header promises 1000^3 voxels (a few GB once read)."""
    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 1000))
    header.set_data_dtype(np.uint8)
    buf = io.BytesIO()
    header.write_to(buf)
    buf.write(bytes(1 << 16))
    return gzip.compress(buf.getvalue())


def snapshot(folder: Path, skip=()) -> dict:
    """relative path -> bytes (None for a folder) of everything below `folder`, less the top-level names `skip`."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if rel.parts[0] not in skip:
            out[str(rel)] = None if p.is_dir() else p.read_bytes()
    return out


class Api:
    """Plain HTTP to the datastore endpoints, answers as (status, detail or JSON)."""

    def __init__(self, url):
        self.url = url

    def _answer(self, r):
        try:
            body = r.json()
        except ValueError:
            body = r.text
        return r.status_code, body.get("detail", body) if isinstance(body, dict) else body

    def put_image(self, image_id, filename, content):
        params = {"image": image_id} if image_id is not None else {}
        return self._answer(
            requests.put(f"{self.url}/datastore/image", params=params, files={"file": (filename, content)}, timeout=120)
        )

    def put_label(self, image_id, content, tag="final", filename="label.nii.gz"):
        return self._answer(
            requests.put(
                f"{self.url}/datastore/label",
                params={"image": image_id, "tag": tag},
                files={"label": (filename, content)},
                timeout=120,
            )
        )

    def delete_image(self, image_id):
        return self._answer(requests.delete(f"{self.url}/datastore/image", params={"id": image_id}, timeout=60))

    def delete_label(self, image_id, tag):
        return self._answer(
            requests.delete(f"{self.url}/datastore/label", params={"id": image_id, "tag": tag}, timeout=60)
        )

    def objects(self) -> dict:
        return requests.get(f"{self.url}/datastore/", params={"output": "all"}, timeout=60).json()["objects"]

    def label(self, image_id, tag="final") -> bytes:
        r = requests.get(f"{self.url}/datastore/label", params={"label": image_id, "tag": tag}, timeout=60)
        r.raise_for_status()
        return r.content

    def alive(self) -> bool:
        return requests.get(f"{self.url}/info/", timeout=60).status_code == 200


def write_studies(folder: Path, shared_data: Path) -> None:
    """ct (with its reference label as final) and mr (unlabelled), real volumes of the shared data."""
    (folder / "labels" / "final").mkdir(parents=True)
    shutil.copy(shared_data / "totalseg_ct" / "image.nii.gz", folder / "ct.nii.gz")
    shutil.copy(shared_data / "totalseg_ct" / "label.nii.gz", folder / "labels" / "final" / "ct.nii.gz")
    shutil.copy(shared_data / "totalseg_mr" / "image.nii.gz", folder / "mr.nii.gz")


def uploads_left(server_tmp: Path, before: set[str]) -> list[str]:
    """Files that came into the server's temporary folder since `before` (MONAI Label puts uploads there) and are
    still there, after a moment for the clean-up it runs once an answer has gone."""
    deadline = time.monotonic() + 10
    while True:
        left = sorted(p.name for p in server_tmp.iterdir() if p.name not in before)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("datastore_server")
    studies = tmp / "studies"
    write_studies(studies, shared_data)
    (tmp / "victim.nii.gz").write_bytes(b"a file outside the studies folder")
    (tmp / "labels").mkdir()
    (tmp / "labels" / "ct.nii.gz").write_bytes(b"another one")
    with running_server(tmp, studies, [("device", "cpu")], pythonpath=[TESTS]) as (url, _proc, log):
        yield Api(url), tmp, studies, log


def _ct_grid(studies):
    img = nib.load(studies / "ct.nii.gz")
    return img.shape, img.affine


# --- path escapes ---------------------------------------------------------------------------------------------


def _escapes(tmp: Path, ct_image: bytes, ct_label: bytes):
    """(what, request) pairs, each an attempt to write or delete outside the studies folder."""
    return [
        ("relative id, no extension", lambda a: a.put_image("../pwn_noext", "a", ct_image)),
        ("relative id", lambda a: a.put_image("../pwn", "x.nii.gz", ct_image)),
        ("deeper relative id", lambda a: a.put_image("../../../pwn", "x.nii.gz", ct_image)),
        ("absolute id", lambda a: a.put_image(str(tmp / "abs_pwn"), "x.nii.gz", ct_image)),
        ("id in a sub-folder", lambda a: a.put_image("labels/final/mr", "x.nii.gz", ct_image)),
        ("hidden id", lambda a: a.put_image(".pwn", "x.nii.gz", ct_image)),
        ("extension from the file name", lambda a: a.put_image("pwn", "x.nii.gz.sh", ct_image)),
        ("extension with a path", lambda a: a.put_image("pwn", "x.nii/../../gz", ct_image)),
        ("label tag up", lambda a: a.put_label("ct", ct_label, tag="../../x")),
        ("label tag to the parent", lambda a: a.put_label("ct", ct_label, tag="..")),
        ("label image id up", lambda a: a.put_label("../victim", ct_label)),
        ("label extension", lambda a: a.put_label("ct", ct_label, filename="label")),
        ("delete outside", lambda a: a.delete_image("../victim")),
        ("delete absolute", lambda a: a.delete_image(str(tmp / "victim"))),
        ("delete label up", lambda a: a.delete_label("ct", "../..")),
        ("delete label id up", lambda a: a.delete_label("../labels/ct", "final")),
    ]


def test_path_escapes_are_refused_and_nothing_outside_the_studies_folder_changes(server):
    api, tmp, studies, log = server
    ct_image = (studies / "ct.nii.gz").read_bytes()
    ct_label = (studies / "labels" / "final" / "ct.nii.gz").read_bytes()
    outside, inside, listed = snapshot(tmp, skip=SERVER_FILES | {"studies"}), snapshot(studies), api.objects()
    server_tmp = set(os.listdir(tmp / "server_tmp"))
    for what, attempt in _escapes(tmp, ct_image, ct_label):
        status, detail = attempt(api)
        assert 400 <= status < 500, f"{what}: {status} {detail}\n{log_tail(log)}"
        assert isinstance(detail, str) and detail, f"{what}: no reason given"
        assert api.alive(), what
        assert snapshot(tmp, skip=SERVER_FILES | {"studies"}) == outside, f"{what} changed a file outside"
    assert snapshot(studies) == inside and api.objects() == listed
    assert uploads_left(tmp / "server_tmp", server_tmp) == []


# --- bad uploads ----------------------------------------------------------------------------------------------


def _bad_images(shape, affine):
    image = np.random.default_rng(0).normal(0, 100, shape).astype(np.float32)
    nan = image.copy()
    nan[10, 10, 10] = np.nan
    whole = nifti_bytes(image, affine)
    return [
        ("corrupt bytes", os.urandom(50_000), "not a readable NIfTI"),
        ("truncated", whole[: len(whole) // 2], "cannot be read whole"),
        ("2D", nifti_bytes(image[:, :, 0], affine), "3D"),
        ("one slice", nifti_bytes(image[:, :, :1], affine), "2D"),
        ("NaN", nifti_bytes(nan, affine), "NaN"),
        ("1000^3 voxels in the header", huge_header_bytes(), "too large"),
    ]


def _bad_labels(shape, affine):
    label = np.zeros(shape, np.uint8)
    label[20:40, 20:40, 20:40] = 1
    shifted = affine.copy()
    shifted[:3, 3] += 5
    return [
        ("wrong shape", nifti_bytes(np.zeros(shape[:2] + (3,), np.uint8), affine), "grid"),
        ("other grid", nifti_bytes(label, shifted), "affine differs"),
        ("float values", nifti_bytes(label * np.float32(0.5), affine), "whole numbers"),
        ("negative values", nifti_bytes(label.astype(np.int16) * -3, affine), "negative"),
        ("corrupt bytes", os.urandom(50_000), "not a readable NIfTI"),
    ]


def test_bad_uploads_are_4xx_with_the_reason_and_change_nothing(server):
    api, tmp, studies, log = server
    shape, affine = _ct_grid(studies)
    inside, listed, server_tmp = snapshot(studies), api.objects(), set(os.listdir(tmp / "server_tmp"))
    attempts = [
        (f"image: {what}", lambda c=content: api.put_image("bad", "bad.nii.gz", c), fragment)
        for what, content, fragment in _bad_images(shape, affine)
    ]
    attempts += [
        (f"label: {what}", lambda c=content: api.put_label("ct", c), fragment)
        for what, content, fragment in _bad_labels(shape, affine)
    ]
    for what, attempt, fragment in attempts:
        status, detail = attempt()
        assert status == 422 and fragment in str(detail), f"{what}: {status} {detail}\n{log_tail(log)}"
        assert api.alive(), what
    assert snapshot(studies) == inside and api.objects() == listed
    assert uploads_left(tmp / "server_tmp", server_tmp) == [], "refused uploads stay in the server's temporary folder"


def test_a_good_label_round_trips_after_the_refusals(server):
    api, _tmp, studies, log = server
    shape, affine = _ct_grid(studies)
    label = np.zeros(shape, np.uint8)
    label[30:50, 30:50, 30:50] = 3
    content = nifti_bytes(label, affine)
    status, body = api.put_label("ct", content, tag="reviewed")
    assert status == 200, f"{body}\n{log_tail(log)}"
    assert api.label("ct", "reviewed") == content
    assert (studies / "labels" / "reviewed" / "ct.nii.gz").read_bytes() == content


# --- kill -9 while a final label is saved -----------------------------------------------------------------------


def _kill_during_label_save(workdir, studies, image_id, content, marker: Path) -> None:
    """Starts a server whose label copy hangs halfway, saves `content` as `image_id`'s final label, and kill -9s
    the server once half the label is on disk."""
    hook = workdir / "hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(HANGING_SAVE)
    with running_server(workdir, studies, [("device", "cpu")], pythonpath=[TESTS, hook]) as (url, proc, log):
        save = threading.Thread(target=lambda: _quietly(Api(url).put_label, image_id, content), daemon=True)
        save.start()
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert time.monotonic() < deadline and proc.poll() is None, f"the save never started\n{log_tail(log)}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        save.join(timeout=60)
    marker.unlink()


def _quietly(call, *args):
    try:
        call(*args)
    except requests.RequestException:  # the server was killed under the request
        pass


def _partial_files(studies: Path) -> list[str]:
    return sorted(p.name for p in (studies / "labels" / "final").iterdir() if p.name.startswith("."))


def test_kill_9_during_a_final_label_save_keeps_the_datastore_whole(shared_data, tmp_path, monkeypatch):
    studies = tmp_path / "studies"
    write_studies(studies, shared_data)
    final = studies / "labels" / "final"
    good_ct = (final / "ct.nii.gz").read_bytes()
    shape, affine = _ct_grid(studies)
    marker = tmp_path / "half_written"
    monkeypatch.setenv(KILL_MARKER_ENV, str(marker))

    # 1. a new final label replacing a good one: the good one must survive
    new_ct = nifti_bytes(np.ones(shape, np.uint8), affine)
    _kill_during_label_save(tmp_path / "run1", studies, "ct", new_ct, marker)
    assert (final / "ct.nii.gz").read_bytes() == good_ct
    assert _partial_files(studies), "the kill was not in the middle of the save"

    # 2. the first final label of an image: the image must stay unlabelled (this start also cleans run 1's file)
    mr_shape, mr_affine = nib.load(studies / "mr.nii.gz").shape, nib.load(studies / "mr.nii.gz").affine
    mr_label = nifti_bytes(np.ones(mr_shape, np.uint8), mr_affine)
    _kill_during_label_save(tmp_path / "run2", studies, "mr", mr_label, marker)
    assert not (final / "mr.nii.gz").exists() and len(_partial_files(studies)) == 1

    with running_server(tmp_path / "run3", studies, [("device", "cpu")], pythonpath=[TESTS]) as (url, _proc, _log):
        api = Api(url)
        objects = api.objects()
        assert set(objects) == {"ct", "mr"}
        assert "final" in objects["ct"]["labels"] and api.label("ct") == good_ct
        assert "final" not in objects["mr"]["labels"]
        assert _partial_files(studies) == [], "the killed save's temporary file is still there"
        for path in [studies / "ct.nii.gz", studies / "mr.nii.gz", final / "ct.nii.gz"]:
            np.asanyarray(nib.load(path).dataobj)  # whole: every listed file reads to its end
        r = requests.post(f"{url}/activelearning/first", json={"client_id": "after-the-kill"}, timeout=60)
        assert r.status_code == 200 and r.json()["id"] == "mr", "the unlabelled image is not back in the queue"
        assert api.put_label("mr", mr_label)[0] == 200  # and the save that was killed now goes through
        assert api.label("mr") == mr_label


# --- ids the datastore does not know, form fields that are not JSON objects ------------------------------------


def _lookups(ct_image: bytes, ct_label: bytes):
    """(what, method, path below /datastore, query, form, status, fragment of the reason): MONAI Label answers these
    500 or 200 {}."""
    final = {"tag": "final"}
    return [
        ("image info, unknown image", "GET", "/image/info", {"image": "nope"}, None, 404, "not in the datastore"),
        (
            "label info, unknown image",
            "GET",
            "/label/info",
            {"label": "nope", **final},
            None,
            404,
            "not in the datastore",
        ),
        (
            "label info, unknown tag",
            "GET",
            "/label/info",
            {"label": "mr", **final},
            None,
            404,
            "no label tagged 'final'",
        ),
        (
            "image info update, unknown image",
            "PUT",
            "/image/info",
            {"image": "nope"},
            {"info": (None, "{}")},
            404,
            "not in the datastore",
        ),
        (
            "label info update, unknown label",
            "PUT",
            "/label/info",
            {"label": "mr", **final},
            {"info": (None, "{}")},
            404,
            "no label tagged",
        ),
        (
            "old label info update, unknown image",
            "PUT",
            "/updatelabelinfo",
            {"label": "nope", **final},
            {"params": (None, "{}")},
            404,
            "not in the datastore",
        ),
        (
            "delete the label of an unknown image",
            "DELETE",
            "/label",
            {"id": "nope", **final},
            None,
            404,
            "not in the datastore",
        ),
        ("delete a label that is not there", "DELETE", "/label", {"id": "mr", **final}, None, 404, "no label tagged"),
        (
            "image info update, broken JSON",
            "PUT",
            "/image/info",
            {"image": "ct"},
            {"info": (None, "[1")},
            422,
            "info must be a JSON object",
        ),
        ("image info update, a list", "PUT", "/image/info", {"image": "ct"}, {"info": (None, "[1]")}, 422, "got list"),
        (
            "label info update, null",
            "PUT",
            "/label/info",
            {"label": "ct", **final},
            {"info": (None, "null")},
            422,
            "got NoneType",
        ),
        (
            "label save, broken params",
            "PUT",
            "/label",
            {"image": "ct", **final},
            {"label": ("l.nii.gz", ct_label), "params": (None, "{bad")},
            422,
            "params must be a JSON object",
        ),
        (
            "image upload, params a list",
            "PUT",
            "/image",
            {"image": "new"},
            {"file": ("x.nii.gz", ct_image), "params": (None, "[1]")},
            422,
            "got list",
        ),
    ]


def test_unknown_ids_are_404_and_malformed_fields_422_and_change_nothing(server):
    api, tmp, studies, log = server
    ct_image = (studies / "ct.nii.gz").read_bytes()
    ct_label = (studies / "labels" / "final" / "ct.nii.gz").read_bytes()
    inside, listed, server_tmp = snapshot(studies), api.objects(), set(os.listdir(tmp / "server_tmp"))
    for what, method, path, query, form, status, fragment in _lookups(ct_image, ct_label):
        r = requests.request(method, f"{api.url}/datastore{path}", params=query, files=form, timeout=120)
        assert r.status_code == status, f"{what}: {r.status_code} {r.text}\n{log_tail(log, 20)}"
        assert fragment in r.json()["detail"], f"{what}: {r.text}"
        assert api.alive(), what
    assert snapshot(studies) == inside and api.objects() == listed
    assert uploads_left(tmp / "server_tmp", server_tmp) == []
    good = requests.put(
        f"{api.url}/datastore/image/info",
        params={"image": "ct"},
        files={"info": (None, '{"reviewer": "a"}')},
        timeout=60,
    )
    assert good.status_code == 200, good.text
    assert requests.get(f"{api.url}/datastore/image/info", params={"image": "ct"}, timeout=60).json()["reviewer"] == "a"


class EmptyPacs(BaseHTTPRequestHandler):
    """A DICOMweb server that holds no series: every QIDO-RS search finds nothing."""

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - the name http.server calls
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_dicomweb_datastore_answers_unknown_series_404_and_an_unreachable_server_502(tmp_path, monkeypatch):
    pacs = ThreadingHTTPServer(("127.0.0.1", 0), EmptyPacs)
    threading.Thread(target=pacs.serve_forever, daemon=True).start()
    tools = tmp_path / "tools"  # dcmqi's converter found on PATH: MONAI Label then downloads no tools
    tools.mkdir()
    (tools / "itkimage2segimage").write_text("#!/bin/sh\nexit 1\n")
    (tools / "itkimage2segimage").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MONAI_LABEL_DICOMWEB_CACHE_PATH", str(tmp_path / "cache"))
    studies = f"http://127.0.0.1:{pacs.server_address[1]}/dicom-web"
    try:
        with running_server(tmp_path / "run", studies, [("device", "cpu")], pythonpath=[TESTS]) as (url, proc, log):

            def infer(image):
                return requests.post(
                    f"{url}/infer/sam3d_point",
                    params={"image": image, "output": "json"},
                    files={"params": (None, '{"foreground": [[1, 1, 1]]}')},
                    timeout=120,
                )

            lookups = {  # what: (request, fragment of the reason)
                "infer, unknown series": (lambda: infer("1.2.826.0.1.99"), "not on the DICOMweb server"),
                "infer, a path": (lambda: infer("../../etc"), "not in the datastore"),
                "image download": (
                    lambda: requests.get(f"{url}/datastore/image", params={"image": "1.2.826.0.1.99"}, timeout=60),
                    "not on the DICOMweb server",
                ),
                "image download, a path": (
                    lambda: requests.get(f"{url}/datastore/image", params={"image": "../.."}, timeout=60),
                    "must be a name",
                ),
                "final label download": (
                    lambda: requests.get(
                        f"{url}/datastore/label", params={"label": "1.2.826.0.1.99", "tag": "final"}, timeout=60
                    ),
                    "not on the DICOMweb server",
                ),
            }
            for what, (request, fragment) in lookups.items():
                r = request()
                assert r.status_code == 404 and fragment in r.json()["detail"], f"{what}: {r.status_code} {r.text}"
                assert requests.get(f"{url}/info/", timeout=60).status_code == 200, what
            pacs.shutdown()
            pacs.server_close()
            r = infer("1.2.826.0.1.98")
            assert r.status_code == 502 and "cannot reach the DICOMweb server" in r.json()["detail"], r.text
            assert proc.poll() is None, log_tail(log)
    finally:
        pacs.shutdown()  # both idempotent
        pacs.server_close()
