"""`sam3d_auto`: MONAI Label's segmentation-type infer task over 3D-SAutoMed (sam3d.engine.auto): no prompt at all.

A request names only the image (and optionally `"order": "middle" | "top_down"`). The answer is one label
volume on the image's grid, every class the model knows, each voxel one class, with the names in
`label_names`; /info lists the same names as the task's labels (from the checkpoint when it is there, else
from the model config's preset), so Slicer and OHIF name the segments.

Weights, hot reload and errors are the base task's (`infer_base.Sam3DInferTask`), as for `sam3d_point`: 503
while the checkpoint is missing, 422 for an image the model cannot read, 404 for one that does not exist.
"""

import os
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType

from .infer_base import Sam3DInferTask, request_image


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


class Sam3DAutoInfer(Sam3DInferTask):
    """The whole volume -> every class, as one label volume on the image's grid (MONAI Label type `segmentation`)."""

    KIND = "auto"
    TYPE = InferType.SEGMENTATION  # clients run it without prompts ("Auto segmentation")

    def initial_labels(self) -> dict[str, int]:
        return {name: i + 1 for i, name in enumerate(model_class_names(self.model_config))}

    def how_to_set(self) -> str:
        key = f"{self.spec.conf_prefix}checkpoint"
        return (
            f"set the weights with `--conf {key} /path/to/autosam3d.safetensors` (trained with "
            f"configs/train/autosam3d.yaml) or put the file at the configured path; the next request picks it up"
        )

    def engine(self):
        engine = super().engine()
        self.labels = engine.label_names  # the weights that answer name the classes
        return engine

    def parse_request(self, request: dict) -> dict[str, Any]:
        image = request_image(request)
        order = request.get("order")
        from sam3d.engine.auto import ORDERS  # here: the app imports this module without torch work

        if order is not None and order not in ORDERS:
            raise HTTPException(
                status_code=422, detail=f"order must be {' or '.join(map(repr, ORDERS))}, got {order!r}"
            )
        return {"image": image, "order": order}

    def labelled(self, image: str, order: str | None = None):
        """This task's answer for `image` (cached by the engine): a SegmentResult whose mask is the label volume."""
        engine = self.engine()
        return self.run_engine(engine.segment, image, order=order)

    def answer(self, engine, prompt: dict) -> tuple[Any, dict]:
        res = self.run_engine(engine.segment, prompt["image"], order=prompt["order"])
        return res, {**res.info, "network": res.info.get("model")}

    def summary(self, prompt: dict, result: dict) -> str:
        return (
            f"{len(result['label_names'])} classes, order={result['order']}, cached={result.get('cached')} "
            f"total={result['timings']['request']:.3f}s"
        )
