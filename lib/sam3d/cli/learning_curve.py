"""Held-out Dice against the number of labelled volumes, as annotators would add them through the server.

    python scripts/learning_curve.py --checkpoint models/sam3d_small.safetensors \\
        --pool ../shared/data --pool-cases totalseg_ct voxelmorph_aseg \\
        --heldout ../shared/data/totalseg_mr --orders random uncertainty --train-param steps=200 \\
        --out runs/learning_curve

Each ordering starts its own `monailabel start_server` from the starting checkpoint (see
sam3d.evaluation.learning_curve). Writes OUT/curve.csv, OUT/learning_curve.png (Dice after 1 and after the last
click, against labelled volumes, one line per ordering) and OUT/summary.md.
"""

import argparse
import csv
import datetime
import os
import sys
import tempfile
from pathlib import Path

from sam3d.data.cases import find_cases
from sam3d.evaluation.learning_curve import CurveConfig, HeldOut, plot_curves, run_order

from . import REPO
from .provenance import command_line, cpu_model, git_commit
from .retrain import parse_param


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="the starting model (.safetensors)")
    ap.add_argument("--model", default="sam3d_small", help="its model config (configs/models name or YAML)")
    ap.add_argument("--pool", required=True, help="case folder(s) whose volumes are labelled one at a time")
    ap.add_argument("--pool-cases", nargs="*", help="only these cases of --pool")
    ap.add_argument(
        "--heldout",
        nargs="+",
        required=True,
        help="case folders measured after each step: the first is the curve's domain, any other is reported beside "
        "it (what fine-tuning may make the model forget)",
    )
    ap.add_argument("--heldout-labels", nargs="*", help="label values or names measured in the first (default all)")
    ap.add_argument(
        "--orders",
        nargs="+",
        default=["random", "uncertainty"],
        help="active-learning strategies; one named again runs again (random: another order), as `random#2`",
    )
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--train-param", action="append", type=parse_param, default=[], help="a train parameter KEY=VALUE")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    pool = [c for c in find_cases(args.pool) if not args.pool_cases or c.name in args.pool_cases]
    if not pool:
        ap.error(f"no pool cases in {args.pool}")
    heldout = [
        HeldOut(Path(h).name, find_cases(h), args.heldout_labels if i == 0 else None)
        for i, h in enumerate(args.heldout)
    ]
    cfg = CurveConfig(
        pool=pool,
        heldout=heldout,
        checkpoint=Path(args.checkpoint).resolve(),
        configs_dir=REPO / "configs",
        model=args.model,
        clicks=args.clicks,
        train_params=dict(args.train_param),
        device=args.device,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.UTC)
    rows = []
    for i, order in enumerate(args.orders):
        repeat = args.orders[:i].count(order)
        with tempfile.TemporaryDirectory(prefix=f"curve_{order}_", dir=out) as work:
            rows += [
                {**r, "order": f"{order}#{repeat + 1}" if repeat else order} for r in run_order(order, cfg, Path(work))
            ]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    plot_curves(rows, out / "learning_curve.png", args.clicks)
    last = f"dice_{args.clicks}"
    lines = [
        "# Learning curve",
        "",
        f"* command: `{command_line('learning_curve', argv)}`",
        f"* commit: {git_commit(['lib/sam3d', 'configs', 'apps'])}",
        f"* date: {started:%Y-%m-%d %H:%M UTC}",
        f"* hardware: {cpu_model()}, {os.cpu_count()} logical CPUs; device {args.device}",
        f"* pool: {', '.join(c.name for c in pool)}; held out: {', '.join(h.name for h in heldout)}",
        "",
        f"| order | labelled | added | Dice@1 | Dice@{args.clicks} |"
        + "".join(f" {h.name} Dice@{args.clicks} |" for h in heldout[1:]),
        "|---|---|---|---|---|" + "---|" * len(heldout[1:]),
    ]
    lines += [
        f"| {r['order']} | {r['labelled']} | {r['added'] or '-'} | {r['dice_1']:.3f} | {r[last]:.3f} |"
        + "".join(f" {r[f'{h.name}.{last}']:.3f} |" for h in heldout[1:])
        for r in rows
    ]
    scored = [r for r in rows if r.get("score_seconds") is not None]
    if scored:
        per_image = sum(r["score_seconds"] for r in scored) / sum(r["scored_images"] for r in scored)
        lines += ["", f"Uncertainty scoring: {per_image:.1f} s per unlabelled image ({len(scored)} scorings)."]
    lines += ["", "![learning curve](learning_curve.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))
    print(f"{len(rows)} points -> {out / 'curve.csv'}, {out / 'learning_curve.png'}, {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
