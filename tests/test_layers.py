"""The house's layers import only downwards (README, "Design"), so a new model family touches one row per layer."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lib" / "sam3d"
# bottom to top; a layer imports its own and lower layers only
LAYERS = [{"models", "text", "metrics"}, {"engine"}, {"data", "predictor"}, {"training"}, {"monailabel"}]
LAYERS += [{"evaluation"}, {"cli"}]
REEXPORTED = {"Sam3DPredictor": "predictor"}


def _layer(top: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _sam3d_imports(path: Path, package: Path = PACKAGE) -> set[str]:
    """The top-level sam3d packages a module imports (`sam3d.engine.x` and relative imports alike)."""
    here = list(path.relative_to(package).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sam3d.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here[: len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "sam3d":
                parts = node.module.split(".")[1:]
            else:
                continue
            # `from sam3d import Sam3DPredictor` reaches the predictor through the package's __init__
            found |= {parts[0]} if parts else {REEXPORTED.get(a.name, a.name) for a in node.names}
    return found


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        top = parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")
        if top != "__init__":
            yield path, top


def test_every_module_belongs_to_a_layer():
    assert {top for _, top in _modules()} <= set().union(*LAYERS)


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    upward = []
    for path, top in _modules():
        for imported in _sam3d_imports(path) - {top}:
            if _layer(imported) > _layer(top) or (_layer(imported) == _layer(top) and imported != top):
                upward.append(f"{path.relative_to(PACKAGE)} imports sam3d.{imported}")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "sam3d" / "engine" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from ..training import trainer\nfrom sam3d.models import build\n")
    assert _sam3d_imports(bad, tmp_path / "sam3d") == {"training", "models"}
    assert _layer("training") > _layer("engine")
