"""Build a small MONAI Label local datastore of brain MR volumes from freely installable sources.

    python scripts/make_sample_datastore.py OUT [--mricron DIR] [--force]

OUT gets `<id>.nii.gz` images, `labels/final/<id>.nii.gz` reference labels on the same grid where a source
has them, and `label_names.json` ({id: {value: name}}). Sources, each used when present:

- Debian's `mricron-data` package (`apt-get install mricron-data`, files in /usr/share/mricron/templates):
  Colin27 skull-stripped T1 with the AAL atlas (116 regions), the Colin27 head T1 (left unlabelled, so
  that MONAI Label's active-learning strategies have an image to propose) and the INIA19 macaque T1 with
  its NeuroMaps labels.
- the `nilearn` wheel (pip): the MNI152 2009a T1 template with a grey/white matter label made from the
  template's own tissue probability maps (argmax, probability > 0.5).

Needs only numpy and nibabel. Exit status 2 when neither source is found.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

MRICRON_DIR = Path("/usr/share/mricron/templates")


def read_aal_names(path: Path) -> dict[str, str]:
    """aal.nii.txt lines are `value name code`."""
    names = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[parts[0]] = parts[1]
    return names


def mricron_items(root: Path):
    """(id, image file, label file or None, label names) from mricron-data."""
    if (root / "ch2bet.nii.gz").is_file() and (root / "aal.nii.gz").is_file():
        yield "colin27_t1_brain", root / "ch2bet.nii.gz", root / "aal.nii.gz", read_aal_names(root / "aal.nii.txt")
    if (root / "ch2.nii.gz").is_file():
        yield "colin27_t1_head", root / "ch2.nii.gz", None, {}
    if (root / "inia19-t1-brain.nii.gz").is_file() and (root / "inia19-NeuroMaps.nii.gz").is_file():
        # the package ships no names for the NeuroMaps values
        yield "inia19_macaque_t1_brain", root / "inia19-t1-brain.nii.gz", root / "inia19-NeuroMaps.nii.gz", {}


def nilearn_data_dir() -> Path | None:
    spec = importlib.util.find_spec("nilearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return d if (d / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").is_file() else None


def mni152_tissue_label(data_dir: Path) -> nib.Nifti1Image:
    """0 background, 1 grey matter, 2 white matter from the template's probability maps."""
    gm = nib.load(data_dir / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
    wm = nib.load(data_dir / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
    g, w = np.asanyarray(gm.dataobj), np.asanyarray(wm.dataobj)  # uint8, probability * 255
    label = np.where((g > 127) & (g >= w), 1, np.where(w > 127, 2, 0)).astype(np.uint8)
    return nib.Nifti1Image(label, gm.affine, gm.header)


def check_same_grid(image: Path, label: nib.Nifti1Image) -> None:
    img = nib.load(image)
    if img.shape[:3] != label.shape[:3] or not np.allclose(img.affine, label.affine, atol=1e-4):
        raise ValueError(f"label grid differs from {image}: {label.shape} vs {img.shape}")


def build(out: Path, mricron: Path = MRICRON_DIR, force: bool = False) -> list[str]:
    items = list(mricron_items(mricron)) if mricron.is_dir() else []
    nl = nilearn_data_dir()
    if not items and nl is None:
        raise FileNotFoundError(
            f"no source found: install Debian's mricron-data (files in {mricron}) or `pip install nilearn`"
        )
    if out.exists() and any(out.glob("*.nii.gz")):
        if not force:
            raise FileExistsError(f"{out} already holds images; pass --force to rebuild")
        shutil.rmtree(out)
    labels_dir = out / "labels" / "final"
    labels_dir.mkdir(parents=True, exist_ok=True)
    names: dict[str, dict[str, str]] = {}
    ids = []

    for ident, image, label, label_names in items:
        print(f"  {ident}: {image}" + (f" + {label.name}" if label else " (unlabelled)"), flush=True)
        if label is not None:
            check_same_grid(image, nib.load(label))
            shutil.copyfile(label, labels_dir / f"{ident}.nii.gz")
            names[ident] = label_names
        shutil.copyfile(image, out / f"{ident}.nii.gz")
        ids.append(ident)

    if nl is not None:
        ident = "mni152_2009a_t1"
        image = nl / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
        print(f"  {ident}: {image} + grey/white matter label from the template's tissue maps", flush=True)
        label = mni152_tissue_label(nl)
        check_same_grid(image, label)
        nib.save(label, labels_dir / f"{ident}.nii.gz")
        shutil.copyfile(image, out / f"{ident}.nii.gz")
        names[ident] = {"1": "grey_matter", "2": "white_matter"}
        ids.append(ident)

    (out / "label_names.json").write_text(json.dumps(names, indent=1) + "\n")
    return ids


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="datastore folder to create")
    p.add_argument("--mricron", type=Path, default=MRICRON_DIR, help="mricron-data templates folder")
    p.add_argument("--force", action="store_true", help="replace an existing datastore in OUT")
    args = p.parse_args(argv)
    print(f"building sample datastore in {args.out}", flush=True)
    try:
        ids = build(args.out, args.mricron, args.force)
    except (FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    labelled = sum((args.out / "labels" / "final" / f"{i}.nii.gz").is_file() for i in ids)
    print(f"done: {len(ids)} images, {labelled} with reference labels, in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
