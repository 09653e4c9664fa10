"""scripts/learning_curve.py end to end on tiny volumes: real servers, labels saved through the client, the train
task run after each one, the served checkpoint measured on a held-out volume."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from tiny_datastore import AFFINE, volume, write_tiny_model

REPO = Path(__file__).resolve().parents[1]


def _cases(root: Path, numbers) -> Path:
    for n in numbers:
        image, label = volume(n)
        folder = root / f"vol{n}"
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(image, AFFINE), str(folder / "image.nii.gz"))
        nib.save(nib.Nifti1Image(label, AFFINE), str(folder / "label.nii.gz"))
    return root


@pytest.mark.slow
def test_learning_curve_through_the_server(tmp_path):
    config, ckpt = write_tiny_model(tmp_path / "model")
    pool, heldout = _cases(tmp_path / "pool", [0, 1]), _cases(tmp_path / "heldout", [2])
    out = tmp_path / "curve"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "learning_curve.py"),
        "--checkpoint",
        str(ckpt),
        "--model",
        str(config),
        "--pool",
        str(pool),
        "--heldout",
        str(heldout / "vol2"),
        str(pool / "vol0"),  # reported beside the domain: here a volume it trains on
        "--orders",
        "random",
        "uncertainty",
        "random",
        "--clicks",
        "2",
        "--train-param",
        "steps=2",
        "--out",
        "curve",
    ]  # relative: the servers run elsewhere
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(out / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    for order in ("random", "uncertainty", "random#2"):
        mine = [r for r in rows if r["order"] == order]
        assert [int(r["labelled"]) for r in mine] == [0, 1, 2]
        assert sorted(r["added"] for r in mine[1:]) == ["vol0", "vol1"]  # each pool volume labelled once
        shas = [r["model_sha256"] for r in mine]
        assert len(set(shas)) == 3  # every training replaced the served model (promote: always)
        assert all(0.0 <= float(r["dice_2"]) <= 1.0 and 0.0 <= float(r["vol0.dice_2"]) <= 1.0 for r in mine)
    assert (out / "learning_curve.png").stat().st_size > 1000
    summary = (out / "summary.md").read_text()
    assert "| uncertainty | 2 |" in summary and "| random#2 | 2 |" in summary and " vol0 Dice@2 |" in summary
    assert not [p for p in out.iterdir() if p.name.startswith("curve_")]  # the servers' work folders are gone
