"""`sam3d_auto` behind a real `monailabel start_server`: a multi-class label volume on the image's grid, the
class names in /info and in the answer, 503 while the weights are missing, 422 for a bad request; clicks of
`sam3d_point` with `prior` refine one class of it."""

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from monailabel_server import running_server
from tiny_datastore import write_tiny_model

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["liver", "spleen", "aorta"]
ABSENT = "auto_noweights"


def _tiny_checkpoint(path: Path) -> Path:
    import torch

    from sam3d.engine import save_checkpoint
    from sam3d.models import build_network

    torch.manual_seed(0)
    model = build_network("autosam3d_tiny", class_names=CLASSES)
    save_checkpoint(model, path, {"preset": "autosam3d_tiny", "network": model.config.to_dict()})
    return path


@pytest.fixture(scope="module")
def server(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sam3d_auto_server")
    studies = tmp / "studies"
    studies.mkdir()
    shutil.copy(shared_data / "totalseg_ct" / "image.nii.gz", studies / "ct.nii.gz")
    (tmp / "client").mkdir()
    point_config, _ = write_tiny_model(tmp / "point")
    conf = [
        ("device", "cpu"),
        ("model", point_config),
        ("infers.sam3d_auto.checkpoint", _tiny_checkpoint(tmp / "auto.safetensors")),
        ("infers.sam3d_auto.spacing", "[3.0, 3.0, 3.0]"),
        (f"infers.{ABSENT}.model", "autosam3d"),
        (f"infers.{ABSENT}.checkpoint", tmp / "absent" / "autosam3d.safetensors"),
    ]
    with running_server(tmp, studies, conf) as (url, proc, log):
        yield tmp, studies, MONAILabelClient(url, tmpdir=str(tmp / "client"))


def _infer(client, model, params=None):
    try:
        return client.infer(model, "ct", dict(params or {}))
    except MONAILabelClientException as e:
        m = re.match(r"Status: (\d+); Response: (.*)", e.msg, re.S)
        raise AssertionError((int(m.group(1)), json.loads(m.group(2)).get("detail"))) from None


def test_info_lists_the_task_with_the_checkpoints_class_names(server):
    _, _, client = server
    task = client.info()["models"]["sam3d_auto"]
    assert task["type"] == "segmentation"
    assert task["labels"] == {name: i + 1 for i, name in enumerate(CLASSES)}
    assert task["sam3d"]["status"] in ("not_loaded", "ready")


def test_answer_is_the_librarys_multi_class_volume_on_the_image_grid(server):
    from sam3d.engine import EngineConfig, load_model
    from sam3d.engine.auto import AutoEngine
    from sam3d.engine.model_config import load_model_config

    tmp, studies, client = server
    f, params = _infer(client, "sam3d_auto")
    out, src = nib.load(f), nib.load(studies / "ct.nii.gz")
    assert out.shape == src.shape and np.allclose(out.affine, src.affine, atol=1e-4)
    labels = np.asarray(out.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}  # one class per voxel
    assert params["label_names"] == {name: i + 1 for i, name in enumerate(CLASSES)}
    assert params["order"] == "middle" and params["network"] == "autosam3d_tiny" and params["model_id"]
    engine = AutoEngine(
        load_model({"checkpoint": str(tmp / "auto.safetensors")}),
        EngineConfig.from_dict(load_model_config("autosam3d", REPO / "configs")),  # the served grid and intensities
    )
    np.testing.assert_array_equal(labels, engine.segment(str(studies / "ct.nii.gz")).mask)

    f2, params2 = _infer(client, "sam3d_auto", {"order": "top_down"})
    assert params2["order"] == "top_down" and nib.load(f2).shape == src.shape


def test_missing_weights_and_bad_requests(server):
    _, _, client = server
    task = client.info()["models"][ABSENT]
    assert task["sam3d"]["status"] == "weights_missing" and "UNAVAILABLE" in task["description"]
    assert task["labels"]  # the preset's class names, even without weights
    with pytest.raises(AssertionError) as e:
        _infer(client, ABSENT)
    status, detail = e.value.args[0]
    assert status == 503 and "weights missing" in detail and f"--conf infers.{ABSENT}.checkpoint" in detail
    with pytest.raises(AssertionError) as e:
        _infer(client, "sam3d_auto", {"order": "sideways"})
    assert e.value.args[0][0] == 422 and "order" in e.value.args[0][1]


def test_clicks_refine_one_class_of_the_automatic_answer(server):
    from sam3d.engine import EngineConfig, InteractiveEngine, load_model
    from sam3d.monailabel.app_config import load_app_config

    tmp, studies, client = server
    f, _ = _infer(client, "sam3d_auto")
    auto = np.asarray(nib.load(f).dataobj)
    click = [60, 50, 56]
    g, params = _infer(client, "sam3d_point", {"prior": "sam3d_auto", "label": "spleen", "foreground": [click]})
    refined = np.asarray(nib.load(g).dataobj)
    assert params["prior"] == "sam3d_auto" and params["label_names"] == {n: i + 1 for i, n in enumerate(CLASSES)}
    spleen = CLASSES.index("spleen") + 1
    untouched = (auto != spleen) & (refined != spleen)
    np.testing.assert_array_equal(refined[untouched], auto[untouched])  # only the clicked class changed

    # the library's answer: the same click with the automatic spleen as the previous mask
    mc = load_app_config({"model": str(tmp / "point" / "tiny_config.yaml")}, REPO / "configs").infers["sam3d_point"]
    engine = InteractiveEngine(load_model(mc.model_config), EngineConfig.from_dict(mc.model_config))
    want = engine.segment(str(studies / "ct.nii.gz"), [click], [], label="spleen", prior=auto == spleen).mask
    np.testing.assert_array_equal(refined == spleen, want > 0)

    for params, message in [
        ({"prior": "sam3d_text"}, "prior must name an automatic task (sam3d_auto"),
        ({"prior": "sam3d_auto", "label": "femur"}, "label 'femur' is not a class of sam3d_auto"),
    ]:
        with pytest.raises(AssertionError) as e:
            _infer(client, "sam3d_point", {**params, "foreground": [click]})
        assert e.value.args[0][0] == 422 and message in e.value.args[0][1]
