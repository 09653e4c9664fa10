"""`sam3d_point`: MONAI Label's interactive (deepgrow-type) infer task over the sam3d engine.

A request (what Slicer's and OHIF's MONAI Label clients send for a `deepgrow` model)::

    {"image": <path>, "foreground": [[i, j, k], ...], "background": [...], "roi": [i0, j0, i1, j1, k0, k1],
     "label": "liver"}

Indices address the array `monai.transforms.LoadImage` returns for the image. The answer is a 0/1 volume on the
image's grid (NIfTI .nii.gz, or the format the request asks for with `result_extension`, `result_dtype`,
`result_compress`: see `result_format`; a temporary file MONAI Label deletes once sent) and JSON with the timings, the windows, the model
and the checkpoint. With `"prior": "<automatic task>"` the clicks refine the class `label` of that task's answer
(its mask is the previous one) and the answer is that task's label volume with the class replaced.

Errors reach the client as HTTP errors with a message meant for the user (MONAI Label turns any other exception
into a bare 500): 422 for a request the model cannot answer (no prompt, a point outside the image, an unknown
label, an unreadable or 2D image), 404 for an image that does not exist, 503 while the weights are missing.
The weights load on the first request (or in the background at start-up with `preload`); a missing checkpoint
never stops the server: the task stays listed in /info and says what to set. When the checkpoint file changes
on disk (a training run replaced it), the next request loads the new weights.
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
from .app_config import DEFAULT_LABEL, TaskSpec
from .result_format import ResultFormat

logger = logging.getLogger(__name__)

EngineFactory = Callable[[dict, str], Any]  # (model_config, device) -> an engine (sam3d.engine.InteractiveEngine)


def default_engine_factory(model_config: dict, device: str):
    """The model config's network and weights, served by an `InteractiveEngine` on `device`."""
    from sam3d.engine import EngineConfig, InteractiveEngine, load_model

    loaded = load_model(model_config)  # checkpoint paths are absolute here (see app_config)
    return InteractiveEngine(loaded, EngineConfig.from_dict(model_config), device=device)


def request_image(request: dict) -> str:
    """The request's image path (MONAI Label has resolved the datastore id); HTTPException 422/404 when unusable."""
    image = request.get("image")
    if not isinstance(image, str) or not image:
        raise HTTPException(status_code=422, detail="no image: give an image id of the datastore or upload a file")
    if not os.path.exists(image):
        raise HTTPException(status_code=404, detail=f"image not found: {image}")
    return image


def write_label_file(result, task_name: str, fmt: ResultFormat | None = None) -> str:
    """The answer as a temporary file in the format the client asked for (`fmt`, default NIfTI .nii.gz); MONAI
    Label sends it, then deletes it; nothing is left if writing fails. Every task answers through here."""
    return (fmt or ResultFormat()).write(result.mask, result.affine, prefix=f"{task_name}_")


def resolve_device(device: str | None) -> tuple[str, str | None]:
    """(device, error): auto -> cuda when available, else cpu; an unusable device is an error for /info."""
    import torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        return ("cuda" if torch.cuda.is_available() else "cpu"), None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return device, f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)"
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        return device, f"device {device!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)"
    return device, None


def _input_error_types() -> tuple[type[BaseException], ...]:
    from sam3d.engine import Sam3DInputError

    return (Sam3DInputError,)


def _weights_missing_types() -> tuple[type[BaseException], ...]:
    from sam3d.engine import WeightsMissingError

    return (WeightsMissingError,)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _points(value, name: str) -> list[list[float]]:
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


def replace_class(auto, refined, name: str):
    """`auto` (a label volume result) with class `name` set to the voxels of `refined` (a 0/1 result): the class
    takes what the clicks gave it, from the background or from another class; no other voxel changes."""
    from dataclasses import replace

    value = auto.info["label_names"][name]
    labels = auto.mask.copy()
    labels[labels == value] = 0
    labels[refined.mask > 0] = value
    return replace(refined, mask=labels)


MAX_LABEL_CHARS = 128


