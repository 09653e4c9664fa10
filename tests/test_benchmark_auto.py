"""scripts/benchmark_auto.py: time per volume of sam3d_auto, appended to a report with its provenance."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_report_names_the_grid_and_the_parts_of_the_time(tmp_path, shared_data):
    out = tmp_path / "BENCH.md"
    mr = shared_data / "totalseg_mr" / "image.nii.gz"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "benchmark_auto.py"),
        "--presets",
        "autosam3d_tiny",
        "--images",
        str(mr),
        "--runs",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    report = out.read_text()
    assert "* command: `python scripts/benchmark_auto.py --presets autosam3d_tiny" in report and "* commit: " in report
    row = next(line for line in report.splitlines() if line.startswith("| autosam3d_tiny (random weights) | cpu |"))
    assert "117x91x20 -> 117x91x20 (20 slices)" in row  # the MR (3 mm) on the served config's 3 mm grid
    assert all(f"{part} " in row for part in ("load", "encode", "decode", "resample"))

    bad = subprocess.run(cmd[:2] + ["--images", str(tmp_path / "absent.nii.gz")], capture_output=True, text=True)
    assert bad.returncode == 2 and "image not found" in bad.stderr and out.read_text() == report
