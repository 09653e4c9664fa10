"""scripts/export_weights.py: a run's checkpoint copied to a served path as float16, for both kinds of network."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sam3d.engine import load_model, save_checkpoint
from sam3d.engine.checkpoint import read_state_dict
from sam3d.models import build_network
from tiny_datastore import write_tiny_model

REPO = Path(__file__).resolve().parents[1]


def _auto_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = build_network("autosam3d_tiny")
    save_checkpoint(model, path, {"preset": "autosam3d_tiny", "network": model.config.to_dict(), "step": 7})
    return path


@pytest.mark.parametrize("kind", ["point", "auto"])
def test_half_export_serves_and_agrees_with_the_run(tmp_path, kind):
    src = write_tiny_model(tmp_path / "run")[1] if kind == "point" else _auto_checkpoint(tmp_path / "auto.safetensors")
    dst = tmp_path / "models" / "served.safetensors"
    dst.parent.mkdir()
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export_weights.py"), str(src), str(dst), "--half"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    agreement = float(re.search(r"sign agreement ([0-9.]+)", done.stdout).group(1))
    assert agreement > 0.99
    assert all(v.dtype == torch.float16 for v in read_state_dict(dst).values() if v.is_floating_point())
    assert type(load_model({"checkpoint": str(dst)}).model) is type(load_model({"checkpoint": str(src)}).model)
    assert dst.with_suffix(".yaml").is_file()
