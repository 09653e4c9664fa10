"""The command `sam3d-make-curve-domain` (its code: lib/sam3d/cli/make_curve_domain.py)."""

from sam3d.cli.make_curve_domain import main

if __name__ == "__main__":
    raise SystemExit(main())
