"""Does a click model look at the image? (`sam3d.evaluation.image_dependence`)

    sam3d-image-dependence runs/clicknet/model.safetensors runs/cand_geodesic/model.safetensors

One `center` click on the training recipe's fixed held-out validation windows (`validation.data`, as the trainer
builds them), answered with the window, with zeros and with noise; prints a markdown table.
"""

import argparse
from dataclasses import replace

import torch
import yaml

from sam3d.data.training import SamplingConfig, WindowDataset, load_volumes
from sam3d.engine import EngineConfig, load_model
from sam3d.engine.interactive import precision_context
from sam3d.evaluation.image_dependence import image_dependence


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--recipe", default="configs/train/clicknet.yaml", help="its validation windows and model config")
    ap.add_argument("--samples", type=int, default=24)
    args = ap.parse_args(argv)
    recipe = yaml.safe_load(open(args.recipe))
    model_cfg = yaml.safe_load(open(recipe["model"]["config"]))
    engine_cfg = EngineConfig.from_dict(model_cfg)
    volumes = load_volumes(recipe["validation"]["data"], engine_cfg.spacing, recipe.get("seed", 0))
    print("| checkpoint | Dice, image | Dice, zeros | Dice, noise | agreement image/zeros |\n|---|---|---|---|---|")
    for path in args.checkpoints:
        model = load_model({**model_cfg, "checkpoint": path}).model
        sampling = replace(
            SamplingConfig.from_dict(recipe.get("sampling")), size=model.img_size, case_weights=None, size_power=0.0
        )  # the trainer's validation windows
        dataset = WindowDataset(volumes, engine_cfg, sampling, seed=recipe.get("seed", 0) + 7919, augment=False)
        r = image_dependence(
            model,
            dataset,
            args.samples,
            engine_cfg.spacing[0],
            precision_context(engine_cfg.precision, torch.device("cpu")),
        )
        print(f"| {path} | {r['real']:.3f} | {r['zeros']:.3f} | {r['noise']:.3f} | {r['agreement']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
