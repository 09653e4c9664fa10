"""Does the way a structure is named change the answer? One text model, one structure, many phrasings.

For every case in --data holding the structure, each phrasing goes through the text engine's `segment_text` (the
text alone, no click; RefSAM3D's `TextEngine` or the `NamedClassEngine` of autosam3d_text) and its mask is scored
against the reference: Dice, HD95, the trained name the text was matched to and how close it was (a name the
model refuses: an empty mask, "refused" and the closest class). Phrasings: the label's every template and synonym
(`sam3d.text.prompt_variants`, what training draws from), its dataset code, and any --text given (e.g. an
unrelated structure, to see the gate).

    python scripts/text_phrasings.py --model refsam3d --data runs/heldout_ct --label liver --out runs/phrasings

writes phrasings.csv, phrasings.md (with the command, commit, hardware and date) and phrasings.png.
"""

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sam3d.data.cases import find_cases, load_case, parse_label_selection
from sam3d.engine import Sam3DInputError
from sam3d.engine.model_config import load_model_config
from sam3d.metrics import segmentation_metrics
from sam3d.predictor import load_engine
from sam3d.text import normalize_prompt, prompt_variants

from . import REPO
from .provenance import report_header

TIMED_CODE = ["lib/sam3d/engine", "lib/sam3d/models", "lib/sam3d/text", "lib/sam3d/cli/text_phrasings.py"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="refsam3d", help="a configs/models name or YAML (default refsam3d)")
    p.add_argument("--checkpoint", help="weights; overrides the model config's checkpoint")
    p.add_argument("--data", required=True, help="a case folder or a folder of case folders")
    p.add_argument("--label", required=True, help="the structure: a label name or value of the cases")
    p.add_argument("--text", action="append", default=[], help="one more phrasing (repeatable)")
    p.add_argument("--names-key", help="table of a label_names.json with several (e.g. total_mr)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--configs", default=str(REPO / "configs"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def phrasings(name: str) -> list[str]:
    """Every phrasing of a label name that training draws from, and the dataset code itself."""
    return list(dict.fromkeys([*prompt_variants(name), name]))


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    texts = list(dict.fromkeys(r["text"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(texts) * len(cases) + 1.5))
    height = 0.8 / len(cases)
    for k, case in enumerate(cases):
        dice = {r["text"]: r["dice"] for r in rows if r["case"] == case}
        ax.barh(np.arange(len(texts)) + k * height, [dice.get(t, np.nan) for t in texts], height, label=case)
    ax.set_yticks(np.arange(len(texts)) + 0.4 - height / 2, texts, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("Dice, text alone")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = load_engine(load_model_config(args.model, args.configs, args.checkpoint), kind="text")
    rows = []
    for case in find_cases(args.data, args.names_key):
        try:
            (value,) = parse_label_selection([args.label], case.names)
        except ValueError:
            continue
        loaded = load_case(case)
        reference = loaded.label == value
        if not reference.any():
            continue
        name = case.label_name(value)
        variants = phrasings(name)
        for text in tqdm(list(dict.fromkeys(variants + args.text)), desc=case.name):
            try:
                res = engine.segment_text(str(case.image), text)
                mask, info, seconds = res.mask > 0, res.info, res.timings.get("total")
            except Sam3DInputError:  # a name the model does not know (sam3d.engine.named_class refuses it)
                closest, _, similarity = engine.closest_class(normalize_prompt(text))
                info = {"closest_name": f"refused (closest: {closest})", "text_similarity": similarity}
                mask, seconds = np.zeros_like(reference), None
            m = segmentation_metrics(mask, reference, loaded.spacing)
            rows.append(
                {
                    "case": case.name,
                    "label": name,
                    "text": text,
                    "kind": "name" if text in variants else "extra",
                    "dice": m["dice"],
                    "hd95": m["hd95"],
                    "closest_name": info.get("closest_name"),
                    "similarity": info.get("text_similarity"),
                    "score": info.get("score"),
                    "seconds": seconds,
                }
            )
    if not rows:
        raise SystemExit(f"no case in {args.data} holds a label {args.label!r}")
    with open(out / "phrasings.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    title = f"{engine.model_name}: '{args.label}' phrased {len(set(r['text'] for r in rows))} ways"
    plot(rows, out / "phrasings.png", title)
    lines = [
        report_header("text_phrasings", TIMED_CODE),
        "",
        f"* model: {engine.model_name} ({engine.checkpoint})",
        "",
        "| case | text | Dice | HD95 (mm) | matched name (similarity) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        sim = f"{r['similarity']:.2f}" if r["similarity"] is not None else "-"
        lines.append(f"| {r['case']} | {r['text']} | {r['dice']:.3f} | {r['hd95']:.1f} | {r['closest_name']} ({sim}) |")
    for case in dict.fromkeys(r["case"] for r in rows):
        dice = np.array([r["dice"] for r in rows if r["case"] == case and r["kind"] == "name"])
        lines.append(
            f"\n{case}: Dice over the {len(dice)} phrasings of the name (not the --text extras): mean "
            f"{dice.mean():.3f}, min {dice.min():.3f}, max {dice.max():.3f}"
        )
    (out / "phrasings.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
