"""Ablations: trained variants of a model compared on the same held-out targets, clicks and protocols.

A spec (YAML, `base:` and `key.path=value` overrides as training recipes; see configs/ablations/):

    runs: runs/ablation_segsam3d          # each variant trains into <runs>/<name> unless it names a checkpoint
    sets:                                 # held-out targets: a case folder and its labels (null: all)
      - {name: totalseg_mr, data: ../shared/data/totalseg_mr, labels: null}
    protocols: [center, noisy1, noisy2]
    clicks: 5
    report_clicks: [1, 3, 5]              # the table's columns
    plots: [noisy1, noisy2]               # a Dice-per-iteration plot for each
    baseline: true                        # the random walker beside the variants
    variants:
      default: {model: sam3d_small, train: {config: configs/train/sam3d_default.yaml, overrides: []}}
      # optional per variant: checkpoint (instead of training), engine (model-config keys), text: false (in the
      # `text` protocol: no text, clicks only)

Every variant meets the same targets with the same seeds (`sam3d.evaluation.runner`), so the first prompt of each
target is the same for all of them. Rows are the runner's, with `set` and `protocol` added.
"""

import math
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..data.cases import find_cases
from ..engine.model_config import load_model_config
from ..training.config import load_layered_yaml
from .report import plot_dice_per_structure, plot_dice_vs_clicks
from .runner import COLUMNS, EvalConfig, run_evaluation

KNOWN = {
    "runs",
    "sets",
    "protocols",
    "clicks",
    "report_clicks",
    "plots",
    "baseline",
    "variants",
    "seed",
    "near_mm",
    "name",
    "per_class",
}


def load_spec(path, overrides=()) -> dict:
    spec = load_layered_yaml(path, overrides)
    unknown = set(spec) - KNOWN
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(KNOWN)}")
    for key in ("sets", "variants"):
        if not spec.get(key):
            raise ValueError(f"{path}: `{key}` is empty")
    return spec


def _resolve(path, root: Path) -> Path:
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else root / p


def checkpoint_of(spec: dict, name: str, root: Path) -> Path:
    v = spec["variants"][name]
    if v.get("checkpoint"):
        return _resolve(v["checkpoint"], root)
    return _resolve(spec["runs"], root) / name / "model.safetensors"


def train_command(spec: dict, name: str, root: Path) -> list[str] | None:
    """scripts/train.py for a variant without a checkpoint of its own (resumes a run that was interrupted)."""
    v = spec["variants"][name]
    if v.get("checkpoint") or not v.get("train"):
        return None
    t = v["train"]
    out = _resolve(spec["runs"], root) / name
    return [
        sys.executable,
        str(root / "scripts" / "train.py"),
        "--config",
        str(_resolve(t["config"], root)),
        *[str(o) for o in t.get("overrides") or []],
        f"output={out}",
    ]


