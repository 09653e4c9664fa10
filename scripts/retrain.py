"""`python scripts/retrain.py ARGS` = `sam3d-retrain ARGS`: the command lives in lib/sam3d/cli/retrain.py (`--help`)."""
from sam3d.cli.retrain import main

if __name__ == "__main__":
    raise SystemExit(main())
