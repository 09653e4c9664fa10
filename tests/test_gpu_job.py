"""scripts/gpu_job.sh, the one-call GPU experiment, run here on the CPU with the smoke recipe: probe, sized run,
float16 export split into parts that rejoin to a loadable checkpoint, logs and held-out evaluation in OUT."""

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_job_runs_one_whole_experiment(shared_data, tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "SAM3D_JOB_WORK": str(tmp_path / "work"),
        "SAM3D_JOB_SETS": "totalseg_mr",
        "SAM3D_JOB_CLICKS": "2",
        "OMP_NUM_THREADS": "2",
    }
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "gpu_job.sh"),
            "run",
            "configs/train/smoke.yaml",
            "15",
            f"data.dir={shared_data}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "steps/s ->" in proc.stderr
    parts = sorted(out.glob("model.part.*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    joined = tmp_path / "model.safetensors"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    (tmp_path / "model.yaml").write_bytes((out / "model.yaml").read_bytes())
    from sam3d.engine import load_model

    assert load_model({"checkpoint": str(joined)}).model.img_size == 32
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"metrics.csv", "summary.json", "recipe.yaml", "train.log", "probe.log"} <= names
    assert "state.pt" not in names and "model.safetensors" not in names
    assert "Dice" in (out / "eval_totalseg_mr.md").read_text()
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back
