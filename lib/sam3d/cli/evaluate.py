"""Interactive-segmentation accuracy with simulated clicks: a model (or a server) beside a baseline without weights.

    python scripts/evaluate.py --model sam3d_small --checkpoint models/sam3d_small.safetensors \\
        --data ../shared/data/totalseg_ct --labels 1,2,3,5,52 --clicks 10 --out runs/eval

--data is one case folder (image.* + label.* + optional names file) or a folder of them. Every label value
(or those --labels selects, by value or name) is one target. --model is a name in configs/models, a model YAML,
or `baseline` (only the weight-free baseline). The baseline (scikit-image random walker) runs beside the model
with the same protocol and seeds unless --no-baseline. --server URL measures a running sam3d MONAI Label server
(task --server-model) instead of the library.

Writes OUT/results.csv, OUT/summary.md, OUT/dice_vs_clicks.png and, with --save-masks, OUT/masks/<method>/<case>/
<value>_<name>.nii.gz (the mask after the last click). See lib/sam3d/evaluation/ and lib/sam3d/data/clicks.py
for the protocols, metrics and baseline.
"""

import argparse
import datetime
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from sam3d.data.cases import find_cases
from sam3d.data.clicks import PROTOCOLS
from sam3d.evaluation import (
    ClicksOnlySegmenter,
    EvalConfig,
    RandomWalkerSegmenter,
    ServerSegmenter,
    load_model_config,
    run_evaluation,
    segmenter_from_config,
    write_report,
)

from . import REPO
from .provenance import command_line, cpu_model, git_commit

# what an evaluation runs: a commit stamp is flagged when any of it has uncommitted changes
EVALUATED_CODE = [
    "lib/sam3d/evaluation",
    "lib/sam3d/data",
    "lib/sam3d/engine",
    "lib/sam3d/models",
    "configs/models",
    "lib/sam3d/cli/evaluate.py",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="configs/models name (sam3d_small, sam_med3d_turbo), a model YAML, or baseline")
    p.add_argument("--checkpoint", help="weights; overrides the model config's checkpoint")
    p.add_argument("--data", required=True, help="a case folder or a folder of case folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--clicks", type=int, default=10, help="click budget (iterations) per target (default 10)")
    p.add_argument(
        "--protocol",
        choices=(*PROTOCOLS, "text"),
        default="center",
        help="click protocol (default center); text: the structure's name first (a RefSAM3D model), then center clicks",
    )
    p.add_argument("--labels", nargs="*", help="label values or names (comma or space separated; default all)")
    p.add_argument("--names-key", help="table of a label_names.json with several (e.g. total_mr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--near-mm", type=float, default=10.0, help="noisy1/noisy2: band around the target (mm)")
    p.add_argument("--box-jitter-mm", type=float, default=0.0, help="box: each face moved by up to this (mm)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument(
        "--prior",
        choices=("perturbed",),
        help="start each target from the reference, perturbed (a mask to correct); the first click corrects it",
    )
    p.add_argument("--no-baseline", action="store_true", help="do not run the random-walker baseline")
    p.add_argument("--save-masks", action="store_true", help="write the last mask of every target")
    p.add_argument("--server", metavar="URL", help="evaluate a running sam3d MONAI Label server instead")
    p.add_argument("--server-model", default="sam3d_point", help="the server's infer task (default sam3d_point)")
    p.add_argument(
        "--server-upload",
        choices=("missing", "always", "never"),
        default="missing",
        help="upload images missing from the datastore (default), always, or never",
    )
    p.add_argument("--note", action="append", default=[], help="a line for summary.md (repeatable)")
    p.add_argument("--configs", default=str(REPO / "configs"), help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not args.server and not args.model:
        p.error("give --model (a model name, a YAML, or baseline) or --server URL")
    if args.clicks < 1:
        p.error("--clicks must be at least 1")
    if args.model == "baseline" and args.no_baseline and not args.server:
        p.error("--model baseline with --no-baseline leaves nothing to evaluate")
    if args.prior and (args.server or args.model == "baseline" or not args.no_baseline):
        p.error("--prior needs a library point model and --no-baseline: the random walker and a server take no mask")
    if args.prior and args.protocol in ("text", "box"):
        p.error(f"--prior starts from a mask and corrects it with clicks; protocol {args.protocol} starts from nothing")
    return args


def _device(name: str) -> str:
    import torch

    name = name.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this machine has no CUDA device")
    return name


def _hardware(device: str) -> str:
    import torch

    hw = f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    if device.startswith("cuda"):
        hw += f"; GPU {torch.cuda.get_device_name(torch.device(device))}"
    return hw


def _software() -> str:
    import monai
    import skimage
    import torch

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, MONAI {monai.__version__}, "
        f"scikit-image {skimage.__version__}"
    )


