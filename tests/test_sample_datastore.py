"""scripts/make_sample_datastore.py builds a MONAI Label datastore whose labels lie on their images' grids."""

import importlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
msd = importlib.import_module("sam3d.cli.make_sample_datastore")  # what scripts/make_sample_datastore.py runs

HAVE_MRICRON = (msd.MRICRON_DIR / "aal.nii.gz").is_file()
HAVE_NILEARN = msd.nilearn_data_dir() is not None


@pytest.fixture(scope="module")
def datastore(tmp_path_factory) -> Path:
    if not (HAVE_MRICRON or HAVE_NILEARN):
        pytest.skip("no sample source: neither Debian's mricron-data nor the nilearn package is installed")
    out = tmp_path_factory.mktemp("sample") / "brain-mr"
    assert msd.main([str(out)]) == 0
    return out


def test_images_and_labels_share_grid(datastore):
    images = sorted(datastore.glob("*.nii.gz"))
    labels = sorted((datastore / "labels" / "final").glob("*.nii.gz"))
    assert images and labels
    image_names = {p.name for p in images}
    for label in labels:
        assert label.name in image_names, f"label without image: {label.name}"
        img, lab = nib.load(datastore / label.name), nib.load(label)
        assert img.ndim == 3 and lab.shape == img.shape
        np.testing.assert_allclose(lab.affine, img.affine, atol=1e-4)
        values = np.unique(np.asanyarray(lab.dataobj))
        assert values[0] == 0 and len(values) > 1 and np.all(values == np.round(values))
        assert float(np.asanyarray(img.dataobj).std()) > 0
    names = json.loads((datastore / "label_names.json").read_text())
    assert set(names) == {p.name[: -len(".nii.gz")] for p in labels}


@pytest.mark.skipif(not HAVE_MRICRON, reason="Debian package mricron-data not installed (/usr/share/mricron)")
def test_mricron_volumes(datastore):
    assert (datastore / "labels" / "final" / "colin27_t1_brain.nii.gz").is_file()
    assert not (datastore / "labels" / "final" / "colin27_t1_head.nii.gz").exists()  # left for active learning
    aal = np.asanyarray(nib.load(datastore / "labels" / "final" / "colin27_t1_brain.nii.gz").dataobj)
    names = json.loads((datastore / "label_names.json").read_text())["colin27_t1_brain"]
    assert len(np.unique(aal)) == 117 and len(names) == 116 and names["1"] == "Precentral_L"


@pytest.mark.skipif(not HAVE_NILEARN, reason="nilearn (pinned in requirements.txt) not installed")
def test_mni152_tissue_label(datastore):
    lab = np.asanyarray(nib.load(datastore / "labels" / "final" / "mni152_2009a_t1.nii.gz").dataobj)
    counts = np.bincount(lab.ravel(), minlength=3)
    assert len(counts) == 3 and counts[1] > 100_000 and counts[2] > 100_000  # mm^3 of grey / white matter


def test_refuses_to_overwrite(datastore):
    assert msd.main([str(datastore)]) == 2
