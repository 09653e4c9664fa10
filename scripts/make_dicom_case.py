"""The command `sam3d-make-dicom-case` (its code: lib/sam3d/cli/make_dicom_case.py)."""

from sam3d.cli.make_dicom_case import main

if __name__ == "__main__":
    raise SystemExit(main())
