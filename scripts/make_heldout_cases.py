"""The command `sam3d-make-heldout-cases` (its code: lib/sam3d/cli/make_heldout_cases.py)."""

from sam3d.cli.make_heldout_cases import main

if __name__ == "__main__":
    raise SystemExit(main())
