"""`python scripts/make_dicom_case.py ARGS` = `sam3d-make-dicom-case ARGS`: the command lives in lib/sam3d/cli/make_dicom_case.py (`--help`)."""
from sam3d.cli.make_dicom_case import main

if __name__ == "__main__":
    raise SystemExit(main())
