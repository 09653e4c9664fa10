"""The command `sam3d-image-dependence` (its code: lib/sam3d/cli/image_dependence.py)."""

from sam3d.cli.image_dependence import main

if __name__ == "__main__":
    raise SystemExit(main())
