"""`sam3d_text`: a structure's name in, its 3D mask out (RefSAM3D); clicks, when sent, refine the text's answer.

A request::

    {"image": <path>, "text": "left kidney", "foreground": [[i, j, k], ...], "background": [...]}
    {"image": <path>, "label": "spleen"}            # no "text": the label is the text (Slicer's label list)

No click is needed: the engine searches the whole image (`sam3d.engine.text_search`). Clicks that follow with the
same text refine the last answer. The answer is the point task's: a 0/1 volume on the image's grid (NIfTI, or the
format the request asks for: `result_format`) and JSON (the timings, the windows, `score`, the nearest trained name
and its similarity), with the segment named by the text.
Errors: 422 for an empty text, a `roi` (not used by this task), a point outside the image or an unreadable image;
404 for a missing image; 503 while the weights are missing; a text the model does not know answers an empty mask
with a low `score` and a `message`. The loading, hot reload and /info behaviour are the base task's
(`infer_base.Sam3DInferTask`).

Registered as kind `text` in configs/app.yaml (apps/sam3d/main.py maps the kind to this class). MONAI Label type
`deepgrow`, as the point task, so that Slicer's and OHIF's click tools can refine; a request without clicks (the
API, or a client that sends the label alone) runs the text search. Its option `text` (/info `config`) is a text box
in Slicer's and OHIF's options: OHIF's point prompts send no label name, the typed text names the structure.

OHIF's class prompts (its MONAI Label panel, model type `vista3d`)::

    {"image": <id>, "label_prompt": [5, 1]}                                   # Class Prompts: liver and spleen
    {"image": <id>, "label_prompt": [5], "points": [[i, j, k], ...], "point_labels": [1, 0, ...]}   # Point Prompts

`label_prompt` holds label values of the task's labels (or their names); the answer is one label volume with each
class at its value (what the panel maps back to its segments), at most MAX_CLASS_PROMPTS classes a request. The
panel lists only `segmentation` and `vista3d` models under Class Prompts and Slicer only `segmentation` and
`deepgrow`: `Sam3DTextClassPrompts` (`<task>_classes`, type `vista3d`, the same engine) shows the text task there.
"""

import time
from dataclasses import replace
from typing import Any

import numpy as np
from fastapi import HTTPException

from .app_config import DEFAULT_LABEL
from .infer_base import Sam3DInferTask, click_summary, clicked_fields, request_image, request_points

MAX_CLASS_PROMPTS = 8  # one whole-image text search each: OHIF's Auto tab would send every class at once
VISTA3D = "vista3d"  # the OHIF panel's model type for class prompts


