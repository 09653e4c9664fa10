"""The command `sam3d-learning-curve` (its code: lib/sam3d/cli/learning_curve.py)."""

from sam3d.cli.learning_curve import main

if __name__ == "__main__":
    raise SystemExit(main())