class Sam3DPointInfer(InferTask):
    """Clicks (and an optional box) -> one structure, as a 0/1 label volume on the image's grid."""

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
        self._engine_factory = engine_factory or default_engine_factory
        self._engine = None
        self._engine_stamp = None  # (path, mtime_ns, size) of the checkpoint the engine holds
        self._failure: tuple[Any, str] | None = None  # (stamp, message) of the last failed load
        self._lock = threading.Lock()
        self.prior_sources: dict[str, Any] = {}  # name -> automatic task whose answer a request may refine (`prior`)
        super().__init__(
            type=InferType.DEEPGROW,  # Slicer and OHIF offer foreground/background click tools for it
            labels=dict(spec.labels),
            dimension=3,
            description=spec.description,
            config={},
        )
        if preload and self.status()[0] == "not_loaded":
            threading.Thread(target=self._preload, name=f"preload-{spec.name}", daemon=True).start()

    # ---- what /info shows --------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def checkpoint(self) -> str | None:
        return self.model_config.get("checkpoint")

    @property
    def uses_factory(self) -> bool:
        return bool(self.model_config.get("factory"))

    def _how_to_set(self) -> str:
        key = f"{self.spec.conf_prefix}checkpoint"
        fetch = weights_registry.how_to_fetch(self.model_config)  # published weights (`--conf weights NAME`)
        if fetch:
            return f"{fetch} (or set `--conf {key} /path/to/weights`); the next request picks them up"
        return (
            f"set the weights with `--conf {key} /path/to/weights` (.safetensors or SAM-Med3D .pth) "
            f"or put the file at the configured path; the next request picks it up"
        )

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
                return "weights_missing", f"weights missing: no checkpoint configured; {self._how_to_set()}"
            if not os.path.isfile(ckpt):
                return "weights_missing", f"weights missing: checkpoint not found: {ckpt}; {self._how_to_set()}"
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

    # ---- the engine ----------------------------------------------------------------------------------------------

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
                engine = self._engine_factory(self.model_config, self.device)
            except _weights_missing_types() as e:
                raise self._unavailable(503, f"weights missing: {e}; {self._how_to_set()}") from e
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

    # ---- one request ---------------------------------------------------------------------------------------------

    def default_label(self) -> str:
        if DEFAULT_LABEL in self.labels or not self.labels:
            return DEFAULT_LABEL
        return next(iter(self.labels))

    def parse_request(self, request: dict) -> dict[str, Any]:
        """The prompt of a request, checked before any model work; HTTPException (422/404) when unusable."""
        image = request_image(request)

        fg = _points(request.get("foreground"), "foreground")
        bg = _points(request.get("background"), "background")
        roi = request.get("roi")
        if roi is not None and not isinstance(roi, (list, tuple)):
            raise HTTPException(status_code=422, detail=f"roi must be [i0, j0, i1, j1, k0, k1], got {roi!r}")
        roi = list(roi) if roi else None
        if not fg and not bg and roi is None:
            raise HTTPException(
                status_code=422,
                detail="no prompt: send at least one foreground click ('foreground': [[i, j, k]]) or a box ('roi')",
            )

        label = request.get("label")
        prior = request.get("prior")
        if prior is not None:  # refine one class of an automatic task's answer: the label names that class
            if not isinstance(prior, str) or prior not in self.prior_sources:
                known = ", ".join(self.prior_sources) or "none in this app"
                raise HTTPException(status_code=422, detail=f"prior must name an automatic task ({known}), got {prior!r}")
            classes = self.prior_sources[prior].labels
            if label not in classes:
                raise HTTPException(status_code=422, detail=f"label {label!r} is not a class of {prior}: "
                                    f"name one of {', '.join(classes)}")
            return {"image": image, "foreground": fg, "background": bg, "roi": roi, "label": label, "prior": prior}
        if label is None or label == "":
            label = self.default_label()
        # class-agnostic: any name is what the new mask is called; the configured labels are suggestions
        if not isinstance(label, str) or len(label) > MAX_LABEL_CHARS or not label.isprintable():
            raise HTTPException(status_code=422, detail=f"label must be a structure name (printable text of at most "
                                f"{MAX_LABEL_CHARS} characters), got {str(label)[:MAX_LABEL_CHARS]!r}")
        return {"image": image, "foreground": fg, "background": bg, "roi": roi, "label": label}

    def __call__(self, request) -> tuple[str | None, dict]:
        t0 = time.perf_counter()
        fmt = ResultFormat.from_request(request)
        prompt = self.parse_request(request)
        engine = self.engine()
        prior = prompt.get("prior")
        auto = self.prior_sources[prior].labelled(prompt["image"]) if prior else None
        extra = {} if auto is None else {"prior": auto.mask == auto.info["label_names"][prompt["label"]]}
        try:
            res = engine.segment(
                prompt["image"], prompt["foreground"], prompt["background"], roi=prompt["roi"], label=prompt["label"],
                **extra,
            )
        except _input_error_types() as e:
            raise HTTPException(status_code=422, detail=str(e)) from e
        label_names = {prompt["label"]: 1}
        if auto is not None:  # the automatic answer with the clicked class replaced: the other classes stay
            res, label_names = replace_class(auto, res, prompt["label"]), auto.info["label_names"]

        t_write = time.perf_counter()
        out = write_label_file(res, self.name, fmt)
        now = time.perf_counter()

        timings = dict(res.timings)
        timings["write"] = now - t_write
        timings["request"] = now - t0
        result = dict(res.info)
        result.update(
            {
                "task": self.name,
                "model": self.model_name,
                "network": res.info.get("model"),
                "checkpoint": res.info.get("checkpoint", self.checkpoint),
                "model_id": getattr(engine, "model_id", None),  # the weights that answered: their sha256
                "device": self.device,
                "label": prompt["label"],
                "label_names": label_names,
                "prior": prior,
                "timings": timings,
                # MONAI Label's usual latency report, for clients that show it
                "latencies": {
                    "pre": round(timings.get("load", 0.0), 4),
                    "infer": round(timings.get("encode", 0.0) + timings.get("decode", 0.0), 4),
                    "invert": round(timings.get("resample", 0.0), 4),
                    "post": 0.0,
                    "write": round(timings["write"], 4),
                    "total": round(timings["request"], 4),
                    "transform": None,
                },
            }
        )
        logger.info(
            f"{self.name}: {prompt['label']} fg={len(prompt['foreground'])} bg={len(prompt['background'])} "
            f"roi={prompt['roi'] is not None} cached={result.get('embedding_cached')} total={timings['request']:.3f}s"
        )
        return out, _jsonable(result)
