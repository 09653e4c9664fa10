"""The app's configuration: `configs/app.yaml`, the model YAMLs it names, and MONAI Label's `--conf KEY VALUE`.

MONAI Label hands the app a flat dict of strings (`--conf KEY VALUE`, repeated). Keys:

- `model`, `checkpoint`: the model config and the weights of the default task `sam3d_point`
  (short for `infers.sam3d_point.model` / `infers.sam3d_point.checkpoint`);
- `weights NAME` (short for `infers.sam3d_point.weights`): published weights of `sam3d.engine.weights_registry`
  that `bash scripts/setup.sh fetch NAME` installed: the task's checkpoint unless one is set, named with their
  licence in /info;
- `device` (auto | cpu | cuda | cuda:N), `preload` (true | false), `strict_labels` (true | false);
- `config`: another app YAML instead of `configs/app.yaml`;
- `train.KEY` (the train task's defaults, see `train_params.DEFAULTS`), `retrain_every` (train after every N new or
  changed final labels; 0: never), `lease_minutes` (how long an image handed out for annotation stays reserved);
- `limits.KEY`: what one /infer request may ask and how many are answered at once (`RequestLimits`, infer_api:
  `max_points`, `max_request_mb`, `infer_threads`, `infer_queue`); an unknown one stops the server;
- `auth_token_file`, `insecure_no_auth`: who may talk to the server, read by `security.py` (README "Security"),
  not part of the app config;
- any dotted path into the app YAML, its value parsed as YAML: `infers.sam3d_point.spacing "[2, 2, 2]"`,
  `labels.tumour 200`, `infers.turbo.model sam_med3d_turbo` (a new name adds a task), `infers.sam3d_point null`
  (removes it).

A task's `model` is a name in `<configs>/models/` or a path to a YAML file; every key of the task other than
`model`, `description` and `labels` overrides the same key of its model config (`checkpoint`, `spacing`, ...).

Paths: a relative path written in a YAML file resolves against the project root (the folder that holds
`configs/`); a relative path given with `--conf` resolves against the server's working directory.
"""

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..engine import weights_registry
from ..engine.checkpoint import configured_kind
from ..engine.model_config import load_model_config

logger = logging.getLogger(__name__)

DEFAULT_TASK = "sam3d_point"
DEFAULT_LABEL = "structure"
TASK_KEYS = {"model", "description", "labels"}  # every other key of a task overrides its model config
ALIASES = {
    "model": f"infers.{DEFAULT_TASK}.model",
    "checkpoint": f"infers.{DEFAULT_TASK}.checkpoint",
    "weights": f"infers.{DEFAULT_TASK}.weights",
}
TOP_KEYS = {
    "name",
    "description",
    "device",
    "preload",
    "strict_labels",
    "infers",
    "labels",
    "train",
    "retrain_every",
    "lease_minutes",
    "uncertainty",
    "limits",
}
SECURITY_KEYS = ("auth_token_file", "insecure_no_auth")  # read by security.policy_for, not app config keys
NOT_OURS = {"config", "server_mode", *SECURITY_KEYS}  # `config` is read first; `server_mode` is MONAI Label's
# values never YAML-parsed
STRING_KEYS = {"model", "checkpoint", "factory", "description", "device", "name", "recipe", "weights"}


class AppConfigError(ValueError):
    """The app YAML itself is unusable (the server should not start on a broken file)."""


@dataclass
class TaskSpec:
    """One infer task as configured; `error` says why it cannot run (the task still shows in /info)."""

    name: str
    model_name: str  # the model config's name, or its YAML path
    model_config: dict[str, Any]  # the model YAML with the task's overrides; `checkpoint` absolute or None
    description: str
    labels: dict[str, int]
    error: str | None = None
    conf_prefix: str = ""  # how to override this task's keys on the command line
    kind: str = "point"  # the model's kind (`sam3d.engine.checkpoint.configured_kind`): point, text or auto


