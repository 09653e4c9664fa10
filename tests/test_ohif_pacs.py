"""The app on a real PACS, as OHIF uses it (marker `ohif`; needs Debian's orthanc and orthanc-dicomweb):
scripts/orthanc.sh starts Orthanc on 127.0.0.1, a CT series is uploaded, the app serves its DICOMweb with dcmqi's
itkimage2segimage taken from the venv (no download), answers OHIF's NRRD request on the series' own grid, and a
final label saved through the API comes back to Orthanc as a DICOM SEG series."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nrrd
import numpy as np
import pytest

from dicom_series import write_ct_series
from monailabel_server import running_server

pytestmark = pytest.mark.ohif
REPO = Path(__file__).resolve().parents[1]
OHIF = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False, "restore_label_idx": False}


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read() or b"null")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if not shutil.which("Orthanc") and not Path("/usr/sbin/Orthanc").exists():
        pytest.skip("Orthanc is not installed (Debian: orthanc, orthanc-dicomweb)")
    from sam3d.monailabel.local_server import free_port

    tmp = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    proc = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "orthanc.sh"), "start", "--dir", str(tmp), "--port", str(port)],
        stdout=open(tmp / "orthanc.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(60):
            try:
                _get(f"{url}/system")
                break
            except OSError:
                assert proc.poll() is None, (tmp / "orthanc.log").read_text()
                time.sleep(0.5)
        yield url, tmp
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def ct_on_orthanc(url: str, shared_data: Path, tmp: Path, monkeypatch) -> tuple[dict, Path]:
    """The CT as a DICOM series (tests/dicom_series.py) in `tmp/ct`, uploaded to the Orthanc at `url`, and the
    environment of a server on it as `setup.sh server` sets it: the venv's tools (itkimage2segimage) first on PATH,
    new series seen within 5 s, the DICOMweb cache (where final labels land) in `tmp/dicom_cache`."""
    series_dir = tmp / "ct"
    uids = write_ct_series(shared_data / "totalseg_ct" / "image.nii.gz", series_dir)
    subprocess.run(["bash", str(REPO / "scripts" / "orthanc.sh"), "upload", str(series_dir), "--url", url], check=True)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MONAI_LABEL_DICOMWEB_CACHE_EXPIRY", "5")
    monkeypatch.setenv("MONAI_LABEL_DICOMWEB_CACHE_PATH", str(tmp / "dicom_cache"))
    return uids, series_dir


@pytest.fixture(scope="module")
def pacs_server(orthanc, shared_data, tmp_path_factory, monkeypatch_module):
    from monailabel.client import MONAILabelClient

    url, _ = orthanc
    tmp = tmp_path_factory.mktemp("pacs_app")
    uids, series_dir = ct_on_orthanc(url, shared_data, tmp, monkeypatch_module)
    (tmp / "client").mkdir()
    conf = [
        ("device", "cpu"),
        ("infers.sam3d_semantic_point", "null"),
        ("infers.sam3d_text", "null"),
        ("infers.sam3d_auto", "null"),
    ]
    with running_server(tmp, f"{url}/dicom-web", conf) as (server_url, proc, log):
        yield uids, series_dir, MONAILabelClient(server_url, tmpdir=str(tmp / "client")), log


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_ohifs_nrrd_answer_lies_on_the_series_grid(pacs_server):
    uids, series_dir, client, log = pacs_server
    from dicom_series import read_back

    volume = read_back(series_dir)
    f, params = client.infer("sam3d_point", uids["series"], {"foreground": [[60, 50, 56]], "background": [], **OHIF})
    data, header = nrrd.read(f)
    assert header["encoding"] == "raw" and header["type"] == "unsigned char" and data.shape == volume.shape
    import pydicom

    first = pydicom.dcmread(str(series_dir / "0000.dcm"))
    np.testing.assert_allclose(header["space origin"], [float(v) for v in first.ImagePositionPatient], atol=1e-3)
    assert data[60, 50, 56] == 1 and params["label"] == "structure"
    assert "Downloading" not in Path(log).read_text(errors="replace")  # dcmqi from the venv, not from GitHub


def test_ohifs_dicomweb_requests_reach_the_pacs_through_the_proxy(pacs_server):
    uids, _, client, _ = pacs_server
    import requests  # decodes the PACS's gzip, which the proxy passes on with its Content-Encoding, as a browser does

    studies = requests.get(f"{client._server_url}/proxy/dicom/qido/studies", timeout=30).json()
    assert uids["study"] in [s["0020000D"]["Value"][0] for s in studies]
    series = requests.get(f"{client._server_url}/proxy/dicom/qido/studies/{uids['study']}/series", timeout=30).json()
    assert uids["series"] in [s["0020000E"]["Value"][0] for s in series]


def test_a_final_label_goes_to_the_pacs_as_dicom_seg(pacs_server, orthanc, tmp_path):
    uids, series_dir, client, log = pacs_server
    url, _ = orthanc
    f, _ = client.infer("sam3d_point", uids["series"], {"foreground": [[60, 50, 56]], **OHIF})
    client.save_label(uids["series"], f, tag="final", params={"label_info": [{"name": "liver", "idx": 1}]})
    segs = _get(f"{url}/dicom-web/studies/{uids['study']}/series?Modality=SEG")
    assert segs and len(segs) == 1, segs


def _write_seg(series_dir: Path, label_file: Path, label_info: list[dict]) -> Path:
    """A DICOM SEG of `label_file` (on the series' grid) referencing the series, as a PACS holds one (dcmqi)."""
    from monailabel.datastore.utils.convert import nifti_to_dicom_seg

    return Path(nifti_to_dicom_seg(str(series_dir), str(label_file), label_info))


def _pacs_datastore(url: str, cache: Path):
    """The app's DICOMweb datastore as main.py builds it (MONAI Label's, with sam3d's lookups)."""
    from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore

    from sam3d.monailabel.datastore import guard_dicomweb_lookups

    ds = DICOMWebDatastore(DICOMwebClientX(f"{url}/dicom-web"), {"Modality": "CT"}, cache_path=str(cache))
    guard_dicomweb_lookups(ds)
    return ds


def test_a_seg_stored_on_the_pacs_is_the_final_label_that_training_reads(pacs_server, orthanc, shared_data, tmp_path):
    """OHIF's "Export DICOM SEG" stores a SEG on the PACS, not through the app: the newest SEG that references a
    series is its final label, on the image's grid, in the train task's sources; deleted from the PACS, it goes."""
    import nibabel as nib

    from sam3d.monailabel.train_task import Sam3DTrainTask

    uids, series_dir, client, log = pacs_server
    url, _ = orthanc
    truth = nib.load(str(shared_data / "totalseg_ct" / "label.nii.gz"))
    values = np.asarray(truth.dataobj).astype(np.uint8)
    seg_ids = []
    for n, (value, name) in enumerate([(5, "liver"), (1, "spleen")]):
        label = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image((values == value).astype(np.uint8), truth.affine), str(label))
        seg = _write_seg(series_dir, label, [{"name": name, "idx": 1}])
        subprocess.run(["bash", str(REPO / "scripts" / "orthanc.sh"), "upload", str(seg), "--url", url], check=True)
        seg_ids.append(str(__import__("pydicom").dcmread(str(seg)).SeriesInstanceUID))
        if n == 0:
            time.sleep(1.1)  # the newer SEG has a later SeriesTime (whole seconds)

        ds = _pacs_datastore(url, tmp_path / "cache")
        sources = Sam3DTrainTask.sources(None, ds)
        assert [s[0] for s in sources] == [uids["series"]], sources
        image_id, image, label_file = sources[0]
        assert ds.get_label_info(image_id, "final")["SeriesInstanceUID"] == seg_ids[-1]
        got, image_nii = nib.load(label_file), nib.load(image)
        assert got.shape == image_nii.shape and np.allclose(got.affine, image_nii.affine, atol=1e-3)
        mask = np.asarray(got.dataobj) > 0
        expected = values == value
        dice = 2 * (mask & expected).sum() / (mask.sum() + expected.sum())
        assert dice > 0.99, (name, dice)

    # the newest SEG deleted on the PACS: the older one is the final label again
    found = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(f"{url}/tools/lookup", data=seg_ids[-1].encode(), method="POST"), timeout=10
        ).read()
    )
    urllib.request.urlopen(urllib.request.Request(f"{url}/series/{found[0]['ID']}", method="DELETE"), timeout=10)
    ds = _pacs_datastore(url, tmp_path / "cache")
    image_id, _, label_file = Sam3DTrainTask.sources(None, ds)[0]
    assert ds.get_label_info(image_id, "final")["SeriesInstanceUID"] == seg_ids[0]
    assert (np.asarray(nib.load(label_file).dataobj) > 0).sum() == (values == 5).sum()
