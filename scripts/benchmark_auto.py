"""The command `sam3d-benchmark-auto` (its code: lib/sam3d/cli/benchmark_auto.py)."""

from sam3d.cli.benchmark_auto import main

if __name__ == "__main__":
    raise SystemExit(main())
