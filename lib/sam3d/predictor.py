"""`Sam3DPredictor`: the front door for Python users, as segment-anything's `SamPredictor` is for SAM.

    from sam3d import Sam3DPredictor
    predictor = Sam3DPredictor.from_pretrained("clicknet")          # a model config name, a YAML, or a checkpoint
    predictor.set_image("ct.nii.gz")                                 # or a numpy array (X, Y, Z) and its affine
    mask, scores = predictor.predict(points=[[60, 50, 56]], point_labels=[1])
    mask, scores = predictor.predict(points=[[60, 50, 56], [70, 40, 50]], point_labels=[1, 0])   # a correction

Conventions:
- Points are voxel indices (i, j, k) of the image array: the array given to `set_image`, or for a file the array
  `monai.transforms.LoadImage` returns (nibabel's data array for NIfTI), which is what Slicer and OHIF send.
  `point_labels`: 1 foreground, 0 background. `box`: inclusive corners (i0, j0, k0, i1, j1, k1).
- Masks come back as uint8 0/1 on the image's own grid, shape (X, Y, Z) (auto models: one label value per class).
- The previous mask is held by the predictor, per `label`: give every click so far on each call (as Slicer does);
  when they extend the last call's clicks, the network refines its last answer, otherwise it starts afresh.
  `mask_input` (a 0/1 mask on the image's grid) starts a new click sequence from that mask instead. `reset()`
  forgets the previous masks.
- Each model kind answers its own prompts: point models clicks and boxes, text models a name (`text`) and then
  clicks (or clicks alone, as a point model), auto models `segment_all()`. Anything else is refused with the
  reason (`ValueError`).
"""

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from .engine.checkpoint import configured_kind, saved_config
from .engine.interactive import point_engine_from_config
from .engine.model_config import load_model_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the project's configs (an editable install)


def _text_engine(model_config: dict, device: str):
    # the text tower's imports only when asked for
    if model_config.get("classes_from"):
        from .engine.named_class import named_class_engine_from_config

        return named_class_engine_from_config(model_config, device)
    from .engine.text_search import text_engine_from_config

    return text_engine_from_config(model_config, device)


def _auto_engine(model_config: dict, device: str):
    from .engine.auto import auto_engine_from_config

    return auto_engine_from_config(model_config, device)


# the engine of each model kind
ENGINES = {"point": point_engine_from_config, "text": _text_engine, "auto": _auto_engine}


def load_engine(model_config: dict, device: str = "cpu", kind: str | None = None):
    """The engine that serves a model config's network and weights: an `InteractiveEngine` (point), `TextEngine` or
    `NamedClassEngine` (text) or `AutoEngine` (auto), by `kind` or else the kind its checkpoint or preset declares. What
    `Sam3DPredictor` and the MONAI Label tasks load; raises `WeightsMissingError` without weights."""
    kind = kind or configured_kind(model_config)
    return ENGINES[kind](model_config, device)


def _config_for_checkpoint(path: Path, configs_dir: Path) -> dict:
    """A bare checkpoint: the model config of its preset (for spacing and intensities), pointing at the file."""
    preset = (saved_config(path) or {}).get("preset", "sam_med3d_turbo")
    for yaml_path in sorted((configs_dir / "models").glob("*.yaml")):
        cfg = load_model_config(str(yaml_path), configs_dir, checkpoint=str(path))
        if cfg.get("preset") == preset:
            return cfg
    return {"name": path.stem, "preset": preset, "checkpoint": str(path.resolve())}


