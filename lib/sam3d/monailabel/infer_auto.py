"""`sam3d_auto`: MONAI Label's segmentation-type infer task over 3D-SAutoMed (sam3d.engine.auto): no prompt at all.

A request names only the image (and optionally `"order": "middle" | "top_down"`). The answer is one label
volume on the image's grid, every class the model knows, each voxel one class, with the names in
`label_names`; /info lists the same names as the task's labels (from the checkpoint when it is there, else
from the model config's preset), so Slicer and OHIF name the segments.

Weights, hot reload and errors work as for `sam3d_point` (it is the same task machinery): 503 while the
checkpoint is missing, 422 for an image the model cannot read, 404 for one that does not exist.
"""

import logging
import os
import time
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType

from .app_config import TaskSpec
from .result_format import ResultFormat
from .infer_point import (
    EngineFactory,
    Sam3DPointInfer,
    _input_error_types,
    _jsonable,
    request_image,
    write_label_file,
)

logger = logging.getLogger(__name__)


def default_auto_engine_factory(model_config: dict, device: str):
    """The model config's network and weights, served by an `AutoEngine` on `device`."""
    from sam3d.engine.auto import auto_engine_from_config  # here: the app imports this module without torch work

    return auto_engine_from_config(model_config, device)


def model_class_names(model_config: dict) -> list[str]:
    """The classes the configured model segments: the checkpoint's own (it carries its network), else the preset's."""
    from sam3d.engine.checkpoint import saved_config
    from sam3d.models import AUTOSAM3D_PRESETS

    network = dict(model_config.get("network") or {})
    preset = model_config.get("preset")
    ckpt = model_config.get("checkpoint")
    if ckpt and os.path.isfile(ckpt):
        try:
            saved = saved_config(ckpt) or {}
        except ValueError:  # an unreadable file: loading will say so; the names fall back to the config
            saved = {}
        preset, network = saved.get("preset", preset), saved.get("network") or network
    if network.get("class_names"):
        return list(network["class_names"])
    return list(AUTOSAM3D_PRESETS[preset].class_names) if preset in AUTOSAM3D_PRESETS else []


class Sam3DAutoInfer(Sam3DPointInfer):
    """The whole volume -> every class, as one label volume on the image's grid (MONAI Label type `segmentation`)."""

    def __init__(self, spec: TaskSpec, device: str = "auto", strict_labels: bool = True, preload: bool = False,
                 engine_factory: EngineFactory | None = None):
        super().__init__(spec, device=device, strict_labels=strict_labels, preload=preload,
                         engine_factory=engine_factory or default_auto_engine_factory)
        self.type = InferType.SEGMENTATION  # clients run it without prompts ("Auto segmentation")
        self.labels = {name: i + 1 for i, name in enumerate(model_class_names(self.model_config))}

    def _how_to_set(self) -> str:
        key = f"{self.spec.conf_prefix}checkpoint"
        return (f"set the weights with `--conf {key} /path/to/autosam3d.safetensors` (trained with "
                f"configs/train/autosam3d.yaml) or put the file at the configured path; the next request picks it up")

    def engine(self):
        engine = super().engine()
        self.labels = engine.label_names  # the weights that answer name the classes
        return engine

    def parse_request(self, request: dict) -> dict[str, Any]:
        image = request_image(request)
        order = request.get("order")
        from sam3d.engine.auto import ORDERS  # here: the app imports this module without torch work

        if order is not None and order not in ORDERS:
            raise HTTPException(status_code=422, detail=f"order must be {' or '.join(map(repr, ORDERS))}, got {order!r}")
        return {"image": image, "order": order}

    def labelled(self, image: str, order: str | None = None):
        """This task's answer for `image` (cached by the engine): a SegmentResult whose mask is the label volume."""
        engine = self.engine()
        try:
            return engine.segment(image, order=order)
        except _input_error_types() as e:
            raise HTTPException(status_code=422, detail=str(e)) from e

    def __call__(self, request) -> tuple[str | None, dict]:
        t0 = time.perf_counter()
        fmt = ResultFormat.from_request(request)
        req = self.parse_request(request)
        engine = self.engine()
        res = self.labelled(req["image"], req["order"])
        t_write = time.perf_counter()
        out = write_label_file(res, self.name, fmt)
        now = time.perf_counter()
        timings = {**res.timings, "write": now - t_write, "request": now - t0}
        result = {**res.info, "task": self.name, "model": self.model_name, "network": res.info.get("model"),
                  "model_id": getattr(engine, "model_id", None), "device": self.device, "timings": timings}
        logger.info(f"{self.name}: {len(res.info['label_names'])} classes, order={res.info['order']}, "
                    f"cached={res.info.get('cached')} total={timings['request']:.3f}s")
        return out, _jsonable(result)
