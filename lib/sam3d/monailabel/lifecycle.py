"""Task processes (training, scoring) live only as long as the server that started them, and promote only under it.

MONAI Label starts a task with `subprocess.Popen` and nothing ties its life to the server's: after a kill -9 of
the server the task goes on, and a restarted server neither sees nor stops it, then serves the checkpoint it
promotes. So the server registers at start-up (`register_server`): `<state>/server.json` names the server now
serving the datastore, and `SAM3D_SERVER` ("pid:id") in its environment reaches every task process (MONAI
Label's Popen copies the server's environment). In a task process, `exit_with_server` ends the process once its
parent is no longer that server (a dead parent's children are re-parented), and `why_not_serving`, checked just
before a promotion, refuses it when the server that started the run has stopped or another one has registered.
One server process per datastore, as MONAI Label runs (one uvicorn worker).
"""

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..engine.checkpoint import atomic_write

logger = logging.getLogger(__name__)

ENV = "SAM3D_SERVER"
WATCH_EVERY_S = 0.5


@dataclass(frozen=True)
class ServerRef:
    pid: int
    id: str


def server_file(state_dir: Path) -> Path:
    return Path(state_dir) / "server.json"


def register_server(state_dir: Path) -> ServerRef:
    """This process serves the datastore of `state_dir` from now on; its task processes will know it."""
    ref = ServerRef(os.getpid(), uuid.uuid4().hex)
    path = server_file(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"pid": ref.pid, "id": ref.id, "started": time.time()}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data)))
    os.environ[ENV] = f"{ref.pid}:{ref.id}"
    return ref


def starting_server() -> ServerRef | None:
    """The server that started this process; None when no server did (a script, a test) or this is the server."""
    pid, _, server_id = os.environ.get(ENV, "").partition(":")
    if not pid.isdigit() or int(pid) == os.getpid():
        return None
    return ServerRef(int(pid), server_id)


def exit_with_server() -> None:
    """In a task process: exit as soon as the server that started it is gone (also when it already is)."""
    ref = starting_server()
    if ref is None:
        return

    def watch():
        while os.getppid() == ref.pid:
            time.sleep(WATCH_EVERY_S)
        logger.warning(f"sam3d: the server (pid {ref.pid}) that started this task is gone: exiting")
        os._exit(1)  # at once, like the kill it follows: the run's folder says `running` until a server looks

    threading.Thread(target=watch, name="sam3d-server-watch", daemon=True).start()


def why_not_serving(state_dir: Path) -> str | None:
    """Why this task's results must not change what is served: its server stopped, or another one serves the
    datastore now; None when it may (or when no server started this process)."""
    ref = starting_server()
    if ref is None:
        return None
    if os.getppid() != ref.pid:
        return f"the server (pid {ref.pid}) that started this run has stopped"
    try:
        current = json.loads(server_file(state_dir).read_text())
    except (OSError, ValueError):
        current = {}
    if current.get("id") != ref.id:
        return f"another server (pid {current.get('pid')}) serves this datastore now"
    return None