class Sam3DPredictor:
    """One model, one image at a time; see the module's docstring for the conventions."""

    def __init__(self, engine, kind: str, model_config: dict) -> None:
        self.engine, self.kind, self.model_config = engine, kind, model_config
        self._tmp = tempfile.TemporaryDirectory(prefix="sam3d-predictor-")
        self._image: str | None = None
        self._count = 0

    @classmethod
    def from_pretrained(
        cls, name_or_path: str = "clicknet", device: str = "cpu", configs_dir: str | Path | None = None
    ) -> "Sam3DPredictor":
        """A model config name (`configs/models/<name>.yaml`), a model config YAML, or a checkpoint file
        (`.safetensors` of ours, SAM-Med3D's `.pth`). Raises `sam3d.engine.WeightsMissingError` without weights."""
        configs_dir = Path(configs_dir) if configs_dir else CONFIGS
        path = Path(str(name_or_path)).expanduser()
        if path.suffix in (".safetensors", ".pth", ".pt") and path.is_file():
            cfg = _config_for_checkpoint(path, configs_dir)
        else:
            cfg = load_model_config(str(name_or_path), configs_dir)
        return cls.from_config(cfg, device)

    @classmethod
    def from_config(cls, model_config: dict, device: str = "cpu") -> "Sam3DPredictor":
        """A model config already read (`sam3d.engine.model_config.load_model_config`)."""
        kind = configured_kind(model_config)
        return cls(load_engine(model_config, device, kind), kind, model_config)

    # ---- the image --------------------------------------------------------------------------------------------

    def set_image(self, image, affine=None) -> None:
        """An image file (NIfTI, NRRD, ...; a DICOM folder) or a 3D numpy array with its 4x4 affine (voxel -> RAS mm;
        default: 1 mm voxels). The image is loaded and resampled once; later predictions reuse it."""
        if isinstance(image, (str, Path)):
            if affine is not None:
                raise ValueError("affine applies to an array; a file carries its own")
            self._image = str(image)
        else:
            array = np.asarray(image)
            if array.ndim != 3:
                raise ValueError(f"expected a 3D array (X, Y, Z), got shape {array.shape}")
            if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
                raise ValueError(f"expected a real-valued array, got dtype {array.dtype}")
            affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
            if affine.shape != (4, 4):
                raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
            self._count += 1  # a new file per image: the engine's caches key on the file
            path = Path(self._tmp.name) / f"image_{self._count}.nii.gz"
            nib.save(nib.Nifti1Image(array.astype(np.float32), affine), str(path))
            self._image = str(path)
        self.reset()

    def reset(self) -> None:
        """Forget the previous masks: the next prediction starts afresh."""
        states = getattr(self.engine, "_states", None)
        if states is not None:
            with self.engine._lock:
                states.clear()

    def _require_image(self) -> str:
        if self._image is None:
            raise ValueError("no image: call set_image first")
        return self._image

    # ---- prompts ----------------------------------------------------------------------------------------------

    def predict(
        self,
        points=None,
        point_labels=None,
        box=None,
        mask_input=None,
        text: str | None = None,
        multimask: bool = False,
        label: str = "structure",
    ) -> tuple[np.ndarray, np.ndarray]:
        """(mask (X, Y, Z) uint8, scores (1,)): the structure at the prompts, on the image's grid.

        points (N, 3) voxel indices with point_labels (N,) 1/0; box (6,) inclusive corners; mask_input a 0/1 mask
        to refine; text a structure's name (text models). `label` keeps separate click sequences apart.
        """
        image = self._require_image()
        if multimask:
            raise ValueError("multimask: this model answers one mask per prompt")
        if self.kind == "auto":
            raise ValueError("this is an automatic model: it takes no prompt; call segment_all()")
        fg, bg = self._split_points(points, point_labels)
        if text is not None:
            if self.kind != "text":
                raise ValueError("this click model does not read text; load a text model (e.g. refsam3d)")
            if box is not None or mask_input is not None:
                raise ValueError("a text model takes a name and clicks, not a box or a mask")
            res = self.engine.segment_text(image, text, fg, bg)
            return res.mask, np.array([res.info.get("score", 0.0)], dtype=np.float32)
        roi = None
        if box is not None:
            b = np.asarray(box, dtype=np.float64).reshape(-1)
            if b.shape != (6,):
                raise ValueError(f"box must be (i0, j0, k0, i1, j1, k1), got {box!r}")
            roi = [b[0], b[1], b[3], b[4], b[2], b[5]]  # MONAI Label's roi order
        prior = None if mask_input is None else np.asarray(mask_input) > 0
        res = self.engine.segment(image, fg, bg, roi, label, prior=prior)
        return res.mask, np.array([res.info.get("score", 0.0)], dtype=np.float32)

    def segment_all(self) -> tuple[np.ndarray, dict[str, int]]:
        """Automatic models: (label volume (X, Y, Z), {class name: value})."""
        image = self._require_image()
        if self.kind != "auto":
            raise ValueError(f"segment_all needs an automatic model; this is a {self.kind} model: call predict()")
        res = self.engine.segment(image)
        return res.mask, dict(self.engine.label_names)

    @staticmethod
    def _split_points(points, point_labels) -> tuple[list, list]:
        if points is None:
            return [], []
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3) if len(points) else np.zeros((0, 3))
        labels = np.ones(len(pts), dtype=int) if point_labels is None else np.asarray(point_labels).reshape(-1)
        if len(labels) != len(pts):
            raise ValueError(f"{len(pts)} points but {len(labels)} point_labels")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"point_labels must be 1 (foreground) or 0 (background), got {labels.tolist()}")
        return pts[labels == 1].tolist(), pts[labels == 0].tolist()
