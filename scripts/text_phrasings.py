"""`python scripts/text_phrasings.py ARGS` = `sam3d-text-phrasings ARGS`: the command lives in lib/sam3d/cli/text_phrasings.py (`--help`)."""
from sam3d.cli.text_phrasings import main

if __name__ == "__main__":
    raise SystemExit(main())
