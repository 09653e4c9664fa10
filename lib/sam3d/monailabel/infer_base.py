"""What every sam3d infer task shares: the model's weights, their hot reload, the errors, the answer's file.

`Sam3DInferTask` is MONAI Label's `InferTask` for one configured model (`TaskSpec`). Its subclasses, one per
model kind (`TASKS` in this package: point, text, auto), say only what a request holds (`parse_request`) and
how the engine answers it (`answer`); this class does the rest:

- the weights load on the first request (or in the background at start-up with `preload`) through
  `sam3d.predictor.load_engine`, the engine `Sam3DPredictor` wraps; a missing checkpoint never stops the
  server: the task stays listed in /info and says what to set;
- hot reload: when the checkpoint file changes on disk (a training run promoted new weights; its stamp is
  path, mtime and size), the next request loads it; a new file that does not load keeps the last good weights;
- errors reach the client as HTTP errors with a message meant for the user (MONAI Label turns any other
  exception into a bare 500): 422 for a request the model cannot answer (checked before any model work where
  possible, `sam3d.engine.Sam3DInputError` after), 404 for an image that does not exist, 503 while the weights
  are missing (with how to set them), 500 with the reason for weights that fail to load;
- the answer: a file in the format the request asks for (`result_format`) and JSON with the task, the model,
  the weights that answered (`model_id`), the device and the timings.

Tests (and callers with a model of their own) pass `engine_factory(model_config, device) -> engine` instead of
loading from the config.
"""

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ..engine import weights_registry
from .app_config import TaskSpec
from .devices import resolve_device
from .result_format import ResultFormat

logger = logging.getLogger(__name__)

EngineFactory = Callable[[dict, str], Any]  # (model_config, device) -> an engine (sam3d.engine)
MAX_LABEL_CHARS = 128


# ---- request helpers every task uses ----------------------------------------------------------------------------


def request_image(request: dict) -> str:
    """The request's image path (MONAI Label has resolved the datastore id); HTTPException 422/404 when unusable."""
    image = request.get("image")
    if not isinstance(image, str) or not image:
        raise HTTPException(status_code=422, detail="no image: give an image id of the datastore or upload a file")
    if not os.path.exists(image):
        raise HTTPException(status_code=404, detail=f"image not found: {image}")
    return image


def request_points(value, name: str) -> list[list[float]]:
    """A list of [i, j, k]; anything else is the client's mistake (422)."""
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return []
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple))
        and len(p) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)
        for p in value
    )
    if not ok:
        raise HTTPException(status_code=422, detail=f"{name} must be a list of [i, j, k] voxel indices, got {value!r}")
    return [list(p) for p in value]


def jsonable(obj):
    """`obj` with numpy values, paths and non-finite floats made JSON-safe (None for NaN and infinities)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def latencies(timings: dict) -> dict:
    """MONAI Label's usual latency report, for clients that show it."""
    return {
        "pre": round(timings.get("load", 0.0), 4),
        "infer": round(timings.get("encode", 0.0) + timings.get("decode", 0.0), 4),
        "invert": round(timings.get("resample", 0.0), 4),
        "post": 0.0,
        "write": round(timings.get("write", 0.0), 4),
        "total": round(timings.get("request", 0.0), 4),
        "transform": None,
    }


def clicked_fields(res, prompt: dict, checkpoint: str | None, label_names: dict, prior: str | None = None) -> dict:
    """The JSON of an answer to a named structure (point and text tasks): the engine's info, the label."""
    return {
        **res.info,
        "network": res.info.get("model"),
        "checkpoint": res.info.get("checkpoint", checkpoint),
        "label": prompt["label"],
        "label_names": label_names,
        "prior": prior,
    }


def click_summary(prompt: dict, result: dict) -> str:
    return (
        f"{prompt['label']} fg={len(prompt['foreground'])} bg={len(prompt['background'])} "
        f"roi={prompt.get('roi') is not None} cached={result.get('embedding_cached')} "
        f"total={result['timings']['request']:.3f}s"
    )


def _input_errors() -> tuple[type[BaseException], ...]:
    from sam3d.engine import Sam3DInputError  # here: the app imports this module without torch work

    return (Sam3DInputError,)


def _weights_missing() -> tuple[type[BaseException], ...]:
    from sam3d.engine import WeightsMissingError

    return (WeightsMissingError,)


