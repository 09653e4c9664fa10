"""`uncertainty`: hand out the unlabelled image on which the served model disagrees with itself the most.

Scoring (`UncertaintyScoring`, MONAI Label's scoring method `uncertainty`, run in MONAI Label's scoring process):
for each unlabelled image, a few points are proposed without any label (`propose_points`: the centre of the
bright part of the image, and random bright voxels of its central region); each point is clicked `repeats`
times, jittered by up to `jitter_mm`, through the same engine that answers clicks; the image's score is the mean
over points of 1 - the mean pairwise Dice of those masks. A model that is sure of a structure returns nearly
the same mask for nearby clicks; one that is not, does not.

Scores are cached in `<studies>/.sam3d/uncertainty.json` keyed by image and by the served checkpoint's stamp
(path, modification time, size): a promoted checkpoint makes every score stale. An image that cannot be scored
(unreadable, or the model failed on it) is kept there too, with the reason, and not tried again for that stamp.
The strategy ranks unlabelled images by cached score, unscored ones after them in random order, and starts the
scoring job in the background (once: not while one is queued or running) whenever some image is still to try.
A model without weights scores nothing: no job starts, and the app registers no scoring method for it, so
MONAI Label's automatic scoring (at start-up, after each Next Sample) starts no process either.
"""

import itertools
import json
import logging
import os
import random
import threading
from pathlib import Path

import numpy as np
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.random import Random

from ..engine.checkpoint import atomic_write
from .app_config import TaskSpec
from .devices import resolve_device

logger = logging.getLogger(__name__)

DEFAULTS = {"points": 3, "repeats": 4, "jitter_mm": 6.0, "threads": 1}


def checkpoint_stamp(spec: TaskSpec) -> str:
    """What the scores were computed with: the checkpoint's path, mtime and size (the infer task's reload key)."""
    ckpt = spec.model_config.get("checkpoint")
    if not ckpt:
        return f"factory:{spec.model_config.get('factory')}"
    try:
        st = os.stat(ckpt)
    except OSError:
        return f"{ckpt}:missing"
    return f"{ckpt}:{st.st_mtime_ns}:{st.st_size}"


def why_unscorable(spec: TaskSpec) -> str | None:
    """Why the task's model cannot score any image now (no weights, a broken config); None when it can."""
    if spec.error:
        return f"task {spec.name} is misconfigured: {spec.error}"
    config = spec.model_config
    if config.get("factory"):
        return None
    if not config.get("checkpoint"):
        return f"task {spec.name} has no checkpoint configured"
    if not os.path.isfile(config["checkpoint"]):
        return f"task {spec.name} has no weights: {config['checkpoint']} not found"
    return None


class ScoreCache:
    """{"stamp": ..., "scores": {image id: score}, "unscorable": {image id: reason}} in one JSON file, replaced
    atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def _read(self, stamp: str) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if data.get("stamp") == stamp else {}

    def scores(self, stamp: str) -> dict[str, float]:
        return dict(self._read(stamp).get("scores") or {})

    def unscorable(self, stamp: str) -> dict[str, str]:
        return dict(self._read(stamp).get("unscorable") or {})

    def tried(self, stamp: str) -> set[str]:
        """Images scored, or found unscorable, with this checkpoint."""
        return set(self.scores(stamp)) | set(self.unscorable(stamp))

    def put(self, stamp: str, image_id: str, score: float) -> None:
        self._update(stamp, "scores", image_id, float(score))

    def put_unscorable(self, stamp: str, image_id: str, reason: str) -> None:
        self._update(stamp, "unscorable", image_id, reason)

    def _update(self, stamp: str, section: str, image_id: str, value) -> None:
        with self._lock:
            old = self._read(stamp)
            data = {"stamp": stamp, "scores": old.get("scores") or {}, "unscorable": old.get("unscorable") or {}}
            data[section] = {**data[section], image_id: value}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, sort_keys=True)))


def propose_points(image: np.ndarray, n: int, seed: int) -> list[list[int]]:
    """`n` voxels to click without a label: the bright voxel nearest the centre of the bright part (above the 75th
    percentile), then random bright voxels of the central half of its bounding box."""
    bright = image > np.percentile(image, 75)
    if not bright.any():
        bright = np.ones(image.shape, bool)
    idx = np.argwhere(bright)
    centre = idx.mean(0)
    points = [idx[np.argmin(((idx - centre) ** 2).sum(1))]]
    lo, hi = idx.min(0), idx.max(0)
    q = (hi - lo) / 4
    central = idx[np.all((idx >= lo + q) & (idx <= hi - q), axis=1)]
    pool = central if len(central) else idx
    rng = np.random.default_rng(seed)
    points += [pool[i] for i in rng.choice(len(pool), size=min(n - 1, len(pool)), replace=False)]
    return [[int(v) for v in p] for p in points[:n]]


def disagreement(masks: list[np.ndarray]) -> float:
    """1 - the mean pairwise Dice of binary masks (two empty masks agree)."""
    dices = []
    for a, b in itertools.combinations(masks, 2):
        s = int(a.sum()) + int(b.sum())
        dices.append(1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s)
    return float(1.0 - np.mean(dices)) if dices else 0.0


def score_image(engine, image_path: str, settings: dict, seed: int) -> float:
    """The image's disagreement score (see the module docstring)."""
    from ..engine.image_session import load_image

    img = load_image(image_path)
    arr = np.asarray(img[0])
    spacing = np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(0))
    jitter = float(settings["jitter_mm"]) / np.maximum(spacing, 1e-6)  # per axis, in voxels
    rng = np.random.default_rng(seed)
    shape = np.asarray(arr.shape) - 1
    per_point = []
    for k, point in enumerate(propose_points(arr, int(settings["points"]), seed)):
        masks = []
        for r in range(int(settings["repeats"])):
            p = np.clip(np.round(point + rng.uniform(-1, 1, 3) * jitter), 0, shape).astype(int).tolist()
            res = engine.segment(image_path, [p], [], label=f"uncertainty-{k}-{r}")  # own label: no refinement
            masks.append(res.mask > 0)
        per_point.append(disagreement(masks))
    return float(np.mean(per_point))