@dataclass
class RequestLimits:
    """What one /infer request may ask, and how many requests are answered at once (`--conf limits.KEY VALUE`)."""

    max_points: int = 1000  # foreground + background clicks of one request
    max_request_mb: float = 256.0  # the request's body, an uploaded image included
    infer_threads: int = 2  # requests computed at once, each in its own thread (never on the server's event loop)
    infer_queue: int = 4 * (os.cpu_count() or 1)  # requests waiting for a thread; one more is answered 429

    @classmethod
    def from_dict(cls, values: dict) -> "RequestLimits":
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise AppConfigError(f"unknown limits {sorted(unknown)}: use {', '.join(cls.__dataclass_fields__)}")
        out = cls()
        for name, value in values.items():
            setattr(out, name, _non_negative(value, f"limits.{name}", type(getattr(out, name))))
        for name in ("max_points", "max_request_mb", "infer_threads"):
            if getattr(out, name) <= 0:
                raise AppConfigError(f"limits.{name} must be > 0, got {getattr(out, name)!r}")
        return out


@dataclass
class AppConfig:
    name: str
    description: str
    device: str
    preload: bool
    strict_labels: bool
    labels: dict[str, int]
    infers: dict[str, TaskSpec] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # the train task's defaults (train_params.DEFAULTS)
    retrain_every: int = 0  # start training after this many new or changed final labels; 0: never
    lease_minutes: float = 30.0  # an image handed to one annotator is not handed to another for this long
    uncertainty: dict[str, Any] = field(default_factory=dict)  # the uncertainty strategy's settings
    limits: RequestLimits = field(default_factory=RequestLimits)  # /infer's request limits and queue (infer_api)
    source: Path | None = None  # the app YAML read
    root: Path | None = None  # relative YAML paths resolve against this


