"""Leases on images handed out for annotation, so that two annotators do not get the same image.

MONAI Label only stamps an image with the strategy, client and time it was handed out. Here an image handed to
one client (`client_id` of the request) is leased to it for `lease_minutes`; no strategy hands it to another
client while the lease is live. A client holds one lease: asking for the next image releases its previous one.
Saving a final label for the image releases its lease (the app's `on_save_label`). The leases live in one JSON
file beside the datastore (`<studies>/.sam3d/leases.json`), rewritten atomically, so a restart keeps them.

`LeasedStrategy` wraps any MONAI Label strategy (random, first, uncertainty): the wrapped one sees a datastore
whose unlabelled images leave out those leased to others.
"""

import json
import logging
import threading
import time
from pathlib import Path

from monailabel.interfaces.tasks.strategy import Strategy

from ..engine.checkpoint import atomic_write

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"


class LeaseStore:
    """image id -> {"client", "expires"} in a JSON file; every call reads the file, writes go through one rename."""

    def __init__(self, path: Path, minutes: float, clock=time.time):
        self.path, self.seconds, self.clock = Path(path), 60.0 * float(minutes), clock
        self.lock = threading.RLock()

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:  # a damaged file must not stop annotation: start afresh
            logger.warning(f"sam3d: ignoring unreadable leases {self.path}: {e}")
            return {}
        now = self.clock()
        return {k: v for k, v in data.items() if isinstance(v, dict) and float(v.get("expires", 0)) > now}

    def _write(self, leases: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(json.dumps(leases, indent=1, sort_keys=True)))

    def live(self) -> dict:
        with self.lock:
            return self._read()

    def held_by_others(self, client: str) -> set[str]:
        return {image for image, lease in self.live().items() if lease["client"] != client}

    def acquire(self, image_id: str, client: str) -> dict:
        """Lease `image_id` to `client` (dropping the client's other lease); returns the lease."""
        with self.lock:
            leases = {k: v for k, v in self._read().items() if v["client"] != client}
            lease = {"client": client, "expires": self.clock() + self.seconds}
            leases[image_id] = lease
            self._write(leases)
            return lease

    def release(self, image_id: str) -> bool:
        with self.lock:
            leases = self._read()
            found = leases.pop(image_id, None) is not None
            self._write(leases)
            return found


class _WithoutImages:
    """A datastore whose unlabelled images leave some out; everything else is the datastore's own."""

    def __init__(self, datastore, hidden: set[str]):
        self._datastore, self._hidden = datastore, hidden

    def get_unlabeled_images(self, *args, **kwargs):
        return [i for i in self._datastore.get_unlabeled_images(*args, **kwargs) if i not in self._hidden]

    def __getattr__(self, name):
        return getattr(self._datastore, name)


class LeasedStrategy(Strategy):
    """`inner`, never handing out an image that another client holds a live lease on; leases what it returns."""

    def __init__(self, inner: Strategy, leases: LeaseStore):
        super().__init__(f"{inner.description} (an image handed out is reserved for its client)")
        self.inner, self.leases = inner, leases

    def __call__(self, request, datastore):
        client = str(request.get("client_id") or ANONYMOUS)
        with self.leases.lock:  # choose and lease in one step: two requests never get the same image
            result = self.inner(request, _WithoutImages(datastore, self.leases.held_by_others(client)))
            if result and result.get("id"):
                lease = self.leases.acquire(result["id"], client)
                result["lease"] = {"client": client, "expires": lease["expires"]}
        return result
