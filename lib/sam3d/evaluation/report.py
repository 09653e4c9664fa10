"""The outputs of an evaluation: results.csv, summary.md, dice_vs_clicks.png."""

import csv
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..metrics import NOC_THRESHOLDS, noc
from .runner import COLUMNS


def write_csv(rows: list[dict], path: str | Path) -> None:
    """One row per method, case, label and click; inf as `inf`, missing values empty."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            out = {}
            for k in COLUMNS:
                v = r.get(k, "")
                if isinstance(v, float):
                    v = "" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.6g}")
                out[k] = v
            w.writerow(out)


def _by_target(rows: list[dict]) -> "OrderedDict[tuple, list[dict]]":
    out: OrderedDict = OrderedDict()
    for r in rows:
        out.setdefault((r["method"], r["case"], r["label"]), []).append(r)
    for v in out.values():
        v.sort(key=lambda r: r["click"])
    return out


def _methods(rows) -> list[str]:
    return list(OrderedDict.fromkeys(r["method"] for r in rows))


def _finite_mean(values) -> tuple[float, int]:
    """(mean of the finite values, how many were infinite); nan values (failed calls) are left out."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    finite = [v for v in vals if math.isfinite(v)]
    return (float(np.mean(finite)) if finite else math.nan), len(vals) - len(finite)


def _fmt(v: float, digits: int = 3, inf: int = 0) -> str:
    s = "n/a" if v is None or math.isnan(v) else f"{v:.{digits}f}"
    return f"{s} ({inf} inf)" if inf else s


def dice_curves(rows: list[dict]) -> dict[str, list[float]]:
    """method -> mean Dice after each click (over targets; a failed call counts as Dice 0)."""
    out = {}
    for m in _methods(rows):
        series = [
            [r["dice"] if not math.isnan(r["dice"]) else 0.0 for r in trace]
            for (mm, _, _), trace in _by_target(rows).items()
            if mm == m
        ]
        n = min(len(s) for s in series)
        out[m] = [float(np.mean([s[i] for s in series])) for i in range(n)]
    return out


def _dice_columns(budget: int) -> list[int]:
    return sorted({k for k in (1, 5, budget) if k <= budget})


def method_summary(rows: list[dict], budget: int) -> dict[str, dict]:
    """Per method: targets, mean metrics at clicks 1, 5 and the last, NoC@80/85/90 (and failures), timings."""
    out = {}
    targets = _by_target(rows)
    for m in _methods(rows):
        traces = [t for (mm, _, _), t in targets.items() if mm == m]
        last = [t[-1] for t in traces]
        s = {"targets": len(traces)}
        for k in _dice_columns(budget):
            s[f"dice@{k}"] = _finite_mean([t[k - 1]["dice"] for t in traces if len(t) >= k])[0]
        for key in ("iou", "hd95", "assd", "nsd", "volume_error"):
            s[key] = _finite_mean([r[key] for r in last])
        for thr in NOC_THRESHOLDS:
            res = [noc([r["dice"] for r in t], thr, budget) for t in traces]
            s[f"noc@{round(thr * 100)}"] = (float(np.mean([n for n, _ in res])), sum(f for _, f in res))
        called = [r for t in traces for r in t if r["seconds"] > 0]
        firsts = [t[0]["seconds"] for t in traces]
        later = [r["seconds"] for r in called if r["click"] > 1]
        s["seconds"] = float(np.mean([r["seconds"] for r in called])) if called else math.nan
        s["seconds_first"] = float(np.mean(firsts)) if firsts else math.nan
        s["seconds_later"] = float(np.mean(later)) if later else math.nan
        s["errors"] = sum(1 for t in traces for r in t if r.get("error"))
        out[m] = s
    return out


