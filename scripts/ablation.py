"""`python scripts/ablation.py ARGS` = `sam3d-ablation ARGS`: the command lives in lib/sam3d/cli/ablation.py (`--help`)."""
from sam3d.cli.ablation import main

if __name__ == "__main__":
    raise SystemExit(main())