class Sam3DInferTask(InferTask):
    """One configured model behind MONAI Label's infer API (see the module docstring). Subclasses set `KIND` (the
    engine to load), `TYPE` (MONAI Label's model type, what the clients offer for it), and implement
    `parse_request` and `answer`."""

    KIND = "point"
    TYPE = InferType.DEEPGROW

    def __init__(
        self,
        spec: TaskSpec,
        device: str = "auto",
        strict_labels: bool = True,
        preload: bool = False,
        engine_factory: EngineFactory | None = None,
    ):
        self.spec = spec
        self.model_name = spec.model_name
        self.model_config = spec.model_config
        self.strict_labels = strict_labels
        self.device, self._device_error = resolve_device(device)
        self._engine_factory = engine_factory
        self._engine = None
        self._engine_stamp = None  # (path, mtime_ns, size) of the checkpoint the engine holds
        self._failure: tuple[Any, str] | None = None  # (stamp, message) of the last failed load
        self._lock = threading.Lock()
        super().__init__(
            type=self.TYPE,
            labels=self.initial_labels(),
            dimension=3,
            description=spec.description,
            config=self.options(),
        )
        if preload and self.status()[0] == "not_loaded":
            threading.Thread(target=self._preload, name=f"preload-{spec.name}", daemon=True).start()

    # ---- what a kind of task declares ---------------------------------------------------------------------------

    def initial_labels(self) -> dict[str, int]:
        """The labels /info lists before the weights are loaded."""
        return dict(self.spec.labels)

    def options(self) -> dict[str, Any]:
        """The options Slicer and OHIF show for this task (MONAI Label's `config`)."""
        return {}

    def companions(self) -> list["Sam3DInferTask"]:
        """More tasks the app lists beside this one (same engine)."""
        return []

    def connect(self, tasks: dict[str, "Sam3DInferTask"]) -> None:
        """Called once with every task of the app, so that a task can use another's answers."""

    def parse_request(self, request: dict) -> dict[str, Any]:
        """The request's prompt, checked before any model work; HTTPException (422/404) when unusable."""
        raise NotImplementedError

    def answer(self, engine, prompt: dict) -> tuple[Any, dict]:
        """(SegmentResult, the JSON fields of this kind of answer) for a parsed prompt."""
        raise NotImplementedError

    def how_to_set(self) -> str:
        """What to do when the weights are missing."""
        key = f"{self.spec.conf_prefix}checkpoint"
        fetch = weights_registry.how_to_fetch(self.model_config)  # published weights (`--conf weights NAME`)
        if fetch:
            return f"{fetch} (or set `--conf {key} /path/to/weights`); the next request picks them up"
        return (
            f"set the weights with `--conf {key} /path/to/weights` (.safetensors or SAM-Med3D .pth) "
            f"or put the file at the configured path; the next request picks it up"
        )

    # ---- what /info shows ---------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def checkpoint(self) -> str | None:
        return self.model_config.get("checkpoint")

    @property
    def uses_factory(self) -> bool:
        return bool(self.model_config.get("factory"))

    def status(self) -> tuple[str, str]:
        """(state, message): ready | not_loaded | weights_missing | load_failed | config_error."""
        if self.spec.error or self._device_error:
            return "config_error", f"configuration error: {self.spec.error or self._device_error}"
        if self._failure is not None and self._failure[0] == self._stamp():
            if self._engine is None:
                return "load_failed", f"failed to load the model: {self._failure[1]}"
            return "ready", f"serving the previous weights; the new checkpoint failed to load: {self._failure[1]}"
        if not self.uses_factory:
            ckpt = self.checkpoint
            if not ckpt:
                return "weights_missing", f"weights missing: no checkpoint configured; {self.how_to_set()}"
            if not os.path.isfile(ckpt):
                return "weights_missing", f"weights missing: checkpoint not found: {ckpt}; {self.how_to_set()}"
        if self._engine is not None:
            return "ready", "ready"
        return "not_loaded", "weights load on the first request"

    def info(self) -> dict[str, Any]:
        state, message = self.status()
        d = super().info()
        if state in ("weights_missing", "load_failed", "config_error"):
            d["description"] = f"UNAVAILABLE - {message} -- {self.description}"
        published = weights_registry.weights_info(self.model_config)  # `--conf weights NAME`: source, licence
        if published:
            d["description"] = f"{d['description']} [weights {published['name']}: {published['licence']}]"
        d["sam3d"] = {
            "model": self.model_name,
            "preset": self.model_config.get("preset"),
            "factory": self.model_config.get("factory"),
            "checkpoint": self.checkpoint,
            "weights": published,
            "device": self.device,
            "status": state,
            "message": message,
        }
        return d

    def is_valid(self) -> bool:
        return True  # listed even without weights, so that /info can say what is missing

    # ---- the engine ---------------------------------------------------------------------------------------------

    def _stamp(self):
        ckpt = self.checkpoint
        if self.uses_factory or not ckpt:
            return None
        try:
            st = os.stat(ckpt)
        except OSError:
            return (ckpt, None, None)
        return (ckpt, st.st_mtime_ns, st.st_size)

    def _preload(self) -> None:
        try:
            self.engine()
            logger.info(f"{self.name}: weights preloaded on {self.device}")
        except Exception as e:  # the server keeps serving; /info and requests say what is wrong
            logger.warning(f"{self.name}: preload failed: {getattr(e, 'detail', e)}")

    def _unavailable(self, status_code: int, message: str) -> HTTPException:
        return HTTPException(status_code=status_code, detail=f"{self.name} cannot segment: {message}")

    def _load(self):
        if self._engine_factory is not None:
            return self._engine_factory(self.model_config, self.device)
        from sam3d.predictor import load_engine  # here: the app imports this module without torch work

        return load_engine(self.model_config, self.device, self.KIND)

    def engine(self):
        """The engine, loaded (or reloaded after the checkpoint changed) on demand; HTTP errors when it cannot be."""
        state, message = self.status()
        if state in ("config_error", "weights_missing"):
            raise self._unavailable(503, message)
        with self._lock:
            stamp = self._stamp()
            if self._engine is not None and stamp == self._engine_stamp:
                return self._engine
            if self._failure is not None and self._failure[0] == stamp:
                if self._engine is not None:
                    return self._engine
                raise self._unavailable(500, f"failed to load the model: {self._failure[1]}")
            source = self.checkpoint or self.model_config.get("factory")
            t = time.perf_counter()
            try:
                engine = self._load()
            except _weights_missing() as e:
                raise self._unavailable(503, f"weights missing: {e}; {self.how_to_set()}") from e
            except Exception as e:
                logger.exception(f"{self.name}: loading {source} failed")
                self._failure = (stamp, f"{type(e).__name__}: {e}")
                if self._engine is not None:  # a bad new checkpoint: keep answering with the last good weights
                    logger.warning(f"{self.name}: keeping the previously loaded weights")
                    return self._engine
                raise self._unavailable(500, f"failed to load the model: {self._failure[1]}") from e
            dt = time.perf_counter() - t
            logger.info(f"{self.name}: loaded {self.model_name} ({source}) on {self.device} in {dt:.1f} s")
            self._engine, self._engine_stamp, self._failure = engine, stamp, None
            return engine

    def run_engine(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)`, an engine call: an input the model cannot take is the client's mistake (422)."""
        try:
            return fn(*args, **kwargs)
        except _input_errors() as e:
            raise HTTPException(status_code=422, detail=str(e)) from e

    # ---- one request --------------------------------------------------------------------------------------------

    def write_result(self, result, fmt: ResultFormat | None = None) -> str:
        """The answer as a temporary file in the format the client asked for (`fmt`, default NIfTI .nii.gz); MONAI
        Label sends it, then deletes it; nothing is left if writing fails."""
        return (fmt or ResultFormat()).write(result.mask, result.affine, prefix=f"{self.name}_")

    def summary(self, prompt: dict, result: dict) -> str:
        """The log line of one answered request (after the task's name)."""
        return f"total={result['timings']['request']:.3f}s"

    def __call__(self, request) -> tuple[str | None, dict]:
        t0 = time.perf_counter()
        fmt = ResultFormat.from_request(request)  # a format we cannot write: 422 before any model work
        prompt = self.parse_request(request)
        engine = self.engine()
        res, fields = self.answer(engine, prompt)
        t_write = time.perf_counter()
        out = self.write_result(res, fmt)
        now = time.perf_counter()
        timings = {**res.timings, "write": now - t_write, "request": now - t0}
        result = {
            **fields,
            "task": self.name,
            "model": self.model_name,
            "model_id": getattr(engine, "model_id", None),  # the weights that answered: their sha256
            "device": self.device,
            "timings": timings,
            "latencies": latencies(timings),
        }
        logger.info(f"{self.name}: {self.summary(prompt, result)}")
        return out, jsonable(result)