def train_missing(spec: dict, root: Path, force: bool = False) -> list[str]:
    """Train the variants whose run has not finished; returns their names. A failed run raises."""
    trained = []
    for name in spec["variants"]:
        cmd = train_command(spec, name, root)
        if cmd is None:
            continue
        if not force and checkpoint_of(spec, name, root).is_file() and _finished(spec, name, root):
            continue
        print(f"[ablation] training {name}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, cwd=root)
        trained.append(name)
    return trained


def _finished(spec: dict, name: str, root: Path) -> bool:
    """The run ended (all its steps, or its time budget) at the step of its checkpoint: not killed midway."""
    import json

    import torch

    run = checkpoint_of(spec, name, root).parent
    if not (run / "summary.json").is_file() or not (run / "state.pt").is_file():
        return False
    step = int(torch.load(run / "state.pt", map_location="cpu", weights_only=True)["step"])
    return int(json.loads((run / "summary.json").read_text())["step"]) == step


def build_variant_segmenters(spec: dict, root: Path, device: str, protocol: str = "center") -> list:
    """The variants (and the baseline) as the harness runs them under `protocol`. In the `text` protocol a variant
    with `text: false`, and the baseline, get no text: an empty mask until the first click."""
    from .segmenters import ClicksOnlySegmenter, segmenter_from_config

    def without_text(seg):
        return ClicksOnlySegmenter(seg) if protocol == "text" else seg

    segs = []
    for name, v in spec["variants"].items():
        cfg = load_model_config(
            str(v.get("model", "sam3d_small")), root / "configs", str(checkpoint_of(spec, name, root))
        )
        cfg.update(v.get("engine") or {})  # engine settings per variant, e.g. {order: top_down} for the auto model
        reads_text = protocol == "text" and v.get("text", True)
        seg = segmenter_from_config(cfg, device=device, name=name, protocol="text" if reads_text else "center")
        segs.append(seg if reads_text else without_text(seg))
    if spec.get("baseline", True):
        from .baseline import RandomWalkerSegmenter

        segs.append(without_text(RandomWalkerSegmenter()))
    return segs


def run_ablation(spec: dict, root: Path, device: str = "cpu", progress: bool = True) -> list[dict]:
    rows = []
    for protocol in spec.get("protocols") or ["center"]:
        segmenters = build_variant_segmenters(spec, root, device, protocol)
        for s in spec["sets"]:
            cases = find_cases(_resolve(s["data"], root), names_key=s.get("names_key"))
            labels = s.get("labels")
            config = EvalConfig(
                protocol=protocol,
                clicks=int(spec.get("clicks", 5)),
                seed=int(spec.get("seed", 0)),
                labels=[str(v) for v in labels] if labels else None,
                near_mm=float(spec.get("near_mm", 10.0)),
            )
            for r in run_evaluation(cases, segmenters, config, progress=progress):
                rows.append({**r, "set": s.get("name", Path(str(s["data"])).name), "protocol": protocol})
    return rows


def _mean(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v) and math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def ablation_table(rows: list[dict], report_clicks, per_class: bool = False) -> str:
    """Markdown: one line per (set, protocol, method[, structure]); mean Dice and HD95 after each reported click."""
    groups: OrderedDict = OrderedDict()
    for r in rows:
        key = (r["set"], r["protocol"], r["method"]) + ((r["label_name"],) if per_class else ())
        groups.setdefault(key, []).append(r)
    clicks = list(report_clicks)
    head = (
        ["set", "protocol", "method"]
        + (["structure"] if per_class else [])
        + ["targets"]
        + [f"Dice@{k}" for k in clicks]
        + [f"HD95@{k} (mm)" for k in clicks]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (set_name, protocol, method, *structure), rs in groups.items():
        targets = len({(r["case"], r["label"]) for r in rs})
        # a failed call counts as Dice 0, as in the harness's curves
        dice = [_mean([r["dice"] if not math.isnan(r["dice"]) else 0.0 for r in rs if r["click"] == k]) for k in clicks]
        hd = [_mean([r["hd95"] for r in rs if r["click"] == k]) for k in clicks]
        cells = [f"{d:.3f}" for d in dice] + ["n/a" if math.isnan(h) else f"{h:.1f}" for h in hd]
        lines.append(
            f"| {set_name} | {protocol} | `{method}` | "
            + "".join(f"{n} | " for n in structure)
            + f"{targets} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def write_ablation(rows: list[dict], out: Path, spec: dict, meta: dict) -> dict[str, Path]:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "summary": out / "summary.md"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["set", "protocol", *COLUMNS], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Ablation: {spec.get('name', '')}", ""] + [f"* {k}: {v}" for k, v in meta.items()] + [""]
    lines += [ablation_table(rows, spec.get("report_clicks") or [1, spec.get("clicks", 5)]), ""]
    if spec.get("per_class"):
        report_clicks = spec.get("report_clicks") or [1]
        lines += ["## Per structure", "", ablation_table(rows, report_clicks, per_class=True), ""]
        paths["plot_per_structure"] = out / "dice_per_structure.png"
        plot_dice_per_structure(rows, report_clicks[-1], paths["plot_per_structure"], spec.get("name", ""))
        lines += ["![Dice per structure](dice_per_structure.png)", ""]
    for protocol in spec.get("plots") or []:
        sel = [r for r in rows if r["protocol"] == protocol]
        if not sel:
            continue
        paths[f"plot_{protocol}"] = out / f"dice_{protocol}.png"
        plot_dice_vs_clicks(sel, paths[f"plot_{protocol}"], f"{spec.get('name', '')}: {protocol}, all sets")
        lines += [f"![Dice per iteration, {protocol}](dice_{protocol}.png)", ""]
    paths["summary"].write_text("\n".join(lines))
    return paths
