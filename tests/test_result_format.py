"""Every infer task answers in the format the client asks for (`result_extension`, `result_dtype`,
`result_compress`): in-process for the point, text and automatic tasks, and through a real server with MONAI
Label's client asking for OHIF's uncompressed uint8 NRRD, read back with pynrrd on the image's grid."""

import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import yaml
from fastapi import HTTPException

from sam3d.monailabel import TaskSpec
from sam3d.monailabel.infer_auto import Sam3DAutoInfer
from sam3d.monailabel.infer_point import Sam3DPointInfer
from sam3d.monailabel.infer_text import Sam3DTextInfer
from sam3d.monailabel.result_format import ResultFormat

OHIF = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False}  # MonaiLabelClient.infer


def oblique_affine() -> np.ndarray:
    """A rotated, anisotropic RAS affine: an axis-aligned round trip could hide a wrong direction matrix."""
    c, s = np.cos(0.3), np.sin(0.3)
    a = np.eye(4)
    a[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.8, 1.1, 2.5]) @ np.diag([-1, 1, 1])
    a[:3, 3] = [12.5, -40.0, 7.25]
    return a


def nrrd_ras_affine(header: dict) -> np.ndarray:
    """The RAS affine of an NRRD in LPS space (rows of `space directions` are the axes)."""
    assert header["space"] == "left-posterior-superior"
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    a = np.eye(4)
    a[:3, :3] = lps_to_ras @ np.asarray(header["space directions"], float).T
    a[:3, 3] = lps_to_ras @ np.asarray(header["space origin"], float)
    return a


