"""Copy a training run's checkpoint to where a model config serves it, optionally as float16.

    python scripts/export_weights.py runs/sam3d_default_cpu/model.safetensors models/sam3d_small.safetensors --half

Writes DST (safetensors) and its sidecar DST.yaml (the network, plus the run's step and recipe), each replaced
atomically, so a running server never reads half a file. Prints the largest difference of the low-res logits
of the exported model from the source's on a random window and clicks (the cost of float16).
"""

import argparse
import sys

import torch
import yaml


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--half", action="store_true", help="store floating-point weights as float16")
    args = ap.parse_args(argv)

    from pathlib import Path

    from sam3d.engine import load_model, save_checkpoint

    src = Path(args.src)
    side = yaml.safe_load(src.with_suffix(".yaml").read_text())
    loaded = load_model({"checkpoint": str(src)})
    save_checkpoint(loaded.model, args.dst, side, half=args.half)
    exported = load_model({"checkpoint": args.dst}).model
    torch.manual_seed(0)
    x = torch.randn(1, 1, loaded.model.img_size, *(loaded.model.img_size,) * 2)
    pts = (torch.rand(1, 3, 3) * (loaded.model.img_size - 1), torch.tensor([[1, 1, 0]]))
    with torch.no_grad():
        a, _ = loaded.model.decode(loaded.model.encode_image(x), points=pts)
        b, _ = exported.decode(exported.encode_image(x), points=pts)
    agree = float(((a > 0) == (b > 0)).float().mean())
    print(f"{args.dst}: step {side.get('step')}, max |logit diff| {float((a - b).abs().max()):.2e}, "
          f"sign agreement {agree:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
