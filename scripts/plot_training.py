"""`python scripts/plot_training.py ARGS` = `sam3d-plot-training ARGS`: the command lives in lib/sam3d/cli/plot_training.py (`--help`)."""
from sam3d.cli.plot_training import main

if __name__ == "__main__":
    raise SystemExit(main())
