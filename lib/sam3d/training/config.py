"""Training recipes: YAML files with an optional `base:` recipe they extend, and `key.path=value` overrides."""

from pathlib import Path

import yaml


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(path, overrides=()) -> dict:
    """The recipe at `path` merged over its `base:` chain (paths relative to the file), then the overrides.

    An override is `a.b.c=value`; the value is parsed as YAML (`train.steps=10`, `data.cases=[a, b]`).
    """
    path = Path(path)
    recipe = yaml.safe_load(path.read_text()) or {}
    base = recipe.pop("base", None)
    name = recipe.get("name", path.stem)
    if base:
        recipe = _merge(load_recipe(path.parent / base), recipe)
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
