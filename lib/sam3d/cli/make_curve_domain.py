"""The learning curve's domain: the Colin27 brain's AAL regions, a structure family the click model never trained on.

    python scripts/make_curve_domain.py --out runs/curve_domain [--case ../shared/data/colin27_aal]

The left hemisphere, cut into four pieces (anterior/posterior x inferior/superior at the medians of its labelled
voxels), is the pool annotators label (`OUT/pool/<piece>/image.nii.gz, label.nii.gz`); the right hemisphere, cut
the same way, is held out (`OUT/heldout/<piece>`). Each piece keeps its own hemisphere's regions (AAL values
1-108: odd left, even right; the vermis, on the midline, is left out) with at least `--min-voxels` voxels in it,
so no voxel an annotator labels is ever measured. Homologous regions of the two hemispheres are alike: the
held-out pieces are "scans of the same kind", the closest this data comes to a second subject.
"""

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from ..data.cases import read_label_names
from . import REPO

LATERAL = 108  # AAL values 1..108 are lateral (odd left, even right); 109-116 are the vermis


def side_values(left: bool) -> np.ndarray:
    """The AAL values of one hemisphere's regions."""
    return np.arange(1 if left else 2, LATERAL + 1, 2)


def hemisphere_pieces(label: np.ndarray, affine: np.ndarray, left: bool) -> list[tuple[str, tuple[slice, ...]]]:
    """(name, voxel slices) of one hemisphere's four pieces; the midline is world x = 0 (RAS)."""
    mid = int(np.rint(np.linalg.solve(affine, [0.0, 0.0, 0.0, 1.0])[0]))
    values = side_values(left)
    left_is_low = affine[0, 0] > 0  # x runs towards the right: the left hemisphere has the smaller indices
    xs = slice(0, mid) if left == left_is_low else slice(mid + 1, label.shape[0])
    idx = np.argwhere(np.isin(label[xs], values))
    y_mid, z_mid = (int(np.median(idx[:, a])) for a in (1, 2))
    side = "left" if left else "right"
    pieces = []
    for ap, ys in (("posterior", slice(0, y_mid)), ("anterior", slice(y_mid, label.shape[1]))):
        for si, zs in (("inferior", slice(0, z_mid)), ("superior", slice(z_mid, label.shape[2]))):
            pieces.append((f"colin27_{side}_{ap}_{si}", (xs, ys, zs)))
    return pieces


def write_piece(image, label: np.ndarray, names: dict, box, values, min_voxels: int, folder: Path) -> int:
    """The piece's image and its regions (values with min_voxels voxels in it); returns how many regions."""
    sub = label[box]
    keep = [int(v) for v, n in zip(*np.unique(sub, return_counts=True)) if v in values and n >= min_voxels]
    piece_label = np.where(np.isin(sub, keep), sub, 0).astype(np.int16)
    piece_image = image.slicer[box]
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(piece_image, str(folder / "image.nii.gz"))
    nib.save(nib.Nifti1Image(piece_label, piece_image.affine), str(folder / "label.nii.gz"))
    (folder / "label_names.json").write_text(json.dumps({str(v): names.get(v, str(v)) for v in keep}, indent=1))
    return len(keep)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "curve_domain")
    ap.add_argument("--case", type=Path, default=REPO.parent / "shared" / "data" / "colin27_aal")
    ap.add_argument("--min-voxels", type=int, default=1000, help="smallest region kept in a piece (1 mm voxels)")
    args = ap.parse_args(argv)
    image = nib.load(str(args.case / "image.nii.gz"))
    label_img = nib.load(str(args.case / "label.nii.gz"))
    if nib.aff2axcodes(label_img.affine)[0] not in ("R", "L"):
        ap.error(f"{args.case}: the first voxel axis must run left-right, not {nib.aff2axcodes(label_img.affine)}")
    label = np.asarray(label_img.dataobj).astype(np.int32)
    names = read_label_names(args.case / "label_names.txt")
    for split, left in (("pool", True), ("heldout", False)):
        values = set(side_values(left).tolist())
        for name, box in hemisphere_pieces(label, label_img.affine, left):
            n = write_piece(image, label, names, box, values, args.min_voxels, args.out / split / name)
            print(f"{split}/{name}: {n} regions")
    return 0
