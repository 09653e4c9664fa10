"""Text on the CPU (`sam3d.engine.named_class`): a name chooses a class of the shipped automatic model through the
text tower, clicks refine it with the shipped click model; on dcmqi's 3-slice CT, which no model trains on."""

from pathlib import Path

import nrrd
import numpy as np
import pytest

from sam3d import Sam3DPredictor
from sam3d.data.cases import load_array
from sam3d.engine import Sam3DInputError
from sam3d.engine.checkpoint import configured_kind
from sam3d.engine.model_config import load_model_config
from sam3d.monailabel.app_config import load_app_config

REPO = Path(__file__).resolve().parents[1]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def ct(shared_data, tmp_path_factory):
    import nibabel as nib

    src = shared_data / "dcmqi_ct3slice"
    image, affine = load_array(src)
    path = tmp_path_factory.mktemp("ct") / "ct3.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(path))
    return path, nrrd.read(str(src / "liver_seg.nrrd"))[0] > 0


@pytest.fixture(scope="module")
def predictor():
    return Sam3DPredictor.from_pretrained("autosam3d_text")


def test_the_default_text_task_chooses_classes_of_the_automatic_model():
    cfg = load_model_config("autosam3d_text", REPO / "configs")
    assert configured_kind(cfg) == "text" and cfg["classes_from"] == "autosam3d"
    spec = load_app_config({}, REPO / "configs").infers["sam3d_text"]
    assert spec.kind == "text" and spec.error is None
    assert spec.model_config["checkpoint"] == str(REPO / "models" / "autosam3d.safetensors")


def test_a_name_and_its_synonyms_give_the_automatic_models_class(predictor, ct):
    path, liver = ct
    predictor.set_image(str(path))
    mask, score = predictor.predict(text="liver")
    assert mask.shape == liver.shape and 0.0 < float(score[0]) <= 1.0
    assert _dice(mask > 0, liver) > 0.5  # "liver everywhere" scores 0.24; random weights find nothing
    for synonym in ("hepar", "the liver", "Liver segmentation", "LIVER"):
        again, _ = predictor.predict(text=synonym)
        assert np.array_equal(again, mask), synonym


def test_an_unknown_name_is_refused_with_what_the_model_knows(predictor, ct):
    predictor.set_image(str(ct[0]))
    with pytest.raises(Sam3DInputError, match=r"'pancreas' is not a structure .*closest: 'stomach'.*knows spleen"):
        predictor.predict(text="pancreas")
    with pytest.raises(Sam3DInputError, match="empty text"):
        predictor.predict(text="  ")


def test_clicks_refine_the_named_class_from_its_mask(predictor, ct):
    from scipy import ndimage

    path, liver = ct
    predictor.set_image(str(path))
    named, _ = predictor.predict(text="liver")
    missed = ndimage.distance_transform_edt(liver & (named == 0))
    at = np.unravel_index(int(missed.argmax()), missed.shape)  # the middle of the liver the name's answer missed
    refined, _ = predictor.predict(text="liver", points=[at], point_labels=[1])
    assert refined[at] == 1 and not np.array_equal(refined, named)
    assert _dice(refined > 0, named > 0) > 0.3  # refined from the named mask, not started afresh
    inside = np.argwhere(named > 0)
    # a background click alone (a new sequence) corrects the named mask there (how much it keeps: BENCHMARKS.md)
    edge = inside[inside[:, 0].argmax()]
    alone, _ = predictor.predict(text="liver", points=[edge], point_labels=[0])
    assert alone.sum() > 0 and alone[tuple(edge)] == 0 and not np.array_equal(alone, named)
    with pytest.raises(Sam3DInputError, match="outside the image"):
        predictor.predict(text="liver", points=[[0, 0, 99]], point_labels=[1])
