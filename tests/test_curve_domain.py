"""scripts/make_curve_domain.py: the learning curve's pool (left hemisphere) and held-out pieces (right) of the
Colin27 AAL brain, cut without overlap and placed where they were."""

from pathlib import Path

import nibabel as nib
import numpy as np

from sam3d.cli.make_curve_domain import main
from sam3d.data.cases import find_cases

REPO = Path(__file__).resolve().parents[1]
COLIN = REPO.parent / "shared" / "data" / "colin27_aal"


def test_pool_and_heldout_are_the_two_hemispheres_in_four_pieces(tmp_path):
    assert main(["--out", str(tmp_path), "--case", str(COLIN)]) == 0
    source = nib.load(str(COLIN / "image.nii.gz"))
    whole = np.asarray(source.dataobj)
    for split, parity, side in (("pool", 1, -1), ("heldout", 0, 1)):
        cases = find_cases(tmp_path / split)
        assert len(cases) == 4
        for case in cases:
            image, label = nib.load(str(case.image)), nib.load(str(case.label))
            values = np.unique(np.asarray(label.dataobj))[1:]
            assert len(values) >= 10 and all(v % 2 == parity and v <= 108 for v in values)  # one side, no vermis
            assert set(case.names) == {int(v) for v in values} and case.names[int(values[0])].endswith(("_L", "_R"))
            corners = nib.affines.apply_affine(image.affine, [[0, 0, 0], np.subtract(image.shape, 1)])
            assert np.all(np.sign(corners[:, 0]) == side)  # world x: left < 0 < right, the midline in neither
            at = np.rint(nib.affines.apply_affine(np.linalg.inv(source.affine), corners[0])).astype(int)
            sub = whole[tuple(slice(a, a + n) for a, n in zip(at, image.shape))]
            assert np.array_equal(np.asarray(image.dataobj), sub)  # the piece is where it was
