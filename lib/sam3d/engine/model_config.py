"""Model configs (`configs/models/<name>.yaml`) by name or path: one lookup for the app, evaluation and scripts."""

import os
from pathlib import Path

import yaml


def load_model_config(ref: str, configs_dir: str | os.PathLike, checkpoint: str | None = None) -> dict:
    """A model config by name (`<configs_dir>/models/<ref>.yaml`) or YAML path, with `checkpoint` overriding.

    As in the app, a relative `checkpoint` written in a YAML file resolves against the project root (the folder
    that holds `configs_dir`); the `checkpoint` argument (a command-line path) against the working directory.
    """
    configs_dir = Path(configs_dir)
    root = configs_dir.resolve().parent
    path = Path(ref).expanduser()
    if not (ref.endswith((".yaml", ".yml")) or os.sep in ref or path.is_file()):
        path = configs_dir / "models" / f"{ref}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (configs_dir / "models").glob("*.yaml"))
            raise FileNotFoundError(f"unknown model {ref!r}: no {path}; known: {known} (or give a YAML path)")
    if not path.is_file():
        raise FileNotFoundError(f"model config not found: {path}")
    cfg = yaml.safe_load(path.read_text()) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a model config must be a mapping")
    cfg.setdefault("name", path.stem)
    if checkpoint:
        cfg["checkpoint"] = str(Path(checkpoint).expanduser().resolve())
    elif cfg.get("checkpoint"):
        p = Path(str(cfg["checkpoint"])).expanduser()
        cfg["checkpoint"] = str(p if p.is_absolute() else root / p)
    return cfg
