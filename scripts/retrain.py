"""The command `sam3d-retrain` (its code: lib/sam3d/cli/retrain.py)."""

from sam3d.cli.retrain import main

if __name__ == "__main__":
    raise SystemExit(main())