class Sam3DTextInfer(Sam3DInferTask):
    """A name (`text`, else `label`) and optional clicks -> one structure, as a 0/1 label volume on the image's grid;
    OHIF's class prompts (`label_prompt`) -> one label volume with each class at its value."""

    KIND = "text"  # MONAI Label type deepgrow, as the point task: Slicer's and OHIF's click tools can refine

    def options(self) -> dict[str, Any]:
        return {"text": ""}  # a text box in Slicer's and OHIF's options, sent as the request's `text`

    def companions(self) -> list[Sam3DInferTask]:
        return [Sam3DTextClassPrompts(self)]  # OHIF's Class Prompts tab lists only vista3d models

    def parse_request(self, request: dict) -> dict:
        """The request's text and clicks, or its class prompts, checked before any model work; HTTPException
        (422/404) when unusable."""
        classes = self.parse_class_prompt(request)
        if classes is not None:
            return classes
        image = request_image(request)
        if request.get("roi"):
            raise HTTPException(status_code=422, detail=f"{self.name} does not take a box (roi): send text and clicks")
        typed = request.get("text")
        text = typed if typed not in (None, "") else request.get("label")
        if not isinstance(text, str) or not text.strip():
            raise HTTPException(
                status_code=422,
                detail="no text: send 'text' with the structure's name (e.g. \"left kidney\") or a 'label' naming it "
                f"(OHIF: type it as the option `text` of {self.name}, or pick classes of {self.name}_classes under "
                "Class Prompts)",
            )
        if typed in (None, "") and self.strict_labels and self.labels and text not in self.labels:
            raise HTTPException(
                status_code=422,
                detail=f"unknown label {text!r}: {self.name} knows {', '.join(self.labels)} "
                f"(or type any structure's name as 'text')",
            )
        return {
            "image": image,
            "foreground": request_points(request.get("foreground"), "foreground"),
            "background": request_points(request.get("background"), "background"),
            "roi": None,
            "label": text.strip(),
        }

    def answer(self, engine, prompt: dict) -> tuple[Any, dict]:
        if "names" in prompt:
            return self.answer_classes(engine, prompt)
        res = self.run_engine(
            engine.segment_text, prompt["image"], prompt["label"], prompt["foreground"], prompt["background"]
        )
        return res, clicked_fields(res, prompt, self.checkpoint, {prompt["label"]: 1})

    def summary(self, prompt: dict, result: dict) -> str:
        if "names" in prompt:
            return f"classes {', '.join(prompt['names'])} total={result['timings']['request']:.3f}s"
        return click_summary(prompt, result)

    # ---- OHIF's class prompts ------------------------------------------------------------------------------------

    def parse_class_prompt(self, request: dict) -> dict | None:
        """OHIF's `label_prompt` (+ `points`, `point_labels`) as names and clicks; None for a request without it."""
        prompt = request.get("label_prompt")
        if prompt is None:
            return None
        image = request_image(request)
        by_value = {v: k for k, v in self.labels.items()}
        if isinstance(prompt, (int, str)) and not isinstance(prompt, bool):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise HTTPException(status_code=422, detail=f"label_prompt must be a list of label values, got {prompt!r}")
        names = []
        for v in prompt:
            if isinstance(v, str) and v in self.labels:
                name = v
            else:
                name = None if isinstance(v, bool) else by_value.get(v)
            if name is None:
                raise HTTPException(
                    status_code=422, detail=f"label_prompt: {v!r} is not a label of {self.name} (GET /info lists them)"
                )
            if name not in names:
                names.append(name)
        if len(names) > MAX_CLASS_PROMPTS:
            raise HTTPException(
                status_code=422,
                detail=f"{len(names)} classes: {self.name} searches at most "
                f"{MAX_CLASS_PROMPTS} at once (pick them under Class Prompts)",
            )
        points = request_points(request.get("points"), "points")
        point_labels = request.get("point_labels") or []
        if (
            not isinstance(point_labels, list)
            or len(point_labels) != len(points)
            or any(p not in (0, 1) or isinstance(p, bool) for p in point_labels)
        ):
            raise HTTPException(
                status_code=422, detail="point_labels must hold 1 (foreground) or 0 (background) for each of `points`"
            )
        fg = [p for p, lab in zip(points, point_labels) if lab == 1]
        bg = [p for p, lab in zip(points, point_labels) if lab == 0]
        fg += request_points(request.get("foreground"), "foreground")
        bg += request_points(request.get("background"), "background")
        if (fg or bg) and len(names) > 1:
            raise HTTPException(status_code=422, detail="clicks refine one class: send one label_prompt with points")
        return {"image": image, "names": names, "foreground": fg, "background": bg}

    def answer_classes(self, engine, classes: dict) -> tuple[Any, dict]:
        """Each class its own text search, at its label value; a voxel keeps the first class that has it."""
        t0 = time.perf_counter()
        labels, res, found = None, None, {}
        for name in classes["names"]:
            res = self.run_engine(
                engine.segment_text, classes["image"], name, classes["foreground"], classes["background"]
            )
            if labels is None:
                labels = np.zeros(res.mask.shape, np.uint8 if max(self.labels.values()) < 256 else np.uint16)
            labels[(res.mask > 0) & (labels == 0)] = self.labels[name]
            found[name] = {
                "voxels": int((res.mask > 0).sum()),
                "score": res.info.get("score"),
                "message": res.info.get("message"),
            }
        res = replace(res, mask=labels, timings={"search": time.perf_counter() - t0})
        return res, {"label_names": {n: self.labels[n] for n in classes["names"]}, "classes": found}


class Sam3DTextClassPrompts(Sam3DTextInfer):
    """The text task as OHIF's panel lists it under Class Prompts (and Point Prompts): type `vista3d`, the same
    engine and weights as `source` (nothing is loaded twice), labels without the generic `structure`."""

    TYPE = VISTA3D

    def __init__(self, source: Sam3DTextInfer):
        labels = {k: v for k, v in source.labels.items() if k != DEFAULT_LABEL and v != 255}  # OHIF skips 255
        spec = replace(
            source.spec,
            name=f"{source.name}_classes",
            labels=labels,
            description=f"{source.name} for OHIF's Class Prompts: tick structures, each is found by name",
        )
        self.source = source
        super().__init__(spec, device=source.device, strict_labels=source.strict_labels)

    def options(self) -> dict[str, Any]:
        return {}

    def companions(self) -> list[Sam3DInferTask]:
        return []

    def status(self) -> tuple[str, str]:
        return self.source.status()

    def engine(self):
        return self.source.engine()
