"""`python scripts/benchmark_concurrency.py ARGS` = `sam3d-benchmark-concurrency ARGS`: the command lives in lib/sam3d/cli/benchmark_concurrency.py (`--help`)."""
from sam3d.cli.benchmark_concurrency import main

if __name__ == "__main__":
    raise SystemExit(main())
