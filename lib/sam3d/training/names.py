"""The label names a recipe's cases carry, for the steps that need them (text prompts, automatic classes)."""

from pathlib import Path

from ..data.cases import find_cases
from ..text.variants import NAME_TABLES


def case_names(recipe: dict, root: Path) -> dict[str, dict[int, str]]:
    """case -> {label value: name} for the recipe's case folder, with `text.names` filling in or overriding."""
    data, overrides = recipe.get("data") or {}, (recipe.get("text") or {}).get("names") or {}
    out = {}
    if data.get("dir"):
        folder = Path(str(data["dir"])).expanduser()
        for case in find_cases(folder if folder.is_absolute() else root / folder):
            out[case.name] = dict(case.names)
    for case, table in overrides.items():
        if isinstance(table, str):
            if table not in NAME_TABLES:
                raise ValueError(f"text.names.{case}: unknown table {table!r}; known: {sorted(NAME_TABLES)}")
            table = NAME_TABLES[table]
        out[case] = {int(k): str(v) for k, v in table.items()}
    return out
