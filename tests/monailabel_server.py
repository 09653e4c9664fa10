"""The tests' real `monailabel start_server` (sam3d.monailabel.local_server), with tests/ on the server's
PYTHONPATH so that model configs can name `fakes:...` factories, and a start-up failure failing the test."""

import contextlib
import time
from pathlib import Path

import pytest

from sam3d.monailabel import local_server
from sam3d.monailabel.local_server import log_tail  # noqa: F401 - re-exported for the tests

TESTS = Path(__file__).resolve().parent


@contextlib.contextmanager
def running_server(workdir: Path, studies: Path, conf: list[tuple[str, str]]):
    """Yields (url, process, log path); see sam3d.monailabel.local_server.running_server."""
    try:
        with local_server.running_server(workdir, studies, conf, pythonpath=[TESTS]) as started:
            yield started
    except local_server.ServerStartError as e:
        pytest.fail(str(e))


def wait_for(what: str, check, timeout_s: float = 120, every_s: float = 0.5):
    """`check()`'s first truthy value, asked every `every_s`; the test fails naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)
