"""Cases on disk: an image, its reference label map and the names of its label values.

A data folder is either one case (it holds `image.*` and `label.*` itself) or a folder of cases (one sub-folder
each), as in `../shared/data/`:

    DIR/<case>/image.nii.gz | image.nii | image.nrrd | image.mha | image/ (a folder of DICOM slices)
    DIR/<case>/label.nii.gz | ...                                    (same grid as the image)
    DIR/<case>/label_names.json | label_names.txt                   (optional; may sit in DIR instead)

`label_names.json` maps values to names, flat (`{"1": "spleen"}`), inverted (`{"spleen": 1}`) or under task
keys as TotalSegmentator's files do (`{"total": {"1": "spleen", ...}, "total_mr": {...}}`). With several tables
the one named by `names_key` is used; without it, the table whose key shares most `_`-separated words with the
case folder's name (`totalseg_mr` -> `total_mr`), the first one on a tie (`totalseg_ct` -> `total`). A text
names file has one `value name [anything else]` per line (`#` starts a comment), as colin27_aal's `label_names.txt`.

Arrays are what `monai.transforms.LoadImage` returns (the grid that click indices address, the engine's and
the server's); the spacing in mm is the norm of the affine's columns.
"""

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NAME_FILES = ("label_names.json", "label_names.txt", "labels.txt")


@dataclass
class Case:
    name: str
    image: Path  # a file or a folder of DICOM slices
    label: Path
    names: dict[int, str] = field(default_factory=dict)  # label value -> name

    def label_name(self, value: int) -> str:
        return self.names.get(int(value), f"label_{int(value)}")


@dataclass
class LoadedCase:
    case: Case
    image: np.ndarray  # float32, the LoadImage array (spatial dims only)
    label: np.ndarray  # integer label map on the same grid
    affine: np.ndarray  # 4x4
    spacing: tuple[float, float, float]  # mm

    def values(self) -> list[int]:
        return [int(v) for v in np.unique(self.label) if v != 0]


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    p = folder / stem
    if p.is_dir() and any(f.is_file() for f in p.iterdir()):
        return p  # DICOM series
    return None


def _pick_table(tables: dict, case_name: str, names_key: str | None, path: Path) -> dict:
    if names_key is not None:
        if names_key not in tables:
            raise ValueError(f"{path}: no name table {names_key!r}; it has {sorted(tables)}")
        return tables[names_key]
    words = set(case_name.lower().split("_"))
    best = max(tables, key=lambda k: sum(w in words for w in k.lower().split("_")[1:]))
    if len(tables) > 1:
        logger.info(f"{path}: using the name table {best!r} of {sorted(tables)} for {case_name!r}")
    return tables[best]


def read_label_names(path: str | os.PathLike, case_name: str = "", names_key: str | None = None) -> dict[int, str]:
    """value -> name from a `label_names.json` or a `value name ...` text file."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
            data = _pick_table(data, case_name, names_key, path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of label values to names")
        out = {}
        for k, v in data.items():
            if str(k).lstrip("-").isdigit():
                out[int(k)] = str(v)
            elif isinstance(v, (int, float)) or str(v).lstrip("-").isdigit():
                out[int(v)] = str(k)
        return out
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        parts = line.split()
        if len(parts) >= 2 and parts[0].lstrip("-").isdigit():
            out[int(parts[0])] = parts[1]
    return out


def names_in(folders, case_name: str = "", names_key: str | None = None) -> dict[int, str]:
    """The first label names file found in `folders` (in order), read; {} when there is none."""
    for folder in folders:
        for name in NAME_FILES:
            if (folder / name).is_file():
                return read_label_names(folder / name, case_name, names_key)
    return {}


def find_cases(data_dir: str | os.PathLike, names_key: str | None = None) -> list[Case]:
    """The cases of a data folder (itself one case, or one case per sub-folder), sorted by name."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    folders = [root] if _find(root, "image") else sorted(p for p in root.iterdir() if p.is_dir())
    cases = []
    for folder in folders:
        image, label = _find(folder, "image"), _find(folder, "label")
        if image is None or label is None:
            logger.info(f"skipping {folder}: no image.* and label.*")
            continue
        cases.append(Case(folder.name, image, label, names_in((folder, root), folder.name, names_key)))
    if not cases:
        raise FileNotFoundError(f"no cases in {root}: expected image.* and label.* in it or in its sub-folders")
    return cases


def load_array(path: str | os.PathLike):
    """(array, affine) as `monai.transforms.LoadImage` gives them (ITK for a DICOM folder)."""
    from ..engine.image_session import load_image

    img = load_image(path)
    return np.asarray(img[0]), np.asarray(img.affine, dtype=np.float64)


def load_case(case: Case) -> LoadedCase:
    image, affine = load_array(case.image)
    label, label_affine = load_array(case.label)
    image, label = np.squeeze(image), np.squeeze(label)
    if image.ndim != 3:
        raise ValueError(f"{case.name}: expected a 3D image, got shape {image.shape}")
    if label.shape != image.shape:
        raise ValueError(f"{case.name}: label shape {label.shape} differs from the image's {image.shape}")
    if not np.allclose(affine, label_affine, atol=1e-3):
        logger.warning(f"{case.name}: label affine differs from the image's; using the image's grid")
    label = np.rint(label).astype(np.int32)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    return LoadedCase(case, image.astype(np.float32, copy=False), label, affine, spacing)


def parse_label_selection(selection, names: dict[int, str]) -> list[int] | None:
    """`--labels` values: ints or names (comma or space separated) -> label values; None selects all."""
    if not selection:
        return None
    items = []
    for s in selection if isinstance(selection, (list, tuple)) else [selection]:
        items += [t for t in str(s).replace(",", " ").split() if t]
    by_name = {v.lower(): k for k, v in names.items()}
    out = []
    for t in items:
        if t.lstrip("-").isdigit():
            out.append(int(t))
        elif t.lower() in by_name:
            out.append(by_name[t.lower()])
        else:
            raise ValueError(f"unknown label {t!r}: give a value or one of the names in the names file")
    return list(dict.fromkeys(out))
