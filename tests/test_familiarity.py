"""An auto model knows when it does not know: slices unlike its training slices get no label and an image with none
is refused (sam3d.engine.familiarity); the shipped 3D-SAutoMed weights, trained with heads as negatives, answer a
brain with no organ and a message, and carry the measure of the slices their recipe trains on."""

from pathlib import Path

import pytest
import torch

from sam3d.engine.auto import auto_engine_from_config
from sam3d.engine.errors import Sam3DInputError
from sam3d.engine.familiarity import Familiarity, slice_points
from sam3d.engine.model_config import load_model_config

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def test_fit_threshold_and_round_trip():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(200, 6, generator=g) * torch.tensor([1.0, 2, 3, 4, 5, 6]) + 10
    fam = Familiarity.fit(train, margin=1.3)
    assert fam.familiar(train).all() and fam.threshold == pytest.approx(float(fam.distances(train).max()) * 1.3)
    far = train[:3] + 20 * torch.tensor([1.0, 2, 3, 4, 5, 6])  # 20 standard deviations off in every channel
    assert not fam.familiar(far).any()
    again = Familiarity.from_dict(fam.to_dict())
    assert torch.allclose(again.distances(train), fam.distances(train), atol=1e-4) and again.slices == 200
    with pytest.raises(ValueError, match="same length"):
        Familiarity.from_dict({"mean": [0.0, 1.0], "std": [1.0], "threshold": 1.0})
    assert slice_points(torch.ones(4, 3, 5, 5)).shape == (4, 6)


@pytest.fixture(scope="module")
def engine():
    return auto_engine_from_config(load_model_config("autosam3d", REPO / "configs"))


def test_the_shipped_abdominal_model_finds_no_organ_in_a_brain_and_says_so(engine):
    assert engine.familiarity is not None and engine.familiarity.slices > 0
    res = engine.segment(str(SHARED / "colin27_aal" / "image.nii.gz"))
    assert sum(res.info["voxels"].values()) == 0 and not res.mask.any()
    assert "found none of spleen, kidney_right" in res.info["message"]


def test_an_image_without_a_familiar_slice_is_refused():
    """The gate itself: measured on one abdominal MR's slices alone, a brain's slices are all too far."""
    engine = auto_engine_from_config(load_model_config("autosam3d", REPO / "configs"))  # its own answer cache
    mr = engine.prepare(str(SHARED / "totalseg_mr" / "image.nii.gz"))[2]
    engine.familiarity = Familiarity.fit(slice_points(engine.encode(mr)))
    with pytest.raises(Sam3DInputError, match="none of its 61 slices looks like the scans it was trained on"):
        engine.segment(str(SHARED / "colin27_aal" / "image.nii.gz"))


def test_it_labels_an_abdomen_and_says_how_sure_it_is(engine):
    res = engine.segment(str(SHARED / "totalseg_mr" / "image.nii.gz"))  # abdominal MR it never trained on
    assert res.info["familiar_slices"] >= res.info["slices"] - 1
    conf = res.info["confidence"]
    assert set(conf) <= set(engine.class_names) and conf and all(0.2 <= c <= 1 for c in conf.values())
    assert sum(res.info["voxels"].values()) > 0


def test_fit_from_a_recipes_training_slices_is_written_into_the_checkpoint(tmp_path, capsys):
    import yaml

    from sam3d.cli.fit_familiarity import main
    from sam3d.engine import save_checkpoint
    from sam3d.engine.checkpoint import saved_config
    from sam3d.models import build_network

    network = {"class_names": ["liver", "spleen", "kidney_right"]}
    ckpt = tmp_path / "tiny.safetensors"
    torch.manual_seed(0)
    save_checkpoint(build_network("autosam3d_tiny", **network), ckpt, {"preset": "autosam3d_tiny", "network": network})
    model = tmp_path / "tiny.yaml"
    intensity = {"clip": [-200.0, 300.0], "normalize": "zscore"}  # the smoke recipe's
    model.write_text(yaml.safe_dump({"checkpoint": str(ckpt), "spacing": [3.0] * 3, "intensity": intensity}))
    recipe = REPO / "tests" / "recipes" / "autosam3d_smoke.yaml"
    check = [str(SHARED / "totalseg_mr")]
    assert main(["--model", str(model), "--recipe", str(recipe), "--samples", "6", "--check", *check]) == 0
    out = capsys.readouterr().out
    assert "6 training slices" in out and "totalseg_mr:" in out and ("voxels labelled" in out or "refused" in out)
    fam = saved_config(ckpt)["familiarity"]
    assert fam["slices"] == 6 and len(fam["mean"]) == len(fam["std"]) and fam["threshold"] > 0
