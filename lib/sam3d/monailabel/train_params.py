"""What a train request may ask of the train task `sam3d`: its parameters over the app's `train` defaults, checked
before MONAI Label starts a process (TrainRequestError carries the HTTP status the server answers with)."""

import logging
import math
from dataclasses import dataclass

from . import promotion
from .devices import resolve_device

logger = logging.getLogger(__name__)

TRAINABLE = {  # part -> the modules the recipe freezes
    "decoder": ["image_encoder", "prompt_encoder"],
    "prompt+decoder": ["image_encoder"],
    "lora": ["image_encoder"],  # + low-rank updates of the encoder's attention (LORA below), as SAMed tunes SAM
    "all": [],
}
LORA = {"modules": ["image_encoder"], "layers": ["qkv"]}  # rank and alpha: the task settings `lora_rank`/`lora_alpha`
DEFAULTS = {
    "task": "sam3d_point",  # the infer task whose model this fine-tunes
    "recipe": "auto",  # the served model config's finetune_recipe, else configs/train/datastore_finetune.yaml
    "epochs": 1,
    "steps": 0,  # > 0: wins over epochs
    "lr": "auto",  # auto: the served model config's finetune_defaults (BY_MODEL below)
    "trainable": "prompt+decoder",
    "device": "auto",
    "val_split": 0.2,
    "promote": "better",
    "batch_size": 2,
    "labels": "all",  # or the names (configs/app.yaml `labels`) of the structures to train on
    "windows_per_volume": "auto",  # an epoch: this many windows per training image
    "val_samples": 8,  # held-out windows (each with `val_clicks` simulated clicks)
    "val_clicks": 5,
    "threads": 1,  # CPU threads of the training process
    "gpu_memory_fraction": 0.5,  # of the GPU the training process may take (the server infers on the same GPU)
    "lora_rank": 4,  # trainable: lora
    "lora_alpha": 4.0,
}

BY_MODEL = {"lr": 1.0e-4, "windows_per_volume": 8}  # `auto`, when the model config has no `finetune_defaults`


def resolve_auto(settings: dict, model_config: dict) -> dict:
    """The task settings with each `auto` replaced by the served model config's `finetune_defaults` (how much a
    network should move on a few labelled volumes is the network's own), else `BY_MODEL`."""
    own = model_config.get("finetune_defaults") or {}
    return {k: own.get(k, BY_MODEL[k]) if k in BY_MODEL and v == "auto" else v for k, v in settings.items()}


def trainable_parts(preset: str, network: dict | None = None) -> dict[str, list[str]]:
    """`trainable` choice -> the modules it freezes, for the served network: SAM's parts above, or the click
    network's own (`sam3d.models.clicknet.FROZEN_BY_TRAINABLE`)."""
    from ..models.clicknet import CLICKNET_PRESETS, FROZEN_BY_TRAINABLE

    if preset not in CLICKNET_PRESETS:
        return TRAINABLE
    return FROZEN_BY_TRAINABLE[(network or {}).get("backbone", CLICKNET_PRESETS[preset].backbone)]


def frozen_modules(trainable: str, preset: str, network: dict | None = None) -> list[str]:
    """The modules `trainable` freezes in the served network; TrainRequestError (422) for a part it lacks."""
    parts = trainable_parts(preset, network)
    if trainable not in parts:
        raise TrainRequestError(
            f"trainable {trainable!r} needs a ViT image encoder; the click network {preset} takes {', '.join(parts)}"
        )
    return parts[trainable]


PARAMS = ("epochs", "steps", "lr", "trainable", "device", "val_split", "promote", "batch_size", "labels")
ALIASES = {"learning_rate": "lr", "max_epochs": "epochs"}
MONAI_KEYS = {"model", "gpus", "local_rank", "bundle_path", "client_id", "name"}  # MONAI Label adds these


class TrainRequestError(ValueError):
    """A train request that cannot run; `status` is the HTTP code the server answers with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class TrainParams:
    epochs: int
    steps: int
    lr: float
    trainable: str
    device: str
    val_split: float
    promote: str
    batch_size: int
    labels: list[str] | None  # structure names to train on; None: every label value of the files


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value  # Slicer sends a choice list's pick


def _number(kind, key: str, value, low: float, low_ok: bool = True):
    try:
        v = kind(value)
        if isinstance(value, bool) or (kind is int and float(value) != v) or not math.isfinite(v):
            raise ValueError
    except (TypeError, ValueError):
        raise TrainRequestError(f"{key} must be a{'n integer' if kind is int else ' number'}, got {value!r}") from None
    if v < low or (v == low and not low_ok):
        raise TrainRequestError(f"{key} must be {'>=' if low_ok else '>'} {low}, got {value!r}")
    return v


def _label_names(value, known: dict[str, int]) -> list[str] | None:
    """`all` (None), or names the app declares: a list or a comma-separated string."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "all")):
        return None
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if str(n).strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise TrainRequestError(f"unknown label names {unknown or value!r}; declared: {', '.join(known)} (or all)")
    return names


def parse_train_params(request: dict, defaults: dict, known_labels: dict[str, int] | None = None) -> TrainParams:
    """The run's parameters: the request's over the app's `train` defaults; TrainRequestError when unusable."""
    given = {ALIASES.get(k, k): (v if k == "labels" else _first(v)) for k, v in (request or {}).items()}
    unknown = set(given) - set(PARAMS) - MONAI_KEYS - set(DEFAULTS)
    if unknown:
        logger.warning(f"sam3d train: ignoring unknown parameters {sorted(unknown)} (known: {', '.join(PARAMS)})")
    p = {k: given.get(k, defaults.get(k, DEFAULTS[k])) for k in PARAMS}
    epochs = _number(int, "epochs", p["epochs"], 0)
    steps = _number(int, "steps", p["steps"] or 0, 0)
    if not epochs and not steps:
        raise TrainRequestError("nothing to train: give epochs > 0 or steps > 0")
    trainable = str(p["trainable"]).strip().lower()
    if trainable not in TRAINABLE:
        raise TrainRequestError(f"unknown trainable part {p['trainable']!r}; use one of {', '.join(TRAINABLE)}")
    promote = str(p["promote"]).strip().lower()
    if promote not in promotion.POLICIES:
        raise TrainRequestError(f"unknown promote policy {p['promote']!r}; use one of {', '.join(promotion.POLICIES)}")
    val_split = _number(float, "val_split", p["val_split"], 0.0)
    if val_split >= 1:
        raise TrainRequestError(f"val_split must be in [0, 1), got {p['val_split']!r}")
    device, error = resolve_device(str(p["device"]))
    if error:
        raise TrainRequestError(error)
    return TrainParams(
        epochs=epochs,
        steps=steps,
        lr=_number(float, "lr", p["lr"], 0.0, low_ok=False),
        trainable=trainable,
        device=device,
        val_split=val_split,
        promote=promote,
        batch_size=_number(int, "batch_size", p["batch_size"], 1),
        labels=_label_names(p["labels"], known_labels or {}),
    )
