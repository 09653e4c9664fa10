"""What the evaluation runs: anything with `segment(image_path, foreground, background, roi, label) -> mask`.

Every call carries all prompts so far (as MONAI Label clients resend every click), and the answer is a 0/1 mask
on the image's own grid (the array `monai.transforms.LoadImage` returns). Three implementations:

- `PredictorSegmenter`: the library, `sam3d.Sam3DPredictor` (point, text and automatic models);
- `RandomWalkerSegmenter` (baseline.py): no learned weights;
- `ServerSegmenter`: a running sam3d MONAI Label server through MONAI Label's client (with the API token when
  `SAM3D_API_TOKEN` is set), so that what users get through the server is what is measured. Only this class
  imports MONAI Label, and only when it is built.
"""

import logging
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..data.cases import Case, load_array

logger = logging.getLogger(__name__)


@runtime_checkable
class Segmenter(Protocol):
    name: str

    def segment(self, image_path: str, foreground: list, background: list, roi: list | None, label: str) -> np.ndarray:
        """A 0/1 mask on the image's grid for all the prompts so far."""

    def describe(self) -> dict:
        """What to print about it in the summary (model, checkpoint, parameters)."""


# ---- the library ----------------------------------------------------------------------------------------------


class PredictorSegmenter:
    """The sam3d library through `sam3d.Sam3DPredictor`, as a Python user calls it: clicks and a box for point
    models (each call continues from the previous mask when its clicks extend the last call's); for text models
    in the `text` protocol the structure's name first (the case's label name, e.g. `kidney_left`, which the engine
    turns into "left kidney"), then clicks; for automatic models the class named like the structure (prompts are
    not used: every iteration gives the same answer, the engine caches it per image)."""

    def __init__(self, predictor, name: str | None = None, read_text: bool = False) -> None:
        self.predictor, self.read_text = predictor, read_text
        self.name = name or predictor.engine.model_name
        self._image: str | None = None

    @classmethod
    def from_config(
        cls, model_config: dict, device: str = "cpu", name: str | None = None, protocol: str = "center"
    ) -> "PredictorSegmenter":
        """Raises `sam3d.engine.WeightsMissingError` when the checkpoint is not set or not there."""
        from ..predictor import Sam3DPredictor

        predictor = Sam3DPredictor.from_config(model_config, device=device)
        read_text = protocol == "text" and predictor.kind == "text"
        return cls(predictor, name or model_config.get("name"), read_text=read_text)

    @property
    def engine(self):
        return self.predictor.engine

    def describe(self) -> dict:
        e, kind = self.engine, self.predictor.kind
        out = {
            "method": f"sam3d {kind} model through Sam3DPredictor, network {e.model_name}",
            "checkpoint": e.checkpoint,
            "checkpoint sha256": e.model_id if e.checkpoint else None,
            "device": str(e.device),
        }
        if self.read_text:
            out["text model"] = e.text_encoder.name
        if kind == "auto":
            out.update({"order": e.order, "classes": ", ".join(e.class_names)})
        return out

    def segment(self, image_path, foreground, background, roi, label, prior=None) -> np.ndarray:
        """`prior`: a 0/1 mask the first click of a sequence refines (point models)."""
        p = self.predictor
        if self._image != str(image_path):
            p.set_image(str(image_path))
            self._image = str(image_path)
        if p.kind == "auto":
            volume, classes = p.segment_all()
            value = classes.get(label)
            return (volume == value).astype(np.uint8) if value else np.zeros_like(volume, dtype=np.uint8)
        points = [*foreground, *background]
        box = None if roi is None else [roi[0], roi[1], roi[4], roi[2], roi[3], roi[5]]  # MONAI Label's roi order
        mask, _ = p.predict(
            points=points,
            point_labels=[1] * len(foreground) + [0] * len(background),
            box=box,
            mask_input=prior,
            text=label if self.read_text else None,
            label=label,
        )
        return mask


def segmenter_from_config(model_config: dict, device: str = "cpu", name: str | None = None, protocol: str = "center"):
    """The harness's view of a model config (see `PredictorSegmenter`)."""
    return PredictorSegmenter.from_config(model_config, device=device, name=name, protocol=protocol)


class ClicksOnlySegmenter:
    """A method that cannot read text, in the `text` protocol: an empty mask until the first click."""

    def __init__(self, inner) -> None:
        self.inner, self.name = inner, inner.name

    def describe(self) -> dict:
        return {**self.inner.describe(), "text": "not understood: empty mask before the first click"}

    def segment(self, image_path, foreground, background, roi, label) -> np.ndarray:
        if not len(foreground) and not len(background) and roi is None:
            return np.zeros(load_array(image_path)[0].squeeze().shape, dtype=np.uint8)
        return self.inner.segment(image_path, foreground, background, roi, label)


