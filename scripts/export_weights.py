"""The command `sam3d-export-weights` (its code: lib/sam3d/cli/export_weights.py)."""

from sam3d.cli.export_weights import main

if __name__ == "__main__":
    raise SystemExit(main())
