"""Copy a training run's checkpoint to where a model config serves it, optionally as float16.

    python scripts/export_weights.py runs/sam3d_default_cpu/model.safetensors models/sam3d_small.safetensors --half

Writes DST (safetensors) and its sidecar DST.yaml (the network, plus the run's step and recipe), each replaced
atomically, so a running server never reads half a file. Prints the largest difference of the logits of the
exported model from the source's on a random window and clicks, or random slices for 3D-SAutoMed (the cost of
float16). With --state, SRC is a run's state.pt and DST the small resume state a recipe's `resume_from` names
(`sam3d.training.resume_state`):

    python scripts/export_weights.py runs/autosam3d_synth/state.pt models/autosam3d.state.pt --state
"""

import argparse
import sys

import torch
import yaml


@torch.no_grad()
def probe(model) -> torch.Tensor:
    """Logits on a seeded random input: a window and three clicks, or three slices for the slice model (auto)."""
    torch.manual_seed(0)
    s = model.img_size
    if hasattr(model, "encode_image"):
        pts = (torch.rand(1, 3, 3) * (s - 1), torch.tensor([[1, 1, 0]]))
        return model.decode(model.encode_image(torch.randn(1, 1, s, s, s)), points=pts)[0]
    feats = model.encode(torch.randn(3, 1, s, s))
    return model.step(feats[:1], feats[1:2], feats[2:], model.initial_history(1))["logits"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--half", action="store_true", help="store floating-point weights as float16")
    ap.add_argument("--state", action="store_true", help="SRC is a run's state.pt: write its compact resume state")
    args = ap.parse_args(argv)

    from pathlib import Path

    from sam3d.engine import load_model, save_checkpoint
    from sam3d.engine.checkpoint import atomic_write
    from sam3d.training.resume_state import compact_state

    if args.state:
        state = compact_state(torch.load(args.src, map_location="cpu", weights_only=True))
        atomic_write(Path(args.dst), lambda tmp: torch.save(state, tmp))
        print(f"{args.dst}: step {state['step']}, {Path(args.dst).stat().st_size / 2**20:.1f} MiB")
        return 0

    src = Path(args.src)
    side = yaml.safe_load(src.with_suffix(".yaml").read_text())
    loaded = load_model({"checkpoint": str(src)})
    save_checkpoint(loaded.model, args.dst, side, half=args.half)
    exported = load_model({"checkpoint": args.dst}).model
    a, b = probe(loaded.model), probe(exported)
    agree = float(((a > 0) == (b > 0)).float().mean())
    print(
        f"{args.dst}: step {side.get('step')}, max |logit diff| {float((a - b).abs().max()):.2e}, "
        f"sign agreement {agree:.6f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
