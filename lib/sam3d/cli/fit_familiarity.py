"""Measure the slices an auto model was trained on and store what they look like in its checkpoint.

    python scripts/fit_familiarity.py --model autosam3d --data ../shared/data --cases totalseg_ct \\
        --check ../shared/data/totalseg_mr runs/heldout/brain_atlas sample-data/brain-mr

The training volumes go through the auto engine exactly as a request does (model grid, intensity window, slices,
encoder); their slices' mean features give the mean, spread and threshold of `sam3d.engine.familiarity`, written
into the checkpoint's config (the weights are untouched). `--check` prints, for other volumes, how many of their
slices would be labelled: the scans the model should know, and those it should refuse. `--dry-run` writes nothing.
"""

import argparse
import sys
from pathlib import Path

import torch

from ..data.cases import find_cases
from ..engine.auto import auto_engine_from_config
from ..engine.checkpoint import update_saved_config
from ..engine.familiarity import Familiarity, slice_points
from ..engine.model_config import load_model_config
from . import REPO


def _images(folder: str, names=None) -> list[tuple[str, str]]:
    """(name, image path) of a case folder's cases, or of a folder of NIfTI images (a MONAI Label datastore)."""
    try:
        return [(c.name, str(c.image)) for c in find_cases(folder) if not names or c.name in names]
    except FileNotFoundError:  # no case folders: the images of a datastore
        images = sorted(Path(folder).glob("*.nii*"))
        return [(p.name.split(".")[0], str(p)) for p in images if not names or p.name.split(".")[0] in names]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="autosam3d", help="auto model config (configs/models name or YAML)")
    ap.add_argument("--checkpoint", help="its weights, if not the config's")
    ap.add_argument("--data", required=True, help="case folder of the volumes the model trained on")
    ap.add_argument("--cases", nargs="*", help="only these cases of --data")
    ap.add_argument("--margin", type=float, default=1.3, help="threshold: the farthest training slice times this")
    ap.add_argument("--check", nargs="*", default=[], help="case folders or image folders to report on")
    ap.add_argument("--dry-run", action="store_true", help="report only; leave the checkpoint as it is")
    args = ap.parse_args(argv)

    cfg = load_model_config(args.model, REPO / "configs", args.checkpoint)
    engine = auto_engine_from_config(cfg)
    training = _images(args.data, args.cases)
    if not training:
        ap.error(f"no volumes in {args.data}" + (f" named {args.cases}" if args.cases else ""))

    def points(image: str) -> torch.Tensor:
        return slice_points(engine.encode(engine.prepare(image)[2]))

    fam = Familiarity.fit(torch.cat([points(image) for _, image in training]), args.margin)
    print(f"{fam.slices} training slices of {len(training)} volumes; threshold {fam.threshold:.3f}")
    for folder in args.check:
        for name, image in _images(folder):
            d = fam.distances(points(image))
            familiar = int((d <= fam.threshold).sum())
            print(f"  {name}: {familiar} of {len(d)} slices familiar (median distance {d.median():.2f})")
    if not args.dry_run:
        update_saved_config(engine.checkpoint, {"familiarity": fam.to_dict()})
        print(f"written into {engine.checkpoint} and its .yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
