"""scripts/evaluate.py --protocol text: the name first, then clicks, with a tiny random RefSAM3D checkpoint."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sam3d.data.cases import find_cases, load_case
from sam3d.evaluation import ClicksOnlySegmenter, EvalConfig, run_target

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_refsam3d(tmp_path_factory) -> Path:
    import torch

    from sam3d.engine import save_checkpoint
    from sam3d.models import build_network

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "refsam3d_tiny.safetensors"
    save_checkpoint(build_network("refsam3d_tiny"), path, {"preset": "refsam3d_tiny", "network": {}})
    return path


class _Recorder:
    name = "recorder"

    def __init__(self):
        self.calls = []

    def describe(self):
        return {}

    def segment(self, image_path, foreground, background, roi, label):
        self.calls.append((list(foreground), list(background), label))
        return np.zeros(self.shape, dtype=np.uint8)


def test_text_protocol_gives_the_name_first_then_center_clicks(shared_data):
    loaded = load_case(find_cases(shared_data / "totalseg_ct")[0])
    rec = _Recorder()
    rec.shape = loaded.label.shape
    rows = run_target(rec, loaded, 5, EvalConfig(protocol="text", clicks=3)).rows
    assert rec.calls[0] == ([], [], "liver")  # the name alone
    assert len(rec.calls[1][0]) == 1 and len(rec.calls[2][0]) == 2  # then one center click per iteration
    assert [r["n_foreground"] for r in rows] == [0, 1, 2]
    baseline = ClicksOnlySegmenter(rec)
    assert baseline.segment(str(loaded.case.image), [], [], None, "liver").sum() == 0 and len(rec.calls) == 3


def test_evaluate_cli_text_protocol(tmp_path, shared_data, tiny_refsam3d):
    out = tmp_path / "eval"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "evaluate.py"),
        "--quiet",
        "--model",
        "refsam3d",
        "--checkpoint",
        str(tiny_refsam3d),
        "--data",
        str(shared_data / "totalseg_ct"),
        "--labels",
        "liver",
        "kidney_left",
        "--protocol",
        "text",
        "--clicks",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    methods = {r["method"] for r in rows}
    assert methods == {"refsam3d", "random_walker"}, methods
    assert not any(r["error"] for r in rows), [r["error"] for r in rows if r["error"]]
    first = [r for r in rows if r["click"] == "1"]
    assert len(first) == 4 and all(r["n_foreground"] == "0" for r in first)
    assert all(float(r["dice"]) == 0.0 for r in first if r["method"] == "random_walker")
    assert all(int(r["n_foreground"]) + int(r["n_background"]) == 1 for r in rows if r["click"] == "2")
    assert "text" in (out / "summary.md").read_text()


def test_server_segmenter_sends_the_name_as_text(monkeypatch, tmp_path):
    """Protocol `text` through a server: the name goes as `text` (any name), the label only when declared."""
    import nibabel as nib

    from sam3d.evaluation import ServerSegmenter
    from sam3d.monailabel import api_client

    sent = []

    class FakeClient:
        def __init__(self, url, tmpdir=None):
            self.tmpdir = tmpdir

        def info(self):
            return {"models": {"sam3d_text": {"labels": {"liver": 5}}}}

        def datastore(self):
            return {"objects": {"ct": {}}}

        def infer(self, model, image_id, params):
            sent.append(params)
            out = Path(self.tmpdir) / "mask.nii.gz"
            nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), str(out))
            return str(out), {}

    monkeypatch.setattr(api_client, "Sam3DClient", FakeClient)  # ServerSegmenter's client (MONAI Label's + token)
    seg = ServerSegmenter("http://fake", "sam3d_text", send_text=True)
    seg._ids["ct.nii.gz"] = "ct"
    seg.segment("ct.nii.gz", [], [], None, "kidney_left")
    seg.segment("ct.nii.gz", [[1, 1, 1]], [], None, "liver")
    assert sent[0]["text"] == "kidney_left" and sent[0]["label"] == "structure" and sent[0]["foreground"] == []
    assert sent[1]["text"] == "liver" and sent[1]["label"] == "liver"
    seg.close()


def test_text_phrasings_scores_every_phrasing_and_gates_unknown_text(tmp_path, shared_data):
    import nibabel as nib
    import torch

    from sam3d.engine import save_checkpoint
    from sam3d.models import build_network

    case = tmp_path / "cases" / "ct_crop"  # the CT around its liver: a small real case
    case.mkdir(parents=True)
    for part in ("image", "label"):
        img = nib.load(str(shared_data / "totalseg_ct" / f"{part}.nii.gz"))
        nib.save(img.slicer[40:100, 30:80, 80:104], str(case / f"{part}.nii.gz"))
    (case / "label_names.json").write_text((shared_data / "totalseg_ct" / "label_names.json").read_text())
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(
        build_network("refsam3d_tiny", vocabulary=["liver", "spleen"]),
        ckpt,
        {"preset": "refsam3d_tiny", "network": {"vocabulary": ["liver", "spleen"]}},
    )
    out = tmp_path / "phrasings"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "text_phrasings.py"),
        "--checkpoint",
        str(ckpt),
        "--data",
        str(case.parent),
        "--label",
        "liver",
        "--text",
        "femur",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "phrasings.csv") as f:
        rows = {r["text"]: r for r in csv.DictReader(f)}
    phrasings = {"liver", "the liver", "Liver", "hepatic parenchyma", "A computed tomography of the liver.", "femur"}
    assert phrasings <= set(rows)
    assert rows["the liver"]["closest_name"] == "liver" and float(rows["the liver"]["similarity"]) > 0.8
    assert rows["hepatic parenchyma"]["closest_name"] == "hepatic parenchyma"  # a known synonym of a trained name
    assert float(rows["femur"]["dice"]) == 0.0 and float(rows["femur"]["similarity"]) < 0.4  # gated: empty mask
    assert rows["femur"]["kind"] == "extra" and rows["Liver"]["kind"] == "name"
    assert (out / "phrasings.png").stat().st_size > 0 and "hepatic parenchyma" in (out / "phrasings.md").read_text()
    bad = subprocess.run(
        [*cmd[:-4], "--label", "femur_left", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert bad.returncode != 0 and "no case" in bad.stderr


def test_text_phrasings_reports_a_refused_name_under_the_structure_it_was_asked_for(tmp_path, shared_data):
    from sam3d.cli.text_phrasings import main

    out = tmp_path / "phrasings"
    args = ["--model", "autosam3d_text", "--data", str(shared_data / "totalseg_mr"), "--label", "liver"]
    assert main([*args, "--text", "pancreas", "--out", str(out)]) == 0
    with open(out / "phrasings.csv") as f:
        rows = list(csv.DictReader(f))
    refused = next(r for r in rows if r["text"] == "pancreas")
    assert refused["label"] == "liver" and refused["closest_name"] == "refused (closest: stomach)"
    assert float(refused["dice"]) == 0.0 and float(refused["similarity"]) < 0.75
    assert all(r["label"] == "liver" for r in rows)
    assert float(next(r for r in rows if r["text"] == "hepar")["dice"]) > 0.5