def read_any(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(array, RAS affine, header) of a written result."""
    if path.endswith(".nrrd"):
        data, header = nrrd.read(path)
        return data, nrrd_ras_affine(header), dict(header)
    if path.endswith(".mha"):
        import itk

        img = itk.imread(path)
        data = itk.array_view_from_image(img).transpose().copy()
        d = np.asarray(img.GetDirection()) @ np.diag(np.asarray(img.GetSpacing()))
        a = np.eye(4)
        a[:3, :3], a[:3, 3] = np.diag([-1.0, -1, 1]) @ d, np.diag([-1.0, -1, 1]) @ np.asarray(img.GetOrigin())
        return data, a, {}
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine, {"dtype": img.get_data_dtype()}


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    d = tmp_path / "results"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


# ---- the request's format ------------------------------------------------------------------------------------


def test_default_is_what_slicer_reads():
    assert ResultFormat.from_request({}) == ResultFormat(".nii.gz", None, False)
    assert ResultFormat.from_request({"result_extension": ""}) == ResultFormat(".nii.gz", None, False)


def test_ohif_asks_for_uncompressed_uint8_nrrd():
    assert ResultFormat.from_request(OHIF) == ResultFormat(".nrrd", "uint8", False)
    fmt = ResultFormat.from_request({"result_extension": "NRRD", "result_dtype": "UInt16", "result_compress": "true"})
    assert fmt == ResultFormat(".nrrd", "uint16", True)


@pytest.mark.parametrize(
    "request_, fragment",
    [
        ({"result_extension": ".png"}, "result_extension"),
        ({"result_extension": "../../etc/x.nii.gz"}, "result_extension"),
        ({"result_extension": 3}, "result_extension"),
        ({"result_dtype": "complex64"}, "result_dtype"),
        ({"result_dtype": 8}, "result_dtype"),
        ({"result_compress": "maybe"}, "result_compress"),
        ({"result_compress": 2}, "result_compress"),
    ],
)
def test_a_format_this_server_cannot_write_is_422(request_, fragment):
    with pytest.raises(HTTPException) as e:
        ResultFormat.from_request(request_)
    assert e.value.status_code == 422 and fragment in e.value.detail


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha"])
def test_every_format_keeps_the_voxels_and_the_grid(ext, results_dir):
    mask = np.zeros((9, 7, 5), np.uint8)
    mask[2:5, 1:4, 1:3] = 1
    mask[8, 6, 4] = 7
    path = ResultFormat(ext).write(mask, oblique_affine(), prefix="t_")
    assert Path(path).parent == results_dir and Path(path).name.startswith("t_") and path.endswith(ext)
    data, affine, _ = read_any(path)
    np.testing.assert_array_equal(data, mask)
    np.testing.assert_allclose(affine, oblique_affine(), atol=1e-5)


def test_dtype_and_compression_are_honoured(results_dir):
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[1:3, 1:3, 1:3] = 1
    raw = ResultFormat(".nrrd", "uint8", False).write(mask, np.eye(4))
    _, h = nrrd.read(raw)
    assert h["encoding"] == "raw" and h["type"] == "unsigned char"
    gz = ResultFormat(".nrrd", "uint16", True).write(mask, np.eye(4))
    data, h = nrrd.read(gz)
    assert h["encoding"] == "gzip" and h["type"] == "unsigned short" and data.dtype == np.uint16
    nii = ResultFormat(".nii", "int16").write(mask, np.eye(4))
    assert nib.load(nii).get_data_dtype() == np.int16
    assert nib.load(ResultFormat().write(mask, np.eye(4))).get_data_dtype() == np.uint8  # the mask's own


def test_labels_that_do_not_fit_the_type_are_422_and_leave_no_file(results_dir):
    mask = np.full((3, 3, 3), 300, np.uint16)
    with pytest.raises(HTTPException) as e:
        ResultFormat(".nrrd", "uint8").write(mask, np.eye(4))
    assert e.value.status_code == 422 and "uint16" in e.value.detail
    assert list(results_dir.iterdir()) == []


# ---- every task, in-process ------------------------------------------------------------------------------------


class StubEngine:
    """A click or text engine: a small cube at the first foreground click, on the image's grid."""

    def __init__(self, shape, affine):
        self.shape, self.affine, self.calls = shape, affine, []

    def segment(self, image_path, foreground, background, roi=None, label="structure", **kw):
        from sam3d.engine import SegmentResult

        self.calls.append(label)
        mask = np.zeros(self.shape, np.uint8)
        i, j, k = (int(v) for v in foreground[0])
        mask[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2] = 1
        return SegmentResult(mask, self.affine, {"load": 0.0, "encode": 0.0, "decode": 0.0}, {"model": "stub"})

    def segment_text(self, image_path, text, foreground, background):
        return self.segment(image_path, foreground or [[5, 5, 5]], background, label=text)


class StubAutoEngine:
    label_names = {"liver": 1, "spleen": 2}

    def __init__(self, shape, affine):
        self.shape, self.affine = shape, affine

    def segment(self, image_path, order=None):
        from sam3d.engine import SegmentResult

        mask = np.zeros(self.shape, np.uint8)
        mask[:4] = 1
        mask[-4:] = 2
        return SegmentResult(mask, self.affine, {"load": 0.0}, {"label_names": self.label_names, "order": "middle"})


@pytest.fixture(scope="module")
def mr(shared_data):
    return str(shared_data / "totalseg_mr" / "image.nii.gz")  # LPS-oriented: the affine has negative axes


def _spec(name, kind):
    return TaskSpec(
        name, "stub", {"factory": "stub"}, f"{kind} task", {"liver": 5, "spleen": 1, "structure": 255}, kind=kind
    )


def tasks(image):
    img = nib.load(image)
    point = Sam3DPointInfer(
        _spec("sam3d_point", "point"), device="cpu", engine_factory=lambda c, d: StubEngine(img.shape, img.affine)
    )
    text = Sam3DTextInfer(
        _spec("sam3d_text", "text"), device="cpu", engine_factory=lambda c, d: StubEngine(img.shape, img.affine)
    )
    auto = Sam3DAutoInfer(
        _spec("sam3d_auto", "auto"), device="cpu", engine_factory=lambda c, d: StubAutoEngine(img.shape, img.affine)
    )
    return {"point": point, "text": text, "auto": auto}


REQUESTS = {
    "point": {"foreground": [[40, 30, 10]]},
    "text": {"label": "liver", "foreground": [[40, 30, 10]]},
    "auto": {},
}


@pytest.mark.parametrize("kind", ["point", "text", "auto"])
@pytest.mark.parametrize(
    "fmt", [{}, OHIF, {"result_extension": ".nii"}, {"result_extension": ".nrrd", "result_compress": True}]
)
def test_every_task_answers_in_the_asked_format(kind, fmt, mr, results_dir):
    task = tasks(mr)[kind]
    out, res = task({"image": mr, **REQUESTS[kind], **fmt})
    assert out.endswith(fmt.get("result_extension", ".nii.gz")) and Path(out).name.startswith(task.name)
    data, affine, header = read_any(out)
    src = nib.load(mr)
    assert data.shape == src.shape
    np.testing.assert_allclose(affine, src.affine, atol=1e-4)
    if kind == "auto":
        assert set(np.unique(data)) == {0, 1, 2}
    else:
        assert data[40, 30, 10] == 1 and data.sum() == 27
    if out.endswith(".nrrd"):
        assert header["encoding"] == ("gzip" if fmt.get("result_compress") else "raw")
        assert header["type"] == "unsigned char"


def test_a_bad_format_is_refused_before_any_model_work(mr, results_dir):
    for kind, task in tasks(mr).items():
        with pytest.raises(HTTPException) as e:
            task({"image": mr, **REQUESTS[kind], "result_extension": ".jpg"})
        assert e.value.status_code == 422
        assert task._engine is None, f"{kind}: the model was loaded for a request that could not be answered"
    assert list(results_dir.iterdir()) == []


# ---- through a real server -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(shared_data, tmp_path_factory):
    from monailabel.client import MONAILabelClient

    from monailabel_server import running_server

    tmp = tmp_path_factory.mktemp("sam3d_format_server")
    studies = tmp / "studies"
    studies.mkdir()
    shutil.copy(shared_data / "totalseg_ct" / "image.nii.gz", studies / "ct.nii.gz")
    shutil.copy(shared_data / "totalseg_mr" / "image.nii.gz", studies / "mr.nii.gz")
    ball = tmp / "ball.yaml"
    ball.write_text(
        yaml.safe_dump(
            {
                "factory": "fakes:build_ball_model",
                "ball_radius": 3,
                "spacing": [1.5] * 3,
                "intensity": {"clip": None, "normalize": "zscore_foreground"},
                "cache_mb": 64,
                "max_windows": 4,
            }
        )
    )
    (tmp / "client").mkdir()
    conf = [
        ("model", ball),
        ("device", "cpu"),
        ("infers.sam3d_semantic_point", "null"),
        ("infers.sam3d_text", "null"),
        ("infers.sam3d_auto", "null"),
    ]
    with running_server(tmp, studies, conf) as (url, proc, log):
        yield studies, MONAILabelClient(url, tmpdir=str(tmp / "client"))


@pytest.mark.parametrize("image_id, click", [("ct", [60, 50, 56]), ("mr", [40, 30, 10])])
def test_server_answers_ohifs_nrrd_on_the_image_grid(server, image_id, click):
    studies, client = server
    f, params = client.infer("sam3d_point", image_id, {"foreground": [click], "background": [], **OHIF})
    assert f.endswith(".nrrd"), f
    data, header = nrrd.read(f)
    assert header["encoding"] == "raw" and header["type"] == "unsigned char"
    src = nib.load(studies / f"{image_id}.nii.gz")
    assert data.shape == src.shape
    np.testing.assert_allclose(nrrd_ras_affine(header), src.affine, atol=1e-4)
    assert data[tuple(click)] == 1 and set(np.unique(data)) == {0, 1}
    assert params["label"] == "structure"  # OHIF's point prompts name no label


def test_server_default_stays_nifti(server):
    studies, client = server
    f, params = client.infer("sam3d_point", "ct", {"foreground": [[60, 50, 56]], "label": "liver"})
    assert f.endswith(".nii.gz")
    out = nib.load(f)
    assert np.asarray(out.dataobj)[60, 50, 56] == 1
    np.testing.assert_allclose(out.affine, nib.load(studies / "ct.nii.gz").affine, atol=1e-4)
