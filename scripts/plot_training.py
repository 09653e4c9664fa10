"""The command `sam3d-plot-training` (its code: lib/sam3d/cli/plot_training.py)."""

from sam3d.cli.plot_training import main

if __name__ == "__main__":
    raise SystemExit(main())
