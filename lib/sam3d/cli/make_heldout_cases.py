"""The held-out evaluation set of the click model, as harness case folders (symbolic links; nothing is copied).

    python scripts/make_heldout_cases.py --out runs/heldout [--shared ../shared/data] [--sample sample-data/brain-mr]

One folder per group, each holding its cases (`scripts/evaluate.py --data runs/heldout/<group>`):

- `mr_abdomen/totalseg_mr`, `brain_atlas/colin27_aal`: real scans with reference labels, never trained on;
- `ct_dicom/dcmqi_ct3slice`: the DICOM CT (3 slices) with its liver, heart and spine masks (make_dicom_case.py);
- `mr_lesion/breast1`, `mr_lesion/prostate_phantom`: pyradiomics' NRRD images and their ROIs;
- `brain_template/mni152_2009a_t1`, `brain_template/inia19_macaque_t1_brain`: the sample datastore's templates
  (build it first: `python scripts/make_sample_datastore.py sample-data/brain-mr`); skipped when missing.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from . import REPO


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "heldout")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--sample", type=Path, default=REPO / "sample-data" / "brain-mr")
    args = ap.parse_args(argv)
    shared, out = args.shared, args.out
    for group, case in (("mr_abdomen", "totalseg_mr"), ("brain_atlas", "colin27_aal")):
        for f in (shared / case).iterdir():
            if f.name.startswith(("image", "label")):
                _link(f, out / group / case / f.name)
    dcm, dcm_case = shared / "dcmqi_ct3slice", out / "ct_dicom" / "dcmqi_ct3slice"
    # built from the shared series, so one built before is the same case: a re-run keeps it
    if not dcm_case.is_dir():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "sam3d.cli.make_dicom_case",
                "--series",
                str(dcm),
                "--mask",
                f"liver={dcm / 'liver_seg.nrrd'}",
                "--mask",
                f"heart={dcm / 'heart_seg.nrrd'}",
                "--mask",
                f"spine={dcm / 'spine_seg.nrrd'}",
                "--out",
                str(dcm_case),
            ],
            check=True,
        )
    rad = shared / "pyradiomics_small"
    for case, image, label in (
        ("breast1", "breast1_image.nrrd", "breast1_label.nrrd"),
        ("prostate_phantom", "prostate_phantom_subvolume.nrrd", "prostate_phantom_subvolume-label.nrrd"),
    ):
        _link(rad / image, out / "mr_lesion" / case / "image.nrrd")
        _link(rad / label, out / "mr_lesion" / case / "label.nrrd")
    names_file = args.sample / "label_names.json"
    names = json.loads(names_file.read_text()) if names_file.is_file() else {}
    for case in ("mni152_2009a_t1", "inia19_macaque_t1_brain"):
        image, label = args.sample / f"{case}.nii.gz", args.sample / "labels" / "final" / f"{case}.nii.gz"
        if not (image.is_file() and label.is_file()):
            print(f"skipping {case}: not in {args.sample} (build the sample datastore first)")
            continue
        _link(image, out / "brain_template" / case / "image.nii.gz")
        _link(label, out / "brain_template" / case / "label.nii.gz")
        table = names.get(case) or {}
        if table:
            (out / "brain_template" / case / "label_names.json").write_text(json.dumps(table))
    print(f"held-out groups in {out}: {sorted(p.name for p in out.iterdir() if p.is_dir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
