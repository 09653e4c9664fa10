"""`python scripts/make_sample_datastore.py ARGS` = `sam3d-make-sample-datastore ARGS`: the command lives in lib/sam3d/cli/make_sample_datastore.py (`--help`)."""
from sam3d.cli.make_sample_datastore import main

if __name__ == "__main__":
    raise SystemExit(main())