# ---- a running server ----------------------------------------------------------------------------------------


class ServerSegmenter:
    """A sam3d MONAI Label server's infer task, through `MONAILabelClient` (`Sam3DClient`: the API token too).

    Each case's image is used from the datastore when an image with the case's name (`image_prefix` + case)
    is already there, and uploaded under that id otherwise (`upload="missing"`, the default); `upload="always"`
    uploads every time, `"never"` requires the image to be there. A DICOM folder is uploaded as a NIfTI written
    from the LoadImage array and affine, so that the server's indices are the same. The structure's name is
    sent as `label` when the task declares it, otherwise `fallback_label`; with `send_text` (protocol `text`) it is also
    sent as `text`, the prompt of a `sam3d_text` task.
    """

    def __init__(
        self,
        url: str,
        model: str = "sam3d_point",
        upload: str = "missing",
        image_prefix: str = "",
        fallback_label: str = "structure",
        tmpdir: str | None = None,
        send_text: bool = False,
    ) -> None:
        from ..monailabel.api_client import Sam3DClient

        if upload not in ("missing", "always", "never"):
            raise ValueError("upload must be missing, always or never")
        self.url, self.model, self.upload, self.image_prefix = url, model, upload, image_prefix
        self.fallback_label = fallback_label
        self.send_text = send_text  # protocol `text`: the structure's name also goes as `text` (sam3d_text)
        self._tmp = tempfile.TemporaryDirectory(prefix="sam3d-eval-", dir=tmpdir)
        self.client = Sam3DClient(url, tmpdir=self._tmp.name)  # the API token when SAM3D_API_TOKEN is set
        info = self.client.info()
        models = info.get("models", {})
        if model not in models:
            raise ValueError(f"server {url} has no model {model!r}; it has {sorted(models)}")
        self.task_info = models[model]
        self.labels = set(self.task_info.get("labels") or {})
        self.name = f"server:{model}"
        self._ids: dict[str, str] = {}

    def describe(self) -> dict:
        s = self.task_info.get("sam3d") or {}
        return {
            "method": f"MONAI Label server {self.url}, task {self.model}",
            "description": self.task_info.get("description"),
            "server status": s.get("status"),
        }

    def _datastore_ids(self) -> dict:
        try:
            return self.client.datastore().get("objects", {}) or {}
        except Exception as e:  # noqa: BLE001 - the datastore listing is optional help, uploads still work
            logger.warning(f"cannot list the server's datastore ({e}); uploading")
            return {}

    def prepare(self, case: Case) -> None:
        image_id = f"{self.image_prefix}{case.name}"
        path = Path(case.image)
        if self.upload != "always":
            known = self._datastore_ids()
            if image_id in known:
                self._ids[str(path)] = image_id
                return
            if self.upload == "never":
                raise ValueError(f"image {image_id!r} is not in the server's datastore (upload='never')")
        if path.is_dir() or not path.name.endswith((".nii.gz", ".nii")):
            # a DICOM series or another format (the datastore takes NIfTI only): the LoadImage array as NIfTI,
            # the same indices on the server
            import nibabel as nib

            arr, affine = load_array(path)
            upload = Path(self._tmp.name) / f"{image_id}.nii.gz"
            nib.save(nib.Nifti1Image(np.squeeze(arr), affine), str(upload))
        else:
            upload = path
        self.client.upload_image(str(upload), image_id=image_id)
        self._ids[str(path)] = image_id

    def segment(self, image_path, foreground, background, roi, label) -> np.ndarray:
        import nibabel as nib

        image_id = self._ids.get(str(image_path))
        if image_id is None:
            raise RuntimeError(f"{image_path} was not prepared (call prepare(case) first)")
        params = {
            "foreground": [list(map(int, p)) for p in foreground],
            "background": [list(map(int, p)) for p in background],
            "label": label if label in self.labels or not self.labels else self.fallback_label,
        }
        if roi is not None:
            params["roi"] = [int(v) for v in roi]
        if self.send_text:
            params["text"] = label
        result, _ = self.client.infer(self.model, image_id, params)
        try:
            return (np.asarray(nib.load(result).dataobj) > 0).astype(np.uint8)
        finally:
            if result:
                Path(result).unlink(missing_ok=True)

    def close(self) -> None:
        self._tmp.cleanup()
