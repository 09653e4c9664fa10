"""Validation Dice against samples seen, for one or more training runs (their `val.csv` and `recipe.yaml`).

    python scripts/plot_training.py runs/cand_segresnet runs/cand_dynunet runs/cand_sam3d_small \\
        --out docs/benchmarks/clicknet_candidates.png

Writes the plot (Dice after the first and after the last validation click, one colour per run) and prints a
markdown table of each run's validations (step, samples seen, Dice per click).
"""

import argparse
import csv
import sys
from pathlib import Path

import yaml


def read_run(folder: Path) -> tuple[int, list[dict]]:
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text()) or {}
    batch = int((recipe.get("train") or {}).get("batch_size", 1))
    rows = list(csv.DictReader(open(folder / "val.csv"))) if (folder / "val.csv").is_file() else []
    return batch, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="PNG path")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    table = []
    for i, folder in enumerate(args.runs):
        batch, rows = read_run(folder)
        if not rows:
            print(f"{folder}: no validation yet", file=sys.stderr)
            continue
        clicks = sorted(int(k.split("_")[1]) for k in rows[0] if k.startswith("dice_"))
        samples = [int(r["step"]) * batch for r in rows]
        colour = f"C{i}"
        ax.plot(samples, [float(r["dice_1"]) for r in rows], "--o", color=colour, label=f"{folder.name}: 1 click")
        ax.plot(
            samples,
            [float(r[f"dice_{clicks[-1]}"]) for r in rows],
            "-o",
            color=colour,
            label=f"{folder.name}: {clicks[-1]} clicks",
        )
        for r, n in zip(rows, samples):
            table.append(
                f"| {folder.name} | {r['step']} | {n} | "
                + " | ".join(f"{float(r[f'dice_{c}']):.3f}" for c in clicks)
                + " |"
            )
    ax.set_xlabel("training samples seen")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print("| run | step | samples | " + " | ".join(f"Dice@{c}" for c in clicks) + " |")
    print("|---|---|---|" + "---|" * len(clicks))
    print("\n".join(table))
    print(f"\nplot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
