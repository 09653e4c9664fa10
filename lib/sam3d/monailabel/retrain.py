"""Scheduled re-training: start the train task after every `retrain_every` new or changed final labels.

The app calls `record(image_id)` whenever a final label is saved; the images labelled since the last start are
kept in `<studies>/.sam3d/retrain.json` (so a restart does not forget them), an image saved twice counts once.
When they reach `every`, `submit()` asks for a training run; the train route queues it behind a running one and
merges it with one already waiting, so saving labels quickly never starts a pile of runs.
"""

import json
import logging
import threading
from pathlib import Path

from ..engine.checkpoint import atomic_write

logger = logging.getLogger(__name__)


class RetrainPolicy:
    def __init__(self, every: int, path: Path, submit):
        self.every, self.path, self.submit = int(every), Path(path), submit
        self._lock = threading.Lock()

    def pending(self) -> list[str]:
        try:
            return list(json.loads(self.path.read_text()).get("pending", []))
        except (OSError, ValueError):
            return []

    def _save(self, pending: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(json.dumps({"pending": pending})))

    def record(self, image_id: str) -> dict | None:
        """Count a saved final label; returns the submitted train task when this label completes a batch."""
        if self.every <= 0:
            return None
        with self._lock:
            pending = self.pending()
            if image_id not in pending:
                pending.append(image_id)
            if len(pending) < self.every:
                self._save(pending)
                return None
            try:
                task = self.submit()
            except Exception as e:  # e.g. the model cannot be trained: keep counting, say why
                logger.warning(f"sam3d: retrain after {len(pending)} labels not started: {getattr(e, 'detail', e)}")
                self._save(pending)
                return None
            logger.info(f"sam3d: {len(pending)} new or changed labels: training submitted ({task.get('id')})")
            self._save([])
            return task
