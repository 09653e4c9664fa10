"""scripts/ablation.py end to end: two variants trained by the smoke recipe, measured on a real held-out case
under two protocols, then re-run without retraining."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "ablation.py"
SMOKE = "configs/train/smoke.yaml"
TWO_BLOCKS = [
    "model.network.encoder_depth=2",
    "model.network.encoder_global_attn_indexes=[0, 1]",
    "train.steps=2",
    "validation.every=0",
    "log.tensorboard=false",
]


def _run(spec: Path, out: Path, *more) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(spec), "--out", str(out), "--quiet", *more],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


@pytest.mark.slow
def test_ablation_trains_measures_and_reports(shared_data, tmp_path):
    spec = {
        "runs": str(tmp_path / "runs"),
        "sets": [{"name": "mr", "data": str(shared_data / "totalseg_mr"), "labels": [2, 5]}],
        "protocols": ["center", "noisy2"],
        "clicks": 2,
        "report_clicks": [1, 2],
        "plots": ["noisy2"],
        "baseline": True,
        "variants": {
            "plain": {"model": "sam3d_small", "train": {"config": SMOKE, "overrides": TWO_BLOCKS}},
            "segsam": {
                "model": "segsam3d",
                "train": {
                    "config": SMOKE,
                    "overrides": [*TWO_BLOCKS, "model.preset=segsam3d", "model.network.feature_stages=[0, 1]"],
                },
            },
        },
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = _run(path, tmp_path / "eval", "--train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training plain" in proc.stdout and "training segsam" in proc.stdout
    side = yaml.safe_load((tmp_path / "runs" / "segsam" / "model.yaml").read_text())
    assert side["preset"] == "segsam3d" and side["network"]["semantic_prompts"] is True

    with open(tmp_path / "eval" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # 2 protocols x 2 targets x 3 methods x 2 clicks
    assert len(rows) == 24 and {r["method"] for r in rows} == {"plain", "segsam", "random_walker"}
    assert {r["protocol"] for r in rows} == {"center", "noisy2"} and {r["set"] for r in rows} == {"mr"}
    summary = (tmp_path / "eval" / "summary.md").read_text()
    assert "| set | protocol | method | targets | Dice@1 | Dice@2 | HD95@1 (mm) | HD95@2 (mm) |" in summary
    assert summary.count("| mr | noisy2 |") == 3 and "dice_noisy2.png" in summary
    assert (tmp_path / "eval" / "dice_noisy2.png").stat().st_size > 1000
    assert not (tmp_path / "eval" / "dice_center.png").exists()

    # finished runs are not trained again
    again = _run(path, tmp_path / "eval2", "--train")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stdout


def test_table_per_structure_and_the_auto_spec(tmp_path):
    from sam3d.evaluation.ablation import ablation_table, checkpoint_of, load_spec, train_command

    rows = [
        {
            "set": "mr",
            "protocol": "center",
            "method": "full",
            "label_name": name,
            "case": "c",
            "label": v,
            "click": 1,
            "dice": d,
            "hd95": h,
        }
        for v, (name, d, h) in enumerate([("liver", 0.5, 4.0), ("spleen", 0.7, 6.0)])
    ]
    assert "| mr | center | `full` | 2 | 0.600 | 5.0 |" in ablation_table(rows, [1])
    per = ablation_table(rows, [1], per_class=True)
    assert "| mr | center | `full` | liver | 1 | 0.500 | 4.0 |" in per and "| spleen | 1 | 0.700 | 6.0 |" in per

    from sam3d.evaluation.ablation import write_ablation

    paths = write_ablation([{**r, "set": "mr"} for r in rows], tmp_path, {"name": "auto", "per_class": True}, {})
    assert paths["plot_per_structure"].stat().st_size > 1000
    assert "![Dice per structure](dice_per_structure.png)" in paths["summary"].read_text()

    spec = load_spec(REPO / "configs" / "ablations" / "autosam3d.yaml")
    assert checkpoint_of(spec, "full_top_down", REPO) == checkpoint_of(spec, "full", REPO)
    assert train_command(spec, "full_top_down", REPO) is None  # the same weights, evaluated in the other order
    assert "model.network.history_tokens=0" in train_command(spec, "local_only", REPO)


def test_refsam3d_spec_gives_text_to_the_variants_that_read_it(tmp_path):
    import torch

    from sam3d.engine import save_checkpoint
    from sam3d.evaluation.ablation import build_variant_segmenters, load_spec, train_command
    from sam3d.evaluation.segmenters import ClicksOnlySegmenter, PredictorSegmenter
    from sam3d.models import build_network

    spec = load_spec(REPO / "configs" / "ablations" / "refsam3d_cpu.yaml", [f"runs={tmp_path}"])
    assert spec["protocols"] == ["text"] and "text=null" in train_command(spec, "without_text", REPO)
    assert "model.network.hierarchical=false" in train_command(spec, "last_stage_only", REPO)
    torch.manual_seed(0)
    for name in spec["variants"]:
        (tmp_path / name).mkdir()
        save_checkpoint(
            build_network("refsam3d_tiny"),
            tmp_path / name / "model.safetensors",
            {"preset": "refsam3d_tiny", "network": {}},
        )
    segs = {s.name: s for s in build_variant_segmenters(spec, REPO, "cpu", "text")}
    assert all(isinstance(segs[v], PredictorSegmenter) and segs[v].read_text for v in ("full", "last_stage_only"))
    assert isinstance(segs["without_text"], ClicksOnlySegmenter)
    assert isinstance(segs["random_walker"], ClicksOnlySegmenter)
    plain = {s.name: s for s in build_variant_segmenters(spec, REPO, "cpu", "center")}
    assert not any(getattr(s, "read_text", False) or isinstance(s, ClicksOnlySegmenter) for s in plain.values())
