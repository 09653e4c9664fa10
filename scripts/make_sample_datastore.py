"""The command `sam3d-make-sample-datastore` (its code: lib/sam3d/cli/make_sample_datastore.py)."""

from sam3d.cli.make_sample_datastore import main

if __name__ == "__main__":
    raise SystemExit(main())
