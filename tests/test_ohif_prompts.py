"""What the OHIF MONAI Label panel bundled with monailabel 0.8.5 sends (its MonaiLabelClient.infer, PointPrompts and
ClassPrompts tabs): point prompts without a label name, the text task's class prompts (`label_prompt`, and
`points` with `point_labels`) through its `_classes` companion of type `vista3d`; in-process with a tiny RefSAM3D
and through a real server, answered as OHIF's uint8 NRRD."""

import shutil

import nibabel as nib
import nrrd
import numpy as np
import pytest
from fastapi import HTTPException

from sam3d.monailabel import Sam3DTextClassPrompts, TaskSpec
from sam3d.monailabel.infer_text import MAX_CLASS_PROMPTS, Sam3DTextInfer
from test_infer_text import checkpoint, ct  # noqa: F401 - fixtures: a tiny RefSAM3D knowing liver, spleen, kidney

LABELS = {"liver": 5, "spleen": 1, "kidney_left": 3, "structure": 255}
OHIF = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False, "restore_label_idx": False}


def new_text_task(checkpoint) -> Sam3DTextInfer:
    cfg = {"preset": "refsam3d_tiny", "checkpoint": str(checkpoint), "spacing": [3.0, 3.0, 3.0], "max_windows": 2}
    return Sam3DTextInfer(TaskSpec("sam3d_text", "refsam3d", cfg, "text task", dict(LABELS), kind="text"), device="cpu")


@pytest.fixture(scope="module")
def text_task(checkpoint):
    return new_text_task(checkpoint)


def _status(fn) -> HTTPException:
    with pytest.raises(HTTPException) as e:
        fn()
    return e.value


def test_the_companion_is_listed_for_ohifs_class_prompts_and_shares_the_engine(text_task):
    companion = Sam3DTextClassPrompts(text_task)
    info = companion.info()
    assert companion.name == "sam3d_text_classes" and info["type"] == "vista3d"
    assert info["labels"] == {"liver": 5, "spleen": 1, "kidney_left": 3}  # no generic `structure` (OHIF skips 255)
    assert text_task.info()["config"] == {"text": ""}  # a text box in OHIF's and Slicer's options
    assert companion.engine() is text_task.engine()


