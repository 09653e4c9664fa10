"""The security policy through a real `monailabel start_server` (reliability suite): other origins get nothing
from a loopback server; a server on every interface refuses to start without a token, and with one answers only
requests that carry it, Slicer's login included."""

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from sam3d.evaluation.segmenters import ServerSegmenter
from sam3d.monailabel.local_server import APP, STARTUP_TIMEOUT_S, free_port, log_tail
from tiny_datastore import write_studies, write_tiny_model

pytestmark = pytest.mark.reliability

TESTS = Path(__file__).resolve().parent
TOKEN = "reliability-test-token-0123456789"


def server_command(studies: Path, host: str, port: int, conf) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(APP),
        "--studies",
        str(studies),
        "--host",
        host,
        "--port",
        str(port),
    ]
    for key, value in conf:
        cmd += ["--conf", key, str(value)]
    return cmd


def server_env(workdir: Path, extra: dict | None) -> dict:
    """The server's environment: sam3d and tests/ importable, its temp files and sessions inside `workdir`, and
    MONAI Label's defaults otherwise (automatic scoring on)."""
    (workdir / "server_tmp").mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(APP.parents[1] / "lib"), str(TESTS)]),
        "MONAI_LABEL_SESSION_PATH": str(workdir / "sessions"),
        "TMPDIR": str(workdir / "server_tmp"),
        **(extra or {}),
    }


def http(url: str, path: str, method: str = "GET", headers: dict | None = None, data: bytes | None = None):
    """(status, headers, body) of one request; an HTTP error status is an answer too."""
    request = urllib.request.Request(f"{url}{path}", data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@contextlib.contextmanager
def started_server(workdir: Path, studies: Path, conf=(), host: str = "127.0.0.1", env: dict | None = None):
    """Yields (url, process, log) once the server answers /info/ at all (401 included); always stops it."""
    port = free_port()
    log = workdir / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            server_command(studies.resolve(), host, port, conf),
            cwd=workdir,
            env=server_env(workdir, env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log_tail(log)}"
            with contextlib.suppress(OSError):
                http(url, "/info/")
                break
            assert time.monotonic() < deadline, f"server not up:\n{log_tail(log)}"
            time.sleep(0.5)
        yield url, proc, log
    finally:
        proc.kill()  # its task processes exit with it (sam3d.monailabel.lifecycle)
        proc.wait()


def tiny_setup(tmp_path: Path) -> tuple[Path, list]:
    studies = tmp_path / "studies"
    write_studies(studies, 2, labelled=(0,))
    model_yaml, _ = write_tiny_model(tmp_path / "models")
    return studies, [("model", model_yaml), ("device", "cpu")]


def test_a_loopback_server_gives_other_origins_nothing(tmp_path):
    studies, conf = tiny_setup(tmp_path)
    with started_server(tmp_path, studies, conf) as (url, proc, log):
        assert http(url, "/info/")[0] == 200 and http(url, "/info/", headers={"Origin": url})[0] == 200
        foreign = {"Origin": "http://evil.example"}
        status, headers, _ = http(url, "/info/", headers=foreign)
        assert status == 403 and "access-control-allow-origin" not in headers
        status, headers, _ = http(
            url, "/datastore/?output=all", "OPTIONS", {**foreign, "Access-Control-Request-Method": "DELETE"}
        )
        assert status == 400 and "access-control-allow-origin" not in headers
        # a form POST needs no preflight: refused before it runs (it would lease an image)
        form = {**foreign, "Content-Type": "application/x-www-form-urlencoded"}
        assert http(url, "/activelearning/first", "POST", form, b"client_id=evil")[0] == 403
        assert not (studies / ".sam3d" / "leases.json").exists()
        assert http(url, "/info/", headers={"Host": "evil.example", "Origin": "http://evil.example"})[0] == 400
        assert proc.poll() is None, log_tail(log)


def test_all_interfaces_need_a_token_and_get_one(tmp_path, monkeypatch):
    studies, conf = tiny_setup(tmp_path)
    refused = subprocess.run(
        server_command(studies.resolve(), "0.0.0.0", free_port(), conf),
        cwd=tmp_path,
        env=server_env(tmp_path, None),
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "sam3d: not starting: refusing to listen on 0.0.0.0 without authentication" in output

    with started_server(tmp_path, studies, conf, host="0.0.0.0", env={"SAM3D_API_TOKEN": TOKEN}) as (url, _, log):
        assert http(url, "/info/")[0] == 401
        assert http(url, "/info/", headers={"Authorization": "Bearer not-the-token-0123456789"})[0] == 401
        assert http(url, "/info/", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200

        client = MONAILabelClient(url, tmpdir=str(tmp_path))  # as Slicer's MONAI Label module logs in
        assert client.auth_enabled()
        with pytest.raises(MONAILabelClientException):
            client.auth_token("annotator", "a wrong password")
        client.update_auth(client.auth_token("annotator", TOKEN))
        assert client.auth_valid_token() and "sam3d_point" in client.info()["models"]
        assert client.next_sample("first", {})["id"] == "img1", log_tail(log)

        monkeypatch.setenv("SAM3D_API_TOKEN", TOKEN)  # sam3d's scripts and evaluation take it from the environment
        scripted = ServerSegmenter(url, tmpdir=str(tmp_path)).client  # evaluate.py --server: /info with the token
        result, _ = scripted.infer("sam3d_point", "img0", {"foreground": [[8, 9, 10]]})
        assert Path(result).is_file() and "sam3d_point" in scripted.info()["models"], log_tail(log)
