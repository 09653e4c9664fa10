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
with a low `score` and a `message`. The loading, hot reload and /info behaviour are `Sam3DPointInfer`'s.

Registered as kind `text` in configs/app.yaml (apps/sam3d/main.py maps the kind to this class). MONAI Label type
`deepgrow`, as the point task, so that Slicer's and OHIF's click tools can refine; a request without clicks (the
API, or a client that sends the label alone) runs the text search.
"""


from fastapi import HTTPException

from .app_config import TaskSpec
from .infer_point import Sam3DPointInfer, _points, request_image


class TextAsLabel:
    """The text engine behind the point task's request flow: `segment`'s `label` carries the text."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def segment(self, image_path, foreground, background, roi=None, label=""):
        return self.engine.segment_text(image_path, label, foreground, background)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def text_engine_factory(model_config: dict, device: str):
    """The model config's RefSAM3D network and weights, with its text tower, behind `TextAsLabel`."""
    from sam3d.engine.text_search import text_engine_from_config

    return TextAsLabel(text_engine_from_config(model_config, device=device))


class Sam3DTextInfer(Sam3DPointInfer):
    """A name (`text`, else `label`) and optional clicks -> one structure, as a 0/1 label volume on the image's grid."""

    def __init__(self, spec: TaskSpec, device: str = "auto", strict_labels: bool = True, preload: bool = False,
                 engine_factory=None):
        super().__init__(spec, device=device, strict_labels=strict_labels, preload=preload,
                         engine_factory=engine_factory or text_engine_factory)

    def parse_request(self, request: dict) -> dict:
        """The request's text and clicks, checked before any model work; HTTPException (422/404) when unusable."""
        image = request_image(request)
        if request.get("roi"):
            raise HTTPException(status_code=422, detail=f"{self.name} does not take a box (roi): send text and clicks")
        typed = request.get("text")
        text = typed if typed not in (None, "") else request.get("label")
        if not isinstance(text, str) or not text.strip():
            raise HTTPException(
                status_code=422,
                detail="no text: send 'text' with the structure's name (e.g. \"left kidney\") or a 'label' naming it",
            )
        if typed in (None, "") and self.strict_labels and self.labels and text not in self.labels:
            raise HTTPException(
                status_code=422,
                detail=f"unknown label {text!r}: {self.name} knows {', '.join(self.labels)} "
                f"(or type any structure's name as 'text')",
            )
        return {"image": image, "foreground": _points(request.get("foreground"), "foreground"),
                "background": _points(request.get("background"), "background"), "roi": None, "label": text.strip()}