def build_segmenters(args, device: str) -> list:
    segmenters = []
    if args.server:
        segmenters.append(
            ServerSegmenter(
                args.server, args.server_model, upload=args.server_upload, send_text=args.protocol == "text"
            )
        )
    elif args.model != "baseline":
        from sam3d.engine import WeightsMissingError

        cfg = load_model_config(args.model, args.configs, args.checkpoint)
        try:
            segmenters.append(segmenter_from_config(cfg, device=device, name=cfg.get("name"), protocol=args.protocol))
        except WeightsMissingError as e:
            raise SystemExit(
                f"error: model {args.model!r} has no weights: {e}.\n"
                f"No trained weights ship with sam3d: pass --checkpoint PATH (a .safetensors with its .yaml, or a "
                f"SAM-Med3D .pth), or run only the weight-free baseline with --model baseline."
            ) from None
    if not args.no_baseline or args.model == "baseline":
        baseline = RandomWalkerSegmenter()
        segmenters.append(ClicksOnlySegmenter(baseline) if args.protocol == "text" else baseline)
    return segmenters


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = _device(args.device)
    cases = find_cases(args.data, names_key=args.names_key)
    segmenters = build_segmenters(args, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = EvalConfig(
        protocol=args.protocol,
        clicks=args.clicks,
        seed=args.seed,
        labels=args.labels or None,
        near_mm=args.near_mm,
        box_jitter_mm=args.box_jitter_mm,
        save_masks=out / "masks" if args.save_masks else None,
        prior=args.prior,
    )
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    try:
        rows = run_evaluation(cases, segmenters, config, progress=not args.quiet)
    finally:
        for seg in segmenters:
            if hasattr(seg, "close"):
                seg.close()
    wall = time.perf_counter() - t0
    if not rows:
        raise SystemExit("error: nothing evaluated (no selected label is present in any case)")
    protocol = f"{args.protocol}, {args.clicks} clicks, seed {args.seed}"
    if args.protocol in ("noisy1", "noisy2"):
        protocol += f", near band {args.near_mm:g} mm"
    if args.protocol == "box":
        protocol += f", box jitter {args.box_jitter_mm:g} mm"
    if args.prior:
        first = {(r["case"], r["label"]): r["prior_dice"] for r in rows}
        protocol += f", from the reference perturbed (mean Dice {np.mean(list(first.values())):.3f}) as a prior"
    meta = {
        "command": command_line("evaluate", argv),
        "commit": git_commit(EVALUATED_CODE),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": _hardware(device) + f"; device {device}",
        "software": _software(),
        "data": f"{args.data} ({len(cases)} case(s): {', '.join(c.name for c in cases)})",
        "protocol": protocol,
        "wall time": f"{wall:.1f} s",
        "methods": {s.name: s.describe() for s in segmenters},
        "notes": args.note,
    }
    paths = write_report(rows, out, meta, args.clicks)
    print(f"{len(rows)} rows in {wall:.1f} s -> {paths['csv']}, {paths['summary']}, {paths['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
