"""The harness on a label-volume model (3D-SAutoMed, no prompts): scripts/evaluate.py picks the label-volume
segmenter from the checkpoint's network, and a target's mask is the voxels of the class with the target's name."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["liver", "spleen", "aorta"]


def test_evaluate_scores_the_named_class_of_an_auto_model(shared_data, tmp_path):
    import torch

    from sam3d.data.cases import find_cases, load_case
    from sam3d.engine import save_checkpoint
    from sam3d.evaluation import segmenter_from_config
    from sam3d.metrics import segmentation_metrics
    from sam3d.models import build_network

    torch.manual_seed(0)
    model = build_network("autosam3d_tiny", class_names=CLASSES)
    ckpt = tmp_path / "auto.safetensors"
    save_checkpoint(model, ckpt, {"preset": "autosam3d_tiny", "network": model.config.to_dict()})
    config = {
        "preset": "autosam3d_tiny",
        "checkpoint": str(ckpt),
        "spacing": [3.0, 3.0, 3.0],
        "intensity": {"clip": None, "normalize": "zscore_foreground"},
    }
    model_yaml = tmp_path / "auto_model.yaml"
    model_yaml.write_text(yaml.safe_dump(config))

    out = tmp_path / "eval"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "evaluate.py"),
            "--quiet",
            "--no-baseline",
            "--model",
            str(model_yaml),
            "--data",
            str(shared_data / "totalseg_ct"),
            "--labels",
            "5,2",
            "--clicks",
            "2",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    liver = [float(r["dice"]) for r in rows if r["label_name"] == "liver"]
    kidney = [float(r["dice"]) for r in rows if r["label_name"] == "kidney_right"]
    assert len(liver) == 2 and liver[0] == liver[1]  # prompts are not used: the same answer every iteration
    assert kidney == [0.0, 0.0]  # a structure the model does not know: an empty mask

    seg = segmenter_from_config(config, device="cpu")
    assert seg.predictor.kind == "auto"
    case = find_cases(shared_data / "totalseg_ct")[0]
    loaded = load_case(case)
    mask = seg.segment(case.image, [[1, 2, 3]], [], None, "liver")
    volume = seg.engine.segment(str(case.image)).mask
    np.testing.assert_array_equal(mask, (volume == CLASSES.index("liver") + 1).astype(np.uint8))
    assert abs(segmentation_metrics(mask > 0, loaded.label == 5, loaded.spacing)["dice"] - liver[0]) < 1e-4
