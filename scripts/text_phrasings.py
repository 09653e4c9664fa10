"""The command `sam3d-text-phrasings` (its code: lib/sam3d/cli/text_phrasings.py)."""

from sam3d.cli.text_phrasings import main

if __name__ == "__main__":
    raise SystemExit(main())
