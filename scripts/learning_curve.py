"""`python scripts/learning_curve.py ARGS` = `sam3d-learning-curve ARGS`: the command lives in lib/sam3d/cli/learning_curve.py (`--help`)."""
from sam3d.cli.learning_curve import main

if __name__ == "__main__":
    raise SystemExit(main())