def test_class_prompts_answer_each_class_at_its_label_value(text_task, ct, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    companion = Sam3DTextClassPrompts(text_task)
    single = {n: np.asarray(nib.load(text_task({"image": ct, "label": n})[0]).dataobj) for n in ("liver", "spleen")}
    out, res = companion({"image": ct, "label_prompt": [5, 1], **OHIF})
    data, header = nrrd.read(out)
    assert header["type"] == "unsigned char" and data.shape == nib.load(ct).shape
    assert res["label_names"] == {"liver": 5, "spleen": 1} and set(res["classes"]) == {"liver", "spleen"}
    assert set(np.unique(data)) <= {0, 1, 5}
    np.testing.assert_array_equal(data == 5, single["liver"] > 0)  # the first class keeps a shared voxel
    np.testing.assert_array_equal(data == 1, (single["spleen"] > 0) & (single["liver"] == 0))


def test_point_prompts_of_a_vista3d_model_refine_one_class(checkpoint, ct, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    companion = Sam3DTextClassPrompts(new_text_task(checkpoint))
    req = {"image": ct, "label_prompt": [5], "points": [[60, 50, 56], [20, 20, 20]], "point_labels": [1, 0], **OHIF}
    out, res = companion(req)
    same = new_text_task(checkpoint)(
        {"image": ct, "label": "liver", "foreground": [[60, 50, 56]], "background": [[20, 20, 20]]}
    )[0]
    data, _ = nrrd.read(out)
    np.testing.assert_array_equal(data == 5, np.asarray(nib.load(same).dataobj) > 0)
    assert res["label_names"] == {"liver": 5}


@pytest.mark.parametrize(
    "request_, fragment",
    [
        ({"label_prompt": [77]}, "not a label"),
        ({"label_prompt": "nonsense"}, "not a label"),
        ({"label_prompt": []}, "list of label values"),
        ({"label_prompt": [True]}, "not a label"),
        ({"label_prompt": [5], "points": [[1, 2, 3]], "point_labels": [2]}, "point_labels"),
        ({"label_prompt": [5], "points": [[1, 2, 3]]}, "point_labels"),
        ({"label_prompt": [5, 1], "points": [[1, 2, 3]], "point_labels": [1]}, "one class"),
        ({"label_prompt": [5], "points": [[1, 2]], "point_labels": [1]}, "points"),
    ],
)
def test_bad_class_prompts_are_422(text_task, ct, request_, fragment):
    err = _status(lambda: Sam3DTextClassPrompts(text_task)({"image": ct, **request_}))
    assert err.status_code == 422 and fragment in err.detail, err.detail


def test_ohifs_auto_tab_sending_every_class_is_refused_with_the_way_out(text_task, ct):
    many = {f"s{i}": i + 10 for i in range(MAX_CLASS_PROMPTS + 1)}
    spec = TaskSpec("t", "refsam3d", text_task.model_config, "t", many, kind="text")
    task = Sam3DTextInfer(spec, device="cpu")
    err = _status(lambda: task({"image": ct, "label_prompt": list(many.values())}))
    assert err.status_code == 422 and "Class Prompts" in err.detail
    assert task._engine is None


def test_a_point_prompt_without_text_says_where_to_type_it(text_task, ct):
    err = _status(lambda: text_task({"image": ct, "foreground": [[60, 50, 56]], "background": [], **OHIF}))
    assert err.status_code == 422 and "option `text`" in err.detail and "sam3d_text_classes" in err.detail
    out, res = text_task({"image": ct, "foreground": [[60, 50, 56]], "text": "liver", **OHIF})  # typed in options
    assert out.endswith(".nrrd") and res["label"] == "liver"


# ---- through a real server, as OHIF asks ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(shared_data, checkpoint, tmp_path_factory):
    from monailabel.client import MONAILabelClient

    from monailabel_server import running_server
    from tiny_datastore import write_tiny_model

    tmp = tmp_path_factory.mktemp("sam3d_ohif_prompts")
    studies = tmp / "studies"
    studies.mkdir()
    shutil.copy(shared_data / "totalseg_ct" / "image.nii.gz", studies / "ct.nii.gz")
    (tmp / "client").mkdir()
    point_config, _ = write_tiny_model(tmp / "point")
    conf = [
        ("device", "cpu"),
        ("model", point_config),
        ("infers.sam3d_semantic_point", "null"),
        ("infers.sam3d_auto", "null"),
        ("infers.sam3d_text.model", "refsam3d"),
        ("infers.sam3d_text.checkpoint", checkpoint),
        ("infers.sam3d_text.spacing", "[3, 3, 3]"),
        ("infers.sam3d_text.max_windows", "2"),
    ]
    with running_server(tmp, studies, conf) as (url, proc, log):
        yield studies, MONAILabelClient(url, tmpdir=str(tmp / "client"))


def test_server_lists_and_answers_ohifs_prompts(server):
    studies, client = server
    models = client.info()["models"]
    assert models["sam3d_point"]["type"] == "deepgrow" and models["sam3d_text"]["type"] == "deepgrow"
    classes = models["sam3d_text_classes"]
    assert classes["type"] == "vista3d" and classes["labels"]["liver"] == 5 and "structure" not in classes["labels"]
    assert models["sam3d_text"]["config"] == {"text": ""}
    shape = nib.load(studies / "ct.nii.gz").shape

    f, params = client.infer("sam3d_point", "ct", {"foreground": [[60, 50, 56]], "background": [], **OHIF})
    data, _ = nrrd.read(f)
    assert params["label"] == "structure" and data.shape == shape and set(np.unique(data)) <= {0, 1}

    f, params = client.infer("sam3d_text_classes", "ct", {"label_prompt": [5, 1], **OHIF})
    data, header = nrrd.read(f)
    assert header["type"] == "unsigned char" and data.shape == shape and set(np.unique(data)) <= {0, 1, 5}
    assert params["label_names"] == {"liver": 5, "spleen": 1}
