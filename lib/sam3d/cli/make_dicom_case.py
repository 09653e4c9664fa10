"""A harness case from a DICOM series and separate NRRD masks (as `../shared/data/dcmqi_ct3slice` holds them).

The case folder gets `image/` (symbolic links to the series' DICOM files: nothing is copied), `label.nrrd` (the
masks merged into one label map on the masks' grid, each mask's non-zero voxels taking its own value) and
`label_names.json`. The evaluation harness and `scripts/evaluate.py` read such a folder like any other case.

    python scripts/make_dicom_case.py --series ../shared/data/dcmqi_ct3slice \\
        --mask liver=../shared/data/dcmqi_ct3slice/liver_seg.nrrd \\
        --mask heart=../shared/data/dcmqi_ct3slice/heart_seg.nrrd --out runs/heldout_ct/dcmqi_ct3slice

A later mask wins where masks overlap. The masks must share one grid (shape, origin, directions), and that grid
must match the series' (checked after both are read as `monai.transforms.LoadImage` reads them).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import nrrd
import numpy as np

from sam3d.data.cases import load_array


def merge_masks(masks: list[tuple[str, Path]]) -> tuple[np.ndarray, dict, dict[int, str]]:
    """(label map, NRRD header of the first mask, value -> name) with values 1..N in the order given."""
    label, header, names = None, None, {}
    for value, (name, path) in enumerate(masks, start=1):
        data, h = nrrd.read(str(path))
        if label is None:
            label, header = np.zeros(data.shape, np.uint8), h
        elif (
            data.shape != label.shape
            or not np.allclose(h["space origin"], header["space origin"])
            or not np.allclose(h["space directions"], header["space directions"])
        ):
            raise ValueError(f"{path}: not on the grid of {masks[0][1]}")
        label[data != 0] = value
        names[value] = name
    return label, header, names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--series", type=Path, required=True, help="folder of the DICOM series")
    p.add_argument("--mask", action="append", required=True, metavar="NAME=PATH", help="a NRRD mask and its name")
    p.add_argument("--out", type=Path, required=True, help="the case folder to write (must not exist)")
    args = p.parse_args(argv)
    masks = []
    for spec in args.mask:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).is_file():
            p.error(f"--mask must be NAME=PATH of an existing file, got {spec!r}")
        masks.append((name, Path(path)))
    if args.out.exists():
        p.error(f"{args.out} exists: choose a new folder")
    dicoms = sorted(f for f in args.series.iterdir() if f.is_file() and f.suffix.lower() in (".dcm", ""))
    if not dicoms:
        p.error(f"no DICOM files (*.dcm) in {args.series}")
    label, header, names = merge_masks(masks)

    tmp = args.out.with_name(f".{args.out.name}.tmp")  # whole or absent: the folder appears by one rename
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "image").mkdir(parents=True)
        for f in dicoms:
            (tmp / "image" / f.name).symlink_to(f.resolve())
        nrrd.write(str(tmp / "label.nrrd"), label, header)
        (tmp / "label_names.json").write_text(json.dumps({str(v): n for v, n in names.items()}, indent=1))
        image, image_affine = load_array(tmp / "image")
        merged, label_affine = load_array(tmp / "label.nrrd")
        if image.shape != merged.shape or not np.allclose(image_affine, label_affine, atol=1e-3):
            raise SystemExit(
                f"the masks' grid {merged.shape} does not match the series' {image.shape} (or its "
                f"affine); nothing written"
            )
        tmp.rename(args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = {names[v]: int((merged == v).sum()) for v in names}
    print(f"{args.out}: image {image.shape}, labels {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
