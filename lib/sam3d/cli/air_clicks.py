"""What a click model answers to a click on air: the mask volume of one positive click outside the body.

    python scripts/air_clicks.py --model clicknet --checkpoint runs/clicknet/model.safetensors

A click on nothing should answer nothing (issue 14: "a small or empty mask, not a slab of the image"). The default
clicks lie in the air around `totalseg_ct`'s body (-1000 HU), each a new click sequence; prints per click the mask's
voxels, its volume in ml and its farthest voxel from the click in mm.
"""

import argparse
import sys

import numpy as np

from . import REPO

AIR_CLICKS = ([3, 3, 56], [118, 97, 56], [61, 97, 10], [3, 97, 100])  # outside totalseg_ct's body
CT = REPO.parent / "shared" / "data" / "totalseg_ct" / "image.nii.gz"


def air_answers(predictor, image: str, clicks=AIR_CLICKS) -> list[dict]:
    """Per click: {"click", "mask", "voxels", "ml", "farthest_mm"} of a new sequence of that one positive click."""
    from sam3d.data.cases import load_array

    spacing = np.linalg.norm(load_array(image)[1][:3, :3], axis=0)  # mm per voxel along i, j, k
    predictor.set_image(str(image))
    out = []
    for click in clicks:
        predictor.reset()
        mask = predictor.predict(points=[click], point_labels=[1])[0] > 0
        far = float(np.sqrt((((np.argwhere(mask) - click) * spacing) ** 2).sum(1)).max()) if mask.any() else 0.0
        n = int(mask.sum())
        ml = n * float(np.prod(spacing)) / 1000
        out.append({"click": list(click), "mask": mask, "voxels": n, "ml": ml, "farthest_mm": far})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="clicknet", help="a point model's config name or YAML")
    ap.add_argument("--checkpoint", help="weights; overrides the model config's")
    ap.add_argument("--image", default=str(CT))
    ap.add_argument("--click", nargs=3, type=int, action="append", metavar=("I", "J", "K"), help="default: 4 in air")
    args = ap.parse_args(argv)

    from sam3d import Sam3DPredictor
    from sam3d.engine.model_config import load_model_config

    predictor = Sam3DPredictor.from_config(load_model_config(args.model, REPO / "configs", args.checkpoint))
    print(f"{predictor.engine.checkpoint}: one positive click each, on {args.image}")
    for a in air_answers(predictor, args.image, args.click or AIR_CLICKS):
        print(f"click {a['click']}: {a['voxels']} voxels, {a['ml']:.1f} ml, farthest {a['farthest_mm']:.0f} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
