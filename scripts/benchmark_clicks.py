"""`python scripts/benchmark_clicks.py ARGS` = `sam3d-benchmark-clicks ARGS`: the command lives in lib/sam3d/cli/benchmark_clicks.py (`--help`)."""
from sam3d.cli.benchmark_clicks import main

if __name__ == "__main__":
    raise SystemExit(main())
