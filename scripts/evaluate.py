"""The command `sam3d-evaluate` (its code: lib/sam3d/cli/evaluate.py)."""

from sam3d.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
