"""Measure the slices an auto model was trained on and store what they look like in its checkpoint.

    python scripts/fit_familiarity.py --model autosam3d --recipe configs/train/autosam3d_synth.yaml \\
        --check ../shared/data/totalseg_mr runs/heldout/brain_atlas sample-data/brain-mr

The slices are those the model trained on: `--recipe` draws `--samples` of them as the recipe's training does
(synthesised images too; volumes without any of the model's classes, the negatives, left out), `--data` takes
every slice of real volumes through the auto engine exactly as a request does (model grid, intensity window).
Their encoder features give the mean, spread and threshold of `sam3d.engine.familiarity`, written into the
checkpoint's config (the weights are untouched). `--check` prints, for other volumes, how many of their
slices would be labelled and what the engine answers with the measure (voxels labelled and confidence per class, or
refused): the scans the model should know, and those it should answer nothing for. `--dry-run` writes nothing.
"""

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.cases import find_cases
from ..engine.auto import auto_engine_from_config
from ..engine.checkpoint import update_saved_config
from ..engine.errors import Sam3DInputError
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


def recipe_slices(recipe_path: str, engine, samples: int) -> torch.Tensor:
    """(N, 1, S, S): slice t of the recipe's first `samples` training samples, from its volumes that hold a class."""
    from ..data.training import load_volumes
    from ..training import load_recipe
    from ..training.auto_step import HALF, auto_dataset
    from ..training.trainer import _resolve_data

    recipe = load_recipe(recipe_path)
    seed = int(recipe.get("seed", 0))
    volumes = load_volumes(_resolve_data(recipe["data"], REPO), engine.config.spacing, seed)
    dataset = auto_dataset(volumes, engine.config, engine.model, recipe, REPO, seed)
    dataset.keep_only([v.name for v in dataset.items if len(v.fg_slices)])
    return torch.stack([dataset[i]["image"][HALF : HALF + 1] for i in tqdm(range(samples), desc="training slices")])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="autosam3d", help="auto model config (configs/models name or YAML)")
    ap.add_argument("--checkpoint", help="its weights, if not the config's")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--recipe", help="the training recipe: measure slices drawn as it trains")
    source.add_argument("--data", help="case folder of the volumes the model trained on")
    ap.add_argument("--samples", type=int, default=1024, help="--recipe: slices to draw")
    ap.add_argument("--cases", nargs="*", help="only these cases of --data")
    ap.add_argument("--margin", type=float, default=1.3, help="threshold: the farthest training slice times this")
    ap.add_argument("--check", nargs="*", default=[], help="case folders or image folders to report on")
    ap.add_argument("--dry-run", action="store_true", help="report only; leave the checkpoint as it is")
    args = ap.parse_args(argv)

    cfg = load_model_config(args.model, REPO / "configs", args.checkpoint)
    engine = auto_engine_from_config(cfg)

    def points(image: str) -> torch.Tensor:
        return slice_points(engine.encode(engine.prepare(image)[2]))

    if args.recipe:
        slices = recipe_slices(args.recipe, engine, args.samples)
        fam = Familiarity.fit(slice_points(engine.encode(slices)), args.margin)
    else:
        training = _images(args.data, args.cases)
        if not training:
            ap.error(f"no volumes in {args.data}" + (f" named {args.cases}" if args.cases else ""))
        fam = Familiarity.fit(torch.cat([points(image) for _, image in training]), args.margin)
    print(f"{fam.slices} training slices; threshold {fam.threshold:.3f}")
    engine.familiarity = fam  # the answers below are those the checkpoint will give
    for folder in args.check:
        for name, image in _images(folder):
            d = fam.distances(points(image))
            familiar = int((d <= fam.threshold).sum())
            try:
                res = engine.segment(image)
                answer = f"{sum(res.info['voxels'].values()):,} voxels labelled {res.info['confidence']}"
            except Sam3DInputError:
                answer = "refused"
            print(f"  {name}: {familiar} of {len(d)} slices familiar (median distance {d.median():.2f}); {answer}")
    if not args.dry_run:
        update_saved_config(engine.checkpoint, {"familiarity": fam.to_dict()})
        print(f"written into {engine.checkpoint} and its .yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
