"""Time per volume of `sam3d_auto` (3D-SAutoMed): a NIfTI path in, the label volume of every class on its grid out.

For each preset, device and image it runs `sam3d.engine.auto.AutoEngine.segment` with its answer cache off and
reports the median (min) wall time of the whole volume and its parts: load (read, reorient, resample to the model
grid), encode (the slice encoder over every slice), decode (the slice steps: local attention, box generator,
history, decoder), resample (back to the image's grid). The model grid comes from the model config (spacing,
intensity window, slice order); weights are the given checkpoint's, else random (the time does not depend on them).

    python scripts/benchmark_auto.py --device cpu --threads 2 --out BENCHMARKS.md
    python scripts/benchmark_auto.py --presets autosam3d_small autosam3d_vit_b --device cuda --out BENCHMARKS.md

prints a markdown table and, with --out, appends it under a header with the command, commit, hardware and date.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sam3d.engine import EngineConfig, LoadedModel, load_model
from sam3d.engine.auto import AutoEngine
from sam3d.engine.image_session import ImageSession
from sam3d.engine.model_config import load_model_config
from sam3d.models import AUTOSAM3D_PRESETS, build_network

from . import REPO
from .provenance import report_header

DATA = REPO.parent / "shared" / "data"
IMAGES = [DATA / "totalseg_ct" / "image.nii.gz", DATA / "totalseg_mr" / "image.nii.gz"]
TIMED_CODE = ["lib/sam3d/models/autosam3d", "lib/sam3d/engine", "lib/sam3d/cli/benchmark_auto.py"]
PARTS = ("load", "encode", "decode", "resample")


def model_for(preset: str, checkpoint: Path | None) -> tuple[LoadedModel, str]:
    if checkpoint is not None:
        loaded = load_model({"checkpoint": str(checkpoint)})
        return loaded, f"{checkpoint.name} ({loaded.display_name})"
    torch.manual_seed(0)
    return LoadedModel(build_network(preset).eval(), None, None, preset), f"{preset} (random weights)"


def time_volume(engine: AutoEngine, image: Path, runs: int, warmup: int, desc: str) -> tuple[list[float], dict]:
    totals, parts = [], {k: [] for k in PARTS}
    for i in tqdm(range(warmup + runs), desc=desc, leave=False):
        t = time.perf_counter()
        res = engine.segment(str(image))
        if i >= warmup:
            totals.append(time.perf_counter() - t)
            for k in PARTS:
                parts[k].append(res.timings[k])
    return totals, parts


def _s(ts: list[float]) -> str:
    return f"{statistics.median(ts):.2f} s ({min(ts):.2f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        default="autosam3d",
        help="model config (name in configs/models or YAML path): the "
        "grid, intensity window and slice order (default autosam3d)",
    )
    p.add_argument("--presets", nargs="+", choices=sorted(AUTOSAM3D_PRESETS), default=["autosam3d_small"])
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="trained weights instead of random ones (their network replaces --presets)",
    )
    p.add_argument("--images", nargs="+", type=Path, default=IMAGES)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="append the report to this markdown file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    missing = [str(i) for i in args.images if not i.exists()]
    if missing:
        p.error(f"image not found: {', '.join(missing)}")
    mc = load_model_config(args.model, REPO / "configs")
    config = EngineConfig.from_dict({**mc, "cache_mb": 0})  # every run computes the volume again

    rows = []
    for preset in [None] if args.checkpoint else args.presets:
        loaded, name = model_for(preset, args.checkpoint)
        engine = AutoEngine(
            loaded, config, device=device, order=mc.get("order", "middle"), encode_batch=int(mc.get("encode_batch", 8))
        )
        for image in args.images:
            label = f"{image.name} (DICOM)" if image.is_dir() else f"{image.parent.name}/{image.name}"
            sess = ImageSession(str(image), config.spacing, config.max_voxels)
            totals, parts = time_volume(engine, image, args.runs, args.warmup, f"{name} {label}")
            split = ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in parts.items())
            grid = "x".join(map(str, sess.volume.shape))
            rows.append(
                f"| {name} | {device} | {label}: {'x'.join(map(str, sess.shape))} "
                f"-> {grid} ({sess.volume.shape[2]} slices) | **{_s(totals)}** | {split} |"
            )
    table = "\n".join(
        [
            f"Time per volume of `sam3d_auto` (model config `{args.model}`: {config.spacing[0]:g} mm grid, order "
            f"{mc.get('order', 'middle')}), median (min) of {args.runs} runs after {args.warmup} warm-up, float32:",
            "",
            "| weights | device | image -> model grid | **per volume** | split (s) |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(table)
    if args.out:
        gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
        with open(args.out, "a") as f:
            f.write("\n" + report_header("benchmark_auto", TIMED_CODE, gpu) + "\n\n" + table)
        print(f"appended to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
