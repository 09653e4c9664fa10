"""The command `sam3d-fit-familiarity` (its code: lib/sam3d/cli/fit_familiarity.py)."""

from sam3d.cli.fit_familiarity import main

if __name__ == "__main__":
    raise SystemExit(main())
