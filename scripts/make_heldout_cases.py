"""`python scripts/make_heldout_cases.py ARGS` = `sam3d-make-heldout-cases ARGS`: the command lives in lib/sam3d/cli/make_heldout_cases.py (`--help`)."""
from sam3d.cli.make_heldout_cases import main

if __name__ == "__main__":
    raise SystemExit(main())
