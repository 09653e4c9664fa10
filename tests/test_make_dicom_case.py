"""scripts/make_dicom_case.py: a DICOM series and NRRD masks become a harness case, whole or not at all."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from sam3d.data.cases import find_cases, load_case

REPO = Path(__file__).resolve().parents[1]
SCRIPT = [sys.executable, str(REPO / "scripts" / "make_dicom_case.py")]


def test_series_and_masks_become_one_case_on_the_series_grid(tmp_path, shared_data):
    src = shared_data / "dcmqi_ct3slice"
    out = tmp_path / "cases" / "ct3"
    args = [
        "--series",
        str(src),
        "--mask",
        f"liver={src / 'liver_seg.nrrd'}",
        "--mask",
        f"heart={src / 'heart_seg.nrrd'}",
        "--out",
        str(out),
    ]
    done = subprocess.run(SCRIPT + args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (case,) = find_cases(tmp_path / "cases")
    loaded = load_case(case)
    assert case.names == {1: "liver", 2: "heart"} and loaded.values() == [1, 2]
    assert loaded.image.shape == loaded.label.shape == (512, 512, 3)
    assert 30 < np.median(loaded.image[loaded.label == 1]) < 70  # liver HU: the masks sit on the right voxels
    assert all(p.is_symlink() for p in (out / "image").iterdir())  # the series is linked, not copied

    again = subprocess.run(SCRIPT + args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr


def test_a_mask_on_another_grid_writes_nothing(tmp_path, shared_data):
    src = shared_data / "dcmqi_ct3slice"
    other = shared_data / "pyradiomics_small" / "breast1_label.nrrd"
    out = tmp_path / "bad"
    done = subprocess.run(
        SCRIPT
        + [
            "--series",
            str(src),
            "--mask",
            f"liver={src / 'liver_seg.nrrd'}",
            "--mask",
            f"breast={other}",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "not on the grid" in done.stderr
    assert not out.exists() and not any(tmp_path.iterdir())