def _click_engine(model_config: dict, device: str):
    """The scored model as a click model (the engine `Sam3DPredictor` wraps): scores are clicks' disagreement."""
    from sam3d.predictor import load_engine

    return load_engine(model_config, device, "point")


def _seed(image_id: str) -> int:
    import hashlib

    return int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16)


class UncertaintyScoring(ScoringMethod):
    """Scores the unlabelled images not yet scored for the served checkpoint; saves each score as it goes."""

    def __init__(
        self, spec: TaskSpec, cache: ScoreCache, settings: dict | None = None, device: str = "auto", engine_factory=None
    ):
        super().__init__("Disagreement of the served model under jittered clicks at proposed points")
        self.spec, self.cache = spec, cache
        self.settings = {**DEFAULTS, **(settings or {})}
        self.device = resolve_device(device)[0]
        self.engine_factory = engine_factory or _click_engine

    def __call__(self, request, datastore):
        import torch

        if self.device == "cpu":
            torch.set_num_threads(int(self.settings["threads"]))  # the server's clicks come first
        stamp = checkpoint_stamp(self.spec)
        skipped = why_unscorable(self.spec)
        if skipped:
            logger.info(f"sam3d uncertainty: nothing scored: {skipped}")
            return {"scored": 0, "stamp": stamp, "skipped": skipped}
        done = self.cache.tried(stamp)
        todo = [i for i in sorted(datastore.get_unlabeled_images()) if i not in done]
        if not todo:
            return {"scored": 0, "stamp": stamp}
        try:
            engine = self.engine_factory(self.spec.model_config, self.device)
        except Exception as e:  # a checkpoint that does not load scores nothing until it changes
            logger.warning(f"sam3d uncertainty: cannot load the model, no image scored: {e}")
            for image_id in todo:
                self.cache.put_unscorable(stamp, image_id, f"the model did not load: {e}")
            return {"scored": 0, "stamp": stamp, "skipped": str(e)}
        scored = {}
        for image_id in todo:
            try:
                path = datastore.get_image_uri(image_id)
                scored[image_id] = score_image(engine, path, self.settings, _seed(image_id))
            except Exception as e:  # one unreadable image must not stop the others, nor be tried again
                logger.warning(f"sam3d uncertainty: cannot score {image_id} (not tried again for this checkpoint): {e}")
                self.cache.put_unscorable(stamp, image_id, str(e))
                continue
            self.cache.put(stamp, image_id, scored[image_id])
            logger.info(f"sam3d uncertainty: {image_id} = {scored[image_id]:.4f}")
        return {"scored": len(scored), "stamp": stamp, "scores": scored}


class UncertaintyStrategy(Strategy):
    """The unlabelled image with the highest cached score; random among unscored ones when none is scored."""

    def __init__(self, spec: TaskSpec, cache: ScoreCache, start_scoring=None):
        super().__init__(
            "Most uncertain first: disagreement of the model under jittered clicks (scored in the "
            "background; random until scored)"
        )
        self.spec, self.cache, self.start_scoring = spec, cache, start_scoring

    def __call__(self, request, datastore):
        stamp = checkpoint_stamp(self.spec)
        scores = self.cache.scores(stamp)
        # every unlabelled image, leased or not (a lease hides an image from get_unlabeled_images only)
        unlabelled = set(datastore.list_images()) - set(datastore.get_labeled_images())
        to_try = unlabelled - self.cache.tried(stamp)
        if to_try and self.start_scoring is not None and why_unscorable(self.spec) is None:
            self.start_scoring()
        images = datastore.get_unlabeled_images()
        if not images:
            return None
        ranked = sorted((i for i in images if i in scores), key=lambda i: (-scores[i], i))
        if ranked:
            return {"id": ranked[0], "score": scores[ranked[0]]}
        return {"id": random.choice(images), "score": None}


class RandomStrategy(Random):
    """MONAI Label's random (weighted towards images not handed out lately), without its one failure: when every
    candidate was handed out within the current second, all weights are 0 and `random.choices` raises."""

    def __call__(self, request, datastore):
        try:
            return super().__call__(request, datastore)
        except ValueError:
            images = datastore.get_unlabeled_images()
            return {"id": random.choice(images)} if images else None


def start_scoring_once(app, method: str = "uncertainty") -> None:
    """Queue MONAI Label's scoring job unless one is already queued or running."""
    from monailabel.utils.async_tasks.utils import tasks

    if any(t["status"] in ("SUBMITTED", "RUNNING") for t in tasks("scoring")):
        return
    app.async_scoring(method)