def _as_bool(value, key: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on", "y", "t"):
        return True
    if s in ("0", "false", "no", "off", "n", "f", ""):
        return False
    raise AppConfigError(f"{key} must be true or false, got {value!r}")


def _non_negative(value, key: str, kind):
    try:
        v = kind(value)
    except (TypeError, ValueError):
        raise AppConfigError(f"{key} must be a number >= 0, got {value!r}") from None
    if v < 0:
        raise AppConfigError(f"{key} must be >= 0, got {value!r}")
    return v


def _parse_value(key: str, value: Any, cwd: Path) -> Any:
    """A --conf string -> a YAML value; paths made absolute against the working directory."""
    last = key.rsplit(".", 1)[-1]
    if not isinstance(value, str):
        return value
    if last in STRING_KEYS:
        v = value.strip()
        if last == "checkpoint":
            if v.lower() in ("", "null", "none"):
                return None
            return str((cwd / Path(v).expanduser()).resolve())
        if last == "recipe":
            return str((cwd / Path(v).expanduser()).resolve())
        if last == "model" and _looks_like_path(v):
            return str((cwd / Path(v).expanduser()).resolve())
        return v
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _looks_like_path(ref: str) -> bool:
    return ref.endswith((".yaml", ".yml")) or "/" in ref or os.sep in ref


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def _labels(value, where: str) -> dict[str, int]:
    if value is None:
        return {}
    if isinstance(value, (list, tuple)):
        return {str(name): i + 1 for i, name in enumerate(value)}
    if isinstance(value, dict):
        try:
            return {str(k): int(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise AppConfigError(f"{where}: label values must be integers, got {value!r}") from None
    raise AppConfigError(f"{where}: labels must be a mapping name -> value or a list of names")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise AppConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AppConfigError(f"{path} must hold a mapping, got {type(data).__name__}")
    return data


def _resolve_against(path: str, root: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (root / p).resolve())


def _task(name: str, raw: Any, cfg_dir: Path, root: Path, default_labels: dict[str, int]) -> TaskSpec:
    prefix = "" if name == DEFAULT_TASK else f"infers.{name}."
    if not isinstance(raw, dict):
        raw = {"model": raw} if isinstance(raw, str) else {}
    model_ref = raw.get("model")
    labels = _labels(raw["labels"], f"infers.{name}.labels") if raw.get("labels") else dict(default_labels)
    description = str(raw.get("description") or "Segment Anything in 3D: clicks -> one structure")
    spec = TaskSpec(name, str(model_ref), {}, description, labels, conf_prefix=prefix)
    if "kind" in raw:
        spec.error = (
            f"`{prefix or 'infers.' + name + '.'}kind` is not a setting: a task's kind comes from its "
            "model's preset (point, text or auto); remove it"
        )
        return spec
    if not model_ref:
        spec.error = f"no model configured: set `--conf {prefix or ''}model NAME_OR_YAML`"
        return spec

    model_ref = str(model_ref)
    ref = _resolve_against(model_ref, root) if _looks_like_path(model_ref) else model_ref
    try:
        try:
            model_config = load_model_config(ref, cfg_dir)
        except FileNotFoundError:
            if _looks_like_path(model_ref) or cfg_dir == root / "configs":
                raise
            model_config = load_model_config(ref, root / "configs")  # another app YAML, the project's models
    except (FileNotFoundError, ValueError, yaml.YAMLError) as e:
        spec.error = f"model config {model_ref!r}: {e}"
        return spec

    model_config.update({k: copy.deepcopy(v) for k, v in raw.items() if k not in TASK_KEYS})
    if model_config.get("classes_from"):  # its models are found by name beside this one
        model_config.setdefault("configs_dir", str(cfg_dir))
    if model_config.get("checkpoint"):
        model_config["checkpoint"] = _resolve_against(str(model_config["checkpoint"]), root)
    else:
        model_config["checkpoint"] = None
    spec.model_config = model_config
    spec.model_name = model_ref
    spec.error = weights_registry.apply_to_model_config(model_config)  # `weights NAME`: the installed file
    if "factory" not in model_config:  # a user's own network (`factory`) is a point model
        try:
            spec.kind = configured_kind(model_config)
        except ValueError as e:
            spec.error = f"model config {model_ref!r}: {e}"
    return spec


def load_app_config(
    conf: dict[str, str] | None, config_dir: str | os.PathLike, cwd: str | os.PathLike | None = None
) -> AppConfig:
    """The app config from `<config_dir>/app.yaml` (or `conf["config"]`) with MONAI Label's `conf` applied."""
    conf = dict(conf or {})
    cwd = Path(cwd or os.getcwd())
    config_dir = Path(config_dir).resolve()
    root = config_dir.parent
    source = Path(conf["config"]).expanduser() if conf.get("config") else config_dir / "app.yaml"
    if not source.is_absolute():
        source = (cwd / source).resolve()
    if not source.is_file():
        raise AppConfigError(f"app config not found: {source}")
    tree = _read_yaml(source)

    for key, value in conf.items():
        if key in NOT_OURS:
            continue
        dotted = ALIASES.get(key, key)
        if dotted.split(".", 1)[0] not in TOP_KEYS:
            known = sorted(TOP_KEYS | set(ALIASES) | NOT_OURS - {"server_mode"})
            logger.warning(f"sam3d: ignoring unknown --conf key {key!r} (known: {known})")
            continue
        _set_dotted(tree, dotted, _parse_value(dotted, value, cwd))

    labels = _labels(tree.get("labels"), "labels")
    if DEFAULT_LABEL not in labels:
        labels[DEFAULT_LABEL] = max(labels.values(), default=0) + 1
    infers = tree.get("infers") or {}
    if not isinstance(infers, dict):
        raise AppConfigError("infers must be a mapping task name -> task config")

    for key in ("train", "uncertainty", "limits"):
        if not isinstance(tree.get(key) or {}, dict):
            raise AppConfigError(f"{key} must be a mapping of settings")
    out = AppConfig(
        name=str(tree.get("name") or "sam3d"),
        description=str(tree.get("description") or ""),
        device=str(tree.get("device") or "auto"),
        preload=_as_bool(tree.get("preload", False), "preload"),
        strict_labels=_as_bool(tree.get("strict_labels", True), "strict_labels"),
        labels=labels,
        train=dict(tree.get("train") or {}),
        retrain_every=_non_negative(tree.get("retrain_every", 0), "retrain_every", int),
        lease_minutes=_non_negative(tree.get("lease_minutes", 30), "lease_minutes", float),
        uncertainty=dict(tree.get("uncertainty") or {}),
        limits=RequestLimits.from_dict(tree.get("limits") or {}),
        source=source,
        root=root,
    )
    for name, raw in infers.items():
        if raw is None:  # `--conf infers.NAME null` removes a task
            continue
        out.infers[str(name)] = _task(str(name), raw, source.parent, root, labels)
    return out
