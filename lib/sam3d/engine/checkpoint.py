"""Reading and writing model weights: safetensors (ours) and SAM-Med3D `.pth` files, never unpickled blindly."""

import hashlib
import importlib
import json
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..models import build_network
from ..models.lora import merged_state_dict


class WeightsMissingError(FileNotFoundError):
    """The configured checkpoint does not exist; the task stays registered and says so."""


@dataclass
class LoadedModel:
    model: nn.Module
    checkpoint: str | None  # path of the weights, None for a factory that needs none
    checkpoint_sha256: str | None
    name: str = ""  # the preset or factory, for the answers' metadata
    saved: dict | None = None  # the config the checkpoint carries (network, recipe, familiarity, ...)

    @property
    def model_id(self) -> str:
        """What caches key on: the weights' hash, or this very module when it has no file."""
        return self.checkpoint_sha256 or f"{type(self.model).__name__}@{id(self.model)}"

    @property
    def display_name(self) -> str:
        return self.name or type(self.model).__name__


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from safetensors, or from a torch file loaded with `weights_only=True`.

    Accepts SAM-Med3D's training checkpoints (`{"model_state_dict": ...}`) as well as a bare state_dict.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused, it holds objects other than tensors (only weights are loaded): {e}") from e
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state_dict of tensors")
    return obj


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_CONFIG_KEY = "sam3d_config"


def save_checkpoint(model: nn.Module, path: str | os.PathLike, config: dict, half: bool = False) -> None:
    """Weights as safetensors plus `<stem>.yaml` with the network config; each file replaced atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # fine-tuning LoRA folded in: the network's own keys; each tensor its own copy, since safetensors refuses
    # tensors that share memory (MONAI's DynUNet lists one block under two names)
    tensors = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone().contiguous()
        for k, v in merged_state_dict(model).items()
    }
    _write_checkpoint(path, tensors, config)


def update_saved_config(path: str | os.PathLike, entries: dict) -> None:
    """Add `entries` to the config a safetensors checkpoint carries, tensors untouched."""
    path = Path(path)
    _write_checkpoint(path, load_file(str(path)), {**(saved_config(path) or {}), **entries})


def _write_checkpoint(path: Path, tensors: dict, config: dict) -> None:
    """The network travels inside the weights file, so one atomic replace updates both; the YAML beside it is for
    people (lists of numbers, such as a familiarity measure, on a few lines)."""
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={_CONFIG_KEY: json.dumps(config)}))
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=120)
    atomic_write(path.with_suffix(".yaml"), lambda tmp: Path(tmp).write_text(text))


def saved_config(path: str | os.PathLike) -> dict | None:
    """The config stored in one of our safetensors files (else its sidecar YAML), or None."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if _CONFIG_KEY in meta:
        return json.loads(meta[_CONFIG_KEY])
    sidecar = path.with_suffix(".yaml")
    return (yaml.safe_load(sidecar.read_text()) or {}) if sidecar.is_file() else None


def atomic_write(path: Path, write) -> None:
    """Write `path` through a temporary file in the same folder and one rename: never half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _resolve_factory(spec: str):
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"factory must be 'module:callable', got {spec!r}")
    return getattr(importlib.import_module(module), attr)


def load_model(model_config: dict, base_dir: str | os.PathLike | None = None) -> LoadedModel:
    """The network a model config describes, with its weights.

    Config keys: `preset` (a name in `sam3d.models.PRESETS`), `network` (size overrides), `checkpoint` (path,
    relative to `base_dir`), or `factory: "module:callable"` for a user's own module with the same
    `encode_image`/`decode` interface (called with the config; it loads its own weights).
    """
    if model_config.get("factory"):
        model = _resolve_factory(model_config["factory"])(model_config)
        name = getattr(model, "name", model_config["factory"])
        return LoadedModel(model.eval(), model_config.get("checkpoint"), None, name)
    path = resolve_checkpoint(model_config, base_dir)
    if path is None:
        raise WeightsMissingError("no checkpoint configured: set `checkpoint` in the model config or with --conf")
    if not path.is_file():
        raise WeightsMissingError(f"checkpoint not found: {path}")
    preset = model_config.get("preset", "sam_med3d_turbo")
    network = model_config.get("network") or {}
    saved = saved_config(path)
    if saved:  # our checkpoints carry their network (preset + overrides): it wins over the model config's
        preset, network = saved.get("preset", preset), saved.get("network", network) or {}
    model = build_network(preset, **network)  # the preset names the variant (Sam3D, RefSam3D)
    state = {k: v.float() for k, v in read_state_dict(path).items()}
    model.load_state_dict(state, strict=True)
    return LoadedModel(model.eval(), str(path), file_sha256(path), preset, saved)


def configured_preset(model_config: dict, default: str = "sam_med3d_turbo") -> str:
    """The preset a model config serves: the one its checkpoint records (ours carry it), else the config's."""
    path = resolve_checkpoint(model_config)
    saved = (saved_config(path) or {}).get("preset") if path is not None and path.is_file() else None
    return saved or model_config.get("preset", default)


def configured_kind(model_config: dict) -> str:
    """The kind of model a config serves (point, text or auto): text for a config whose names choose the classes
    of an automatic model (`classes_from`, `sam3d.engine.named_class`), else its preset's kind."""
    from ..models import model_kind

    return "text" if model_config.get("classes_from") else model_kind(configured_preset(model_config))


def resolve_checkpoint(model_config: dict, base_dir: str | os.PathLike | None = None) -> Path | None:
    """The configured checkpoint path (relative paths against `base_dir`), or None when none is set."""
    ckpt = model_config.get("checkpoint")
    if not ckpt:
        return None
    path = Path(ckpt).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    return path
