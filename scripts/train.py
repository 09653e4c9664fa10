"""`python scripts/train.py ARGS` = `sam3d-train ARGS`: the command lives in lib/sam3d/cli/train.py (`--help`)."""
from sam3d.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
