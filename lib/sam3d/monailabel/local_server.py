"""Start the sam3d app under a real `monailabel start_server` on 127.0.0.1, and always stop it.

For experiments that must go through the server as annotators do (scripts/learning_curve.py) and for the tests.
"""

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from .api_client import Sam3DClient

APP = Path(__file__).resolve().parents[3] / "apps" / "sam3d"
STARTUP_TIMEOUT_S = 120


class ServerStartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log: Path, n: int = 60) -> str:
    try:
        return "\n".join(Path(log).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@contextlib.contextmanager
def running_server(workdir: Path, studies: Path | str, conf: list[tuple[str, str]], pythonpath: list[str] = ()):
    """Yields (url, process, log path). `studies`: a folder or a DICOMweb URL. The server's temp files and sessions
    stay inside `workdir`; `pythonpath` is prepended to the server's (e.g. a folder with model factories named in a
    model config)."""
    # absolute: the server runs in `workdir`, where a relative studies path would name another (empty) folder
    workdir = Path(workdir).resolve()
    studies = studies if str(studies).startswith(("http://", "https://")) else Path(studies).resolve()
    server_tmp = workdir / "server_tmp"  # the server's TMPDIR: result and upload files land here
    server_tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(
                [str(APP.parents[1] / "lib"), *map(str, pythonpath), env.get("PYTHONPATH", "")]
            ),
            "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
            "MONAI_LABEL_SESSION_PATH": str(workdir / "sessions"),
            "TMPDIR": str(server_tmp),
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
        }
    )
    port = free_port()
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
        "127.0.0.1",
        "--port",
        str(port),
    ]
    for key, value in conf:
        cmd += ["--conf", key, str(value)]
    log = workdir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    probe = workdir / "probe"
    probe.mkdir(exist_ok=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise ServerStartError(f"server exited with {proc.returncode} during start-up:\n{log_tail(log)}")
            try:
                Sam3DClient(url, tmpdir=str(probe)).info()  # with SAM3D_API_TOKEN, as the server
                break
            except Exception:  # noqa: BLE001 - connection refused or not ready: not up yet
                if time.monotonic() > deadline:
                    raise ServerStartError(f"server not up after {STARTUP_TIMEOUT_S} s:\n{log_tail(log)}") from None
                time.sleep(0.5)
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
