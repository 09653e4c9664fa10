"""The command `sam3d-ablation` (its code: lib/sam3d/cli/ablation.py)."""

from sam3d.cli.ablation import main

if __name__ == "__main__":
    raise SystemExit(main())
