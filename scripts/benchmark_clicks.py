"""The command `sam3d-benchmark-clicks` (its code: lib/sam3d/cli/benchmark_clicks.py)."""

from sam3d.cli.benchmark_clicks import main

if __name__ == "__main__":
    raise SystemExit(main())
