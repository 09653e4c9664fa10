"""`sam3d_point`: MONAI Label's interactive (deepgrow-type) infer task over the sam3d engine.

A request (what Slicer's and OHIF's MONAI Label clients send for a `deepgrow` model)::

    {"image": <path>, "foreground": [[i, j, k], ...], "background": [...], "roi": [i0, j0, i1, j1, k0, k1],
     "label": "liver"}

Indices address the array `monai.transforms.LoadImage` returns for the image. The answer is a 0/1 volume on the
image's grid (NIfTI .nii.gz, or the format the request asks for with `result_extension`, `result_dtype`,
`result_compress`: see `result_format`; a temporary file MONAI Label deletes once sent) and JSON with the
timings, the windows, the model and the checkpoint. With `"prior": "<automatic task>"` the clicks refine the
class `label` of that task's answer (its mask is the previous one) and the answer is that task's label volume
with the class replaced.

Errors: 422 for a request the model cannot answer (no prompt, a point outside the image, a label that is not
a name, an unreadable or 2D image), 404 for an image that does not exist, 503 while the weights are missing. The
weights' loading, hot reload, errors and the answer's file are the base task's (`infer_base.Sam3DInferTask`).
"""

from dataclasses import replace
from typing import Any

from fastapi import HTTPException

from .app_config import DEFAULT_LABEL
from .infer_base import MAX_LABEL_CHARS, Sam3DInferTask, click_summary, clicked_fields, request_image, request_points


def replace_class(auto, refined, name: str):
    """`auto` (a label volume result) with class `name` set to the voxels of `refined` (a 0/1 result): the class
    takes what the clicks gave it, from the background or from another class; no other voxel changes."""
    value = auto.info["label_names"][name]
    labels = auto.mask.copy()
    labels[labels == value] = 0
    labels[refined.mask > 0] = value
    return replace(refined, mask=labels)


class Sam3DPointInfer(Sam3DInferTask):
    """Clicks (and an optional box) -> one structure, as a 0/1 label volume on the image's grid."""

    KIND = "point"  # Slicer and OHIF offer foreground/background click tools for MONAI Label's type deepgrow

    def __init__(self, *args, **kwargs):
        self.prior_sources: dict[str, Any] = {}  # name -> automatic task whose answer a request may refine (`prior`)
        super().__init__(*args, **kwargs)

    def connect(self, tasks: dict) -> None:
        """The app's automatic tasks: a click request may refine one class of their answer (`prior`)."""
        self.prior_sources = {name: t for name, t in tasks.items() if t.KIND == "auto"}

    def default_label(self) -> str:
        if DEFAULT_LABEL in self.labels or not self.labels:
            return DEFAULT_LABEL
        return next(iter(self.labels))

    def parse_request(self, request: dict) -> dict[str, Any]:
        """The prompt of a request, checked before any model work; HTTPException (422/404) when unusable."""
        image = request_image(request)

        fg = request_points(request.get("foreground"), "foreground")
        bg = request_points(request.get("background"), "background")
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
                raise HTTPException(
                    status_code=422, detail=f"prior must name an automatic task ({known}), got {prior!r}"
                )
            classes = self.prior_sources[prior].labels
            if label not in classes:
                raise HTTPException(
                    status_code=422,
                    detail=f"label {label!r} is not a class of {prior}: name one of {', '.join(classes)}",
                )
            return {"image": image, "foreground": fg, "background": bg, "roi": roi, "label": label, "prior": prior}
        if label is None or label == "":
            label = self.default_label()
        # class-agnostic: any name is what the new mask is called; the configured labels are suggestions
        if not isinstance(label, str) or len(label) > MAX_LABEL_CHARS or not label.isprintable():
            raise HTTPException(
                status_code=422,
                detail=f"label must be a structure name (printable text of at most "
                f"{MAX_LABEL_CHARS} characters), got {str(label)[:MAX_LABEL_CHARS]!r}",
            )
        return {"image": image, "foreground": fg, "background": bg, "roi": roi, "label": label}

    def answer(self, engine, prompt: dict) -> tuple[Any, dict]:
        prior = prompt.get("prior")
        auto = self.prior_sources[prior].labelled(prompt["image"]) if prior else None
        extra = {} if auto is None else {"prior": auto.mask == auto.info["label_names"][prompt["label"]]}
        res = self.run_engine(
            engine.segment,
            prompt["image"],
            prompt["foreground"],
            prompt["background"],
            roi=prompt["roi"],
            label=prompt["label"],
            **extra,
        )
        label_names = {prompt["label"]: 1}
        if auto is not None:  # the automatic answer with the clicked class replaced: the other classes stay
            res, label_names = replace_class(auto, res, prompt["label"]), auto.info["label_names"]
        return res, clicked_fields(res, prompt, self.checkpoint, label_names, prior)

    def summary(self, prompt: dict, result: dict) -> str:
        return click_summary(prompt, result)
