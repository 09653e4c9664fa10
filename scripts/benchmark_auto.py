"""`python scripts/benchmark_auto.py ARGS` = `sam3d-benchmark-auto ARGS`: the command lives in lib/sam3d/cli/benchmark_auto.py (`--help`)."""
from sam3d.cli.benchmark_auto import main

if __name__ == "__main__":
    raise SystemExit(main())
