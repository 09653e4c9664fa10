"""The command `sam3d-benchmark` (its code: lib/sam3d/cli/benchmark.py)."""

from sam3d.cli.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
