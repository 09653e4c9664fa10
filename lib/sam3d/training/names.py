"""The label names a recipe's cases carry, for the steps that need them (text prompts, automatic classes)."""

from pathlib import Path

from ..data.cases import find_cases, names_in
from ..data.training import label_map_sources
from ..text.variants import NAME_TABLES


def case_names(recipe: dict, root: Path) -> dict[str, dict[int, str]]:
    """case -> {label value: name} for the recipe's case folder and its label maps (a names file beside the map),
    with `text.names` filling in or overriding."""
    data, overrides = recipe.get("data") or {}, (recipe.get("text") or {}).get("names") or {}
    out = {}
    if data.get("dir"):
        folder = Path(str(data["dir"])).expanduser()
        for case in find_cases(folder if folder.is_absolute() else root / folder):
            out[case.name] = dict(case.names)
    maps = {k: v if Path(str(v)).is_absolute() else root / str(v) for k, v in (data.get("label_maps") or {}).items()}
    for name, path in label_map_sources(maps):
        found = names_in([Path(path).parent], name)
        if found:
            out[name] = found
    for case, table in overrides.items():
        if isinstance(table, str):
            if table not in NAME_TABLES:
                raise ValueError(f"text.names.{case}: unknown table {table!r}; known: {sorted(NAME_TABLES)}")
            table = NAME_TABLES[table]
        out[case] = {int(k): str(v) for k, v in table.items()}
    return out
