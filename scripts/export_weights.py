"""`python scripts/export_weights.py ARGS` = `sam3d-export-weights ARGS`: the command lives in lib/sam3d/cli/export_weights.py (`--help`)."""
from sam3d.cli.export_weights import main

if __name__ == "__main__":
    raise SystemExit(main())
