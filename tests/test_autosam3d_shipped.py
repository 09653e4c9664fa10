"""The shipped 3D-SAutoMed weights (models/autosam3d.safetensors) behind a real server, on the one CT that no
model trains on (dcmqi's 3-slice CT, a DICOM series, with its hand-drawn liver mask): issue 8's server check, and
the text task that names its classes (autosam3d_text: the name alone, a synonym, an unknown name)."""

import json
import re
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from monailabel_server import running_server
from sam3d.data.cases import load_array
from sam3d.engine.checkpoint import saved_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "autosam3d.safetensors"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.slow
def test_shipped_model_finds_the_liver_of_an_unseen_ct_through_the_server(shared_data, tmp_path):
    classes = saved_config(SHIPPED)["network"]["class_names"]
    src = shared_data / "dcmqi_ct3slice"
    image, affine = load_array(src)  # the series as the server's LoadImage reads it
    liver = nrrd.read(str(src / "liver_seg.nrrd"))[0] > 0
    assert liver.shape == image.shape
    studies = tmp_path / "studies"
    studies.mkdir()
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(studies / "ct3.nii.gz"))
    (tmp_path / "client").mkdir()
    with running_server(tmp_path, studies, [("device", "cpu")]) as (url, _, _):
        client = MONAILabelClient(url, tmpdir=str(tmp_path / "client"))
        info = client.info()["models"]["sam3d_auto"]
        assert info["sam3d"]["status"] in ("not_loaded", "ready")  # the shipped file is what the app serves
        assert info["labels"] == {name: i + 1 for i, name in enumerate(classes)}
        path, params = client.infer("sam3d_auto", "ct3", {})
        out = nib.load(path)
        labels = np.asarray(out.dataobj)
        assert labels.shape == image.shape and np.allclose(out.affine, affine, atol=1e-3)
        assert params["label_names"] == info["labels"]
        dice = _dice(labels == params["label_names"]["liver"], liver)
        # "liver everywhere" scores 0.24 here (the liver is 14% of the voxels)
        assert dice > 0.5, f"liver Dice {dice:.3f} on the unseen CT"
        # the text task: the name alone chooses the class; a synonym gives the same mask; an unknown name is refused
        text_path, text_params = client.infer("sam3d_text", "ct3", {"text": "liver"})
        by_name = np.asarray(nib.load(text_path).dataobj) > 0
        assert text_params["closest_name"] == "liver" and _dice(by_name, liver) > 0.5
        assert np.array_equal(by_name, labels == params["label_names"]["liver"])
        synonym_path, _ = client.infer("sam3d_text", "ct3", {"text": "hepar"})
        assert np.array_equal(np.asarray(nib.load(synonym_path).dataobj) > 0, by_name)
        with pytest.raises(MONAILabelClientException) as refused:
            client.infer("sam3d_text", "ct3", {"text": "pancreas"})
        status, body = re.match(r"Status: (\d+); Response: (.*)", refused.value.msg, re.S).groups()
        assert status == "422" and "not a structure" in json.loads(body)["detail"]
