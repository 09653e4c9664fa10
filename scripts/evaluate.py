"""`python scripts/evaluate.py ARGS` = `sam3d-evaluate ARGS`: the command lives in lib/sam3d/cli/evaluate.py (`--help`)."""
from sam3d.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
