"""The scripts send the API token of `SAM3D_API_TOKEN` (sam3d.monailabel.api_client), against a recording HTTP
server that answers as a sam3d server would: scripts/retrain.py through MONAI Label's client, and
scripts/benchmark_concurrency.py's click and /info probe through `requests`."""

import gzip
import importlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sam3d.monailabel.api_client import Sam3DClient, auth_headers

REPO = Path(__file__).resolve().parents[1]
TOKEN = "client-test-token-0123456789"
MASK = np.zeros((4, 4, 4), np.uint8)
MASK[1:3, 1:3, 1:3] = 1


def load_script(name: str):
    """The command `scripts/<name>.py` runs (its code is in sam3d.cli)."""
    return importlib.import_module(f"sam3d.cli.{name}")


class Recorder(BaseHTTPRequestHandler):
    """Answers the few routes the scripts use and records (method, path, headers) of every request."""

    requests: list = []

    def log_message(self, *args):
        pass

    def _answer(self, body: bytes, content_type="application/json"):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self):
        self.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        length = int(self.headers.get("Content-Length") or 0)
        if self.command != "GET" and length:
            self.rfile.read(length)
        if self.path.startswith("/train/sam3d"):
            return self._answer(json.dumps({"id": "t1", "status": "SUBMITTED"}).encode())
        if self.path.startswith("/train/"):
            return self._answer(json.dumps([{"id": "t1", "status": "DONE"}]).encode())
        if self.path.startswith("/infer/"):
            return self._answer(gzip.compress(nib.Nifti1Image(MASK, np.eye(4)).to_bytes()), "application/gzip")
        return self._answer(json.dumps({"models": {}, "train_stats": {"sam3d": {"best": 1}}}).encode())

    do_GET = do_POST = do_PUT = _handle


class OneProbe(threading.Event):
    """A prober's stop event that is set at its first wait: one probe."""

    def wait(self, timeout=None):
        self.set()
        return True


@pytest.fixture
def recorder():
    Recorder.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", Recorder.requests
    finally:
        server.shutdown()
        server.server_close()


def test_auth_headers_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("SAM3D_API_TOKEN", raising=False)
    assert auth_headers() == {}
    monkeypatch.setenv("SAM3D_API_TOKEN", f"  {TOKEN}\n")
    assert auth_headers() == {"Authorization": f"Bearer {TOKEN}"}
    assert auth_headers("other-token-0123456789") == {"Authorization": "Bearer other-token-0123456789"}


def test_retrain_script_sends_the_token_and_no_stale_body_headers(recorder, monkeypatch, capsys):
    url, seen = recorder
    monkeypatch.setenv("SAM3D_API_TOKEN", TOKEN)
    assert load_script("retrain").main(["--server", url, "--wait", "--poll", "0"]) == 0
    assert [(m, p.split("?")[0]) for m, p, _ in seen] == [
        ("POST", "/train/sam3d"),
        ("GET", "/train/"),
        ("GET", "/info/"),
    ]
    assert all(h.get("authorization") == f"Bearer {TOKEN}" for _, _, h in seen), seen
    # MONAI Label's client adds the POST's content headers to its own header dict: not carried to later GETs
    assert all("content-length" not in h and "content-type" not in h for m, _, h in seen if m == "GET"), seen
    assert '"best": 1' in capsys.readouterr().out


def test_client_without_a_token_sends_none(recorder, monkeypatch, tmp_path):
    url, seen = recorder
    monkeypatch.delenv("SAM3D_API_TOKEN", raising=False)
    client = Sam3DClient(url, tmpdir=str(tmp_path))
    client.info()
    client.update_auth({"token_type": "Bearer", "access_token": TOKEN})  # as after Slicer's login
    client.info()
    assert [h.get("authorization") for _, _, h in seen] == [None, f"Bearer {TOKEN}"]


def test_benchmark_concurrency_sends_the_token(recorder, monkeypatch):
    url, seen = recorder
    monkeypatch.setenv("SAM3D_API_TOKEN", TOKEN)
    bench = load_script("benchmark_concurrency")
    samples = bench.Samples()
    mask = bench.click(url, "img0", {"foreground": [[1, 1, 1]], "label": "x"}, samples)
    assert np.array_equal(mask, MASK > 0)
    bench.probe_info(url, 0, OneProbe(), samples, 1)
    assert [(m, p.split("?")[0]) for m, p, _ in seen] == [("POST", "/infer/sam3d_point"), ("GET", "/info/")]
    assert all(h.get("authorization") == f"Bearer {TOKEN}" for _, _, h in seen) and not samples.errors
