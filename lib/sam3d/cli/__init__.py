"""The project's command lines, one module per command, each with `main(argv=None) -> int`.

Installed as `[project.scripts]` entry points (`sam3d-train`, `sam3d-evaluate`, ...: pyproject.toml); the files
in `scripts/` run the same `main` (`python scripts/train.py ...` = `sam3d-train ...`), and so does
`python -m sam3d.cli.<name>`. Their defaults (configs/, runs/, ../shared/data) are the project's folders: the
package is installed editable from the checkout (`pip install -e .`, scripts/setup.sh).
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[3]  # the checkout: lib/sam3d/cli/__init__.py -> the project root
