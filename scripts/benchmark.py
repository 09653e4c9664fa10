"""`python scripts/benchmark.py ARGS` = `sam3d-benchmark ARGS`: the command lives in lib/sam3d/cli/benchmark.py (`--help`)."""
from sam3d.cli.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
