"""Latency of clicks through the engine, as an annotator meets it: the first click on a fresh image (loading and
resampling included) and every later click of a `center`-protocol sequence on real structures.

    python scripts/benchmark_clicks.py --model clicknet --data ../shared/data/totalseg_ct --labels 1,2,3,5,6,52 \\
        --clicks 5 --threads 2 --out BENCHMARKS.md

Each target gets a fresh predictor (a new engine: nothing cached), so its first click pays for the image; the
next clicks reuse it. Prints (and with --out appends) a markdown table: median and p95 per kind of click.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .provenance import report_header

TIMED_CODE = [
    "lib/sam3d/engine",
    "lib/sam3d/models",
    "lib/sam3d/predictor.py",
    "configs/models",
    "lib/sam3d/cli/benchmark_clicks.py",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="clicknet", help="model config name, YAML or checkpoint")
    ap.add_argument("--data", required=True, help="one case folder (image.* + label.*)")
    ap.add_argument("--labels", nargs="*", help="label values or names (default: all)")
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="append the report to this markdown file")
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    from sam3d import Sam3DPredictor
    from sam3d.data.cases import find_cases, load_case, parse_label_selection
    from sam3d.data.clicks import ClickSimulator

    torch.set_num_threads(args.threads)
    case = find_cases(args.data)[0]
    loaded = load_case(case)
    values = parse_label_selection(args.labels, case.names) or loaded.values()
    header = report_header("benchmark_clicks", TIMED_CODE)  # the load average before the run
    first, later = [], []
    for value in tqdm(values, desc="targets"):
        gt = loaded.label == value
        predictor = Sam3DPredictor.from_pretrained(args.model)
        sim = ClickSimulator("center", seed=int(value), spacing=loaded.spacing)
        points, labels, pred = [], [], None
        for it in range(1, args.clicks + 1):
            prompt = sim.next(gt, pred, it)
            if not prompt:
                break
            points += [p for p, _ in prompt.points]
            labels += [int(pos) for _, pos in prompt.points]
            t = time.perf_counter()
            if it == 1:
                predictor.set_image(str(case.image))
            pred, _ = predictor.predict(points=points, point_labels=labels, label=str(value))
            (first if it == 1 else later).append(time.perf_counter() - t)
    rows = [
        ("first click on a fresh image (load, resample, network)", first),
        ("next click (same image, one more click)", later),
    ]
    table = ["| click | n | median (s) | p95 (s) |", "|---|---|---|---|"]
    table += [f"| {name} | {len(v)} | {np.median(v):.3f} | {np.percentile(v, 95):.3f} |" for name, v in rows if v]
    report = "\n".join(
        [
            header,
            "",
            f"model `{args.model}`, case `{case.name}` ({len(values)} targets, {args.clicks} clicks each, "
            f"`center` protocol), torch threads {args.threads}",
            "",
            *table,
            "",
        ]
    )
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