def summary_markdown(rows: list[dict], meta: dict, budget: int) -> str:
    methods = _methods(rows)
    ms = method_summary(rows, budget)
    lines = [f"# Evaluation: {meta.get('data', '')}", ""]
    for key in ("command", "commit", "date", "hardware", "software", "data", "protocol", "wall time"):
        if meta.get(key):
            v = meta[key]
            lines.append(f"- **{key}**: " + (f"`{v}`" if key in ("command", "commit") else str(v)))
    lines.append("- **methods**:")
    for name, desc in (meta.get("methods") or {}).items():
        parts = "; ".join(f"{k}: {v}" for k, v in desc.items() if v not in (None, ""))
        lines.append(f"  - `{name}`: {parts}")
    for note in meta.get("notes") or []:
        lines.append(f"- **note**: {note}")
    lines += [
        "",
        "Metrics after the last click unless the column says otherwise. HD95 and ASSD in mm (means over",
        "the finite values; `(k inf)` counts empty predictions), NSD at 2 mm, volume error (|P| - |G|) / |G|.",
        f"NoC@t: clicks to reach Dice >= t, capped at {budget}; `(k fail)` counts targets that never did.",
        "Seconds: wall time of one call (first click includes loading the image and encoding).",
        "",
        "## Mean over targets",
        "",
    ]
    head = [
        "method",
        "targets",
        *(f"Dice@{k}" for k in _dice_columns(budget)),
        "IoU",
        "HD95",
        "ASSD",
        "NSD",
        "vol. err.",
        "NoC@80",
        "NoC@85",
        "NoC@90",
        "s/click",
        "s first",
        "s later",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        s = ms[m]
        cells = [
            f"`{m}`",
            str(s["targets"]),
            *(_fmt(s[f"dice@{k}"]) for k in _dice_columns(budget)),
            _fmt(s["iou"][0]),
            _fmt(s["hd95"][0], 1, s["hd95"][1]),
            _fmt(s["assd"][0], 2, s["assd"][1]),
            _fmt(s["nsd"][0]),
            _fmt(s["volume_error"][0], 3, s["volume_error"][1]),
        ]
        for thr in NOC_THRESHOLDS:
            n, fails = s[f"noc@{round(thr * 100)}"]
            cells.append(f"{n:.2f} ({fails} fail)")
        cells += [_fmt(s["seconds"], 2), _fmt(s["seconds_first"], 2), _fmt(s["seconds_later"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    if any(ms[m]["errors"] for m in methods):
        lines += [
            "",
            "Failed calls: "
            + ", ".join(f"`{m}` {ms[m]['errors']}" for m in methods if ms[m]["errors"])
            + " (see the `error` column of results.csv).",
        ]

    lines += [
        "",
        "## Per structure",
        "",
        f"Dice after click 1 and click {budget}, NoC@90 and HD95 (mm) after click {budget}, for each method.",
        "",
    ]
    head = ["case", "label", "structure"]
    for m in methods:
        head += [f"`{m}` Dice@1", f"Dice@{budget}", "NoC@90", "HD95"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    targets = _by_target(rows)
    keys = list(OrderedDict.fromkeys((c, v) for (_, c, v) in targets))
    for case, value in keys:
        any_trace = next(t for (mm, c, v), t in targets.items() if c == case and v == value)
        cells = [case, str(value), any_trace[0]["label_name"]]
        for m in methods:
            t = targets.get((m, case, value))
            if not t:
                cells += ["", "", "", ""]
                continue
            n, failed = noc([r["dice"] for r in t], 0.90, budget)
            cells += [_fmt(t[0]["dice"]), _fmt(t[-1]["dice"]), f"{n}{'*' if failed else ''}", _fmt(t[-1]["hd95"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "`*`: Dice 0.90 not reached within the budget.", "", "## Mean Dice after each click", ""]
    curves = dice_curves(rows)
    lines += ["| click | " + " | ".join(f"`{m}`" for m in methods) + " |", "|---|" + "---|" * len(methods)]
    for i in range(max(len(c) for c in curves.values())):
        cells = [_fmt(curves[m][i]) if i < len(curves[m]) else "" for m in methods]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines += ["", "![Dice against clicks](dice_vs_clicks.png)", ""]
    return "\n".join(lines)


def plot_dice_vs_clicks(rows: list[dict], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for m, curve in dice_curves(rows).items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=m)
    ax.set_xlabel("click")
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_dice_per_structure(rows: list[dict], click: int, path: str | Path, title: str = "") -> None:
    """Grouped bars: mean Dice after `click` per (set, structure), one bar per method (failed calls count 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["click"] == click]
    groups = list(dict.fromkeys((r.get("set", r["case"]), r["label_name"]) for r in sel))
    methods = list(dict.fromkeys(r["method"] for r in sel))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.9 * len(groups) + 2.5), 4), dpi=120)
    for i, m in enumerate(methods):
        means = []
        for g in groups:
            d = [r["dice"] for r in sel if r["method"] == m and (r.get("set", r["case"]), r["label_name"]) == g]
            means.append(float(np.mean([0.0 if math.isnan(v) else v for v in d])) if d else 0.0)
        ax.bar(np.arange(len(groups)) + (i - (len(methods) - 1) / 2) * width, means, width, label=m)
    ax.set_xticks(np.arange(len(groups)), [f"{st}\n{s}" for s, st in groups], fontsize=7)
    ax.set_ylabel(f"Dice after click {click}")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(rows: list[dict], out_dir: str | Path, meta: dict, budget: int) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "summary": out / "summary.md", "plot": out / "dice_vs_clicks.png"}
    write_csv(rows, paths["csv"])
    paths["summary"].write_text(summary_markdown(rows, meta, budget))
    plot_dice_vs_clicks(rows, paths["plot"], meta.get("protocol", ""))
    return paths
