"""The command `sam3d-air-clicks` (its code: lib/sam3d/cli/air_clicks.py)."""

from sam3d.cli.air_clicks import main

if __name__ == "__main__":
    raise SystemExit(main())
