"""The command `sam3d-train` (its code: lib/sam3d/cli/train.py)."""

from sam3d.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
