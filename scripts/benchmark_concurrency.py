"""The command `sam3d-benchmark-concurrency` (its code: lib/sam3d/cli/benchmark_concurrency.py)."""

from sam3d.cli.benchmark_concurrency import main

if __name__ == "__main__":
    raise SystemExit(main())
