"""Training recipes: YAML files with an optional `base:` recipe they extend, and `key.path=value` overrides.

Every key is checked against the ones the training reads (`RECIPE_KEYS`): a misspelt key is an error that names
it, not a setting silently ignored.
"""

import difflib
from dataclasses import fields
from pathlib import Path

import yaml

from ..data.training import SamplingConfig
from .auto_step import SliceSampling
from .interactive import InteractiveConfig

_DATA_KEYS = {"dir", "cases", "exclude", "datastore", "label_maps", "shapes"}
# section -> its keys (a set), or None: a value, or a mapping that its reader checks itself (`loss`: the loss's
# own arguments, checked when it is built)
RECIPE_KEYS: dict[str, set | None] = {
    "name": None,
    "seed": None,
    "output": None,
    "resume": None,
    "resume_from": None,
    "loss": None,
    "model": {"config", "preset", "network", "spacing", "intensity", "init_checkpoint", "init_required", "init_strict"},
    "data": _DATA_KEYS,
    "sampling": {f.name for f in fields(SamplingConfig)},
    "interactive": {f.name for f in fields(InteractiveConfig)},
    "optim": {
        "lr",
        "weight_decay",
        "betas",
        "eps",
        "warmup_steps",
        "min_lr_ratio",
        "grad_clip",
        "freeze",
        "lr_mult",
        "lora",
    },
    "train": {"steps", "batch_size", "accumulate", "num_workers", "threads", "amp", "max_minutes", "stop_at_step"},
    "checkpoint": {"every", "half"},
    "validation": {"every", "samples", "clicks", "data"},
    "log": {"every", "tensorboard", "progress"},
    "text": {"refine_rounds", "zoom_out_prob", "synonym_prob", "names", "model"},
    "auto": {"augment", "box_loss_weight", "foreground_slices", "max_previous", "sam_checkpoint", "teacher_boxes"}
    | {"foreground_windows"}  # the window model's (sam3d.training.auto_window_step)
    | {f.name for f in fields(SliceSampling)},
    "debug": {"exit_at_step"},
}
_NESTED = {
    ("validation", "data"): _DATA_KEYS,
    ("optim", "lora"): {"rank", "alpha", "modules", "layers"},
    ("data", "shapes"): {"count", "size"},
}


def _unknown(keys, known, where: str) -> None:
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
            raise ValueError(f"unknown recipe key {where}{key!r}{hint}")


def check_recipe(recipe: dict) -> dict:
    """`recipe` itself, after checking every key it sets; ValueError naming the first unknown one."""
    _unknown(recipe, RECIPE_KEYS, "")
    for section, known in RECIPE_KEYS.items():
        value = recipe.get(section)
        if known is None or value is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"recipe section {section!r} must be a mapping, got {value!r}")
        _unknown(value, known, f"{section}.")
        for (outer, inner), nested in _NESTED.items():
            if outer == section and isinstance(value.get(inner), dict):
                _unknown(value[inner], nested, f"{section}.{inner}.")
    return recipe


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(path, overrides=()) -> dict:
    """The recipe at `path` merged over its `base:` chain (paths relative to the file), then the overrides, checked
    (`check_recipe`). An override is `a.b.c=value`; the value is parsed as YAML (`train.steps=10`, `data.cases=[a, b]`).
    """
    return check_recipe(load_layered_yaml(path, overrides))


def load_layered_yaml(path, overrides=()) -> dict:
    """A YAML file merged over its `base:` chain, then `a.b.c=value` overrides; no key is checked."""
    path = Path(path)
    recipe = yaml.safe_load(path.read_text()) or {}
    base = recipe.pop("base", None)
    name = recipe.get("name", path.stem)
    if base:
        recipe = _merge(load_layered_yaml(path.parent / base), recipe)
    recipe["name"] = name
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key.path=value")
        node = recipe
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return recipe
