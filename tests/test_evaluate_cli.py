"""scripts/evaluate.py end to end: a real case, a tiny random-weight sam3d_small checkpoint, and a real server.

The server run uses the ball model of tests/fakes.py (a ball around the first positive click) behind a real
`monailabel start_server`, and checks that the server's numbers are the library's for the same model config.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from monailabel_server import running_server

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "evaluate.py"
TINY = {  # sam3d_small with every size cut down: random weights, fast on CPU
    "encoder_embed_dim": 48,
    "encoder_depth": 1,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": [0],
    "prompt_embed_dim": 48,
    "decoder_depth": 1,
    "decoder_mlp_dim": 64,
    "iou_head_hidden_dim": 16,
}
REQUIRED_COLUMNS = ["case", "label", "label_name", "click", "dice", "iou", "hd95", "assd", "nsd", "seconds"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "lib"), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "2")
    env["MONAI_LABEL_AUTO_UPDATE_SCORING"] = "false"
    return env


def _evaluate(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--quiet", *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=timeout,
        cwd=REPO,
    )


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    import torch

    from sam3d.engine import save_checkpoint
    from sam3d.models import build_sam3d

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "sam3d_tiny.safetensors"
    save_checkpoint(build_sam3d("sam3d_small", **TINY), path, {"preset": "sam3d_small", "network": TINY})
    return path


def test_cli_model_and_baseline_on_a_real_case(shared_data, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    r = _evaluate(
        "--model",
        "sam3d_small",
        "--checkpoint",
        tiny_checkpoint,
        "--data",
        shared_data / "totalseg_mr",
        "--labels",
        "spleen,5",
        "--clicks",
        3,
        "--out",
        out,
        "--save-masks",
        "--device",
        "cpu",
        "--note",
        "random weights",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(out)
    assert list(rows[0])[: len(REQUIRED_COLUMNS) + 1] == ["method", *REQUIRED_COLUMNS]
    assert len(rows) == 2 * 2 * 3  # methods x labels x clicks
    assert {r["method"] for r in rows} == {"sam3d_small", "random_walker"}
    assert {(r["label"], r["label_name"]) for r in rows} == {("1", "spleen"), ("5", "liver")}
    assert {r["case"] for r in rows} == {"totalseg_mr"}
    assert [r["click"] for r in rows[:3]] == ["1", "2", "3"]
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0 and float(r["seconds"]) >= 0.0 and not r["error"]
    baseline_dice = [float(r["dice"]) for r in rows if r["method"] == "random_walker" and r["click"] == "3"]
    assert max(baseline_dice) > 0.5  # the weight-free baseline segments something real

    summary = (out / "summary.md").read_text()
    assert "sam3d_small" in summary and "random_walker" in summary  # side by side
    assert "--checkpoint" in summary and "commit" in summary and "random weights" in summary
    assert "| totalseg_mr | 1 | spleen |" in summary and "NoC@90" in summary
    png = (out / "dice_vs_clicks.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    masks = sorted(p.relative_to(out).as_posix() for p in (out / "masks").rglob("*.nii.gz"))
    assert masks == [
        f"masks/{m}/totalseg_mr/{f}"
        for m in ("random_walker", "sam3d_small")
        for f in ("1_spleen.nii.gz", "5_liver.nii.gz")
    ]


@pytest.mark.parametrize(
    "extra, message",
    [([], "--prior needs a library point model and --no-baseline"), (["--no-baseline", "--protocol", "box"], "box")],
)
def test_cli_prior_refuses_what_cannot_take_a_mask(shared_data, tmp_path, extra, message):
    r = _evaluate(
        "--model", "clicknet", "--data", shared_data / "totalseg_mr", "--out", tmp_path, "--prior", "perturbed", *extra
    )
    assert r.returncode == 2 and message in r.stderr
    assert not (tmp_path / "results.csv").exists()


def test_cli_missing_weights_is_a_clear_error(shared_data, tmp_path):
    r = _evaluate(
        "--model",
        "sam3d_small",
        "--checkpoint",
        tmp_path / "absent.safetensors",
        "--data",
        shared_data / "totalseg_mr",
        "--labels",
        "1",
        "--clicks",
        1,
        "--out",
        tmp_path / "o",
    )
    assert r.returncode != 0
    assert "no weights" in r.stderr and "--model baseline" in r.stderr and "Traceback" not in r.stderr


def test_cli_baseline_only_and_protocols(shared_data, tmp_path):
    out = tmp_path / "o"
    r = _evaluate(
        "--model",
        "baseline",
        "--data",
        shared_data / "totalseg_mr",
        "--labels",
        "kidney_left",
        "--clicks",
        5,
        "--protocol",
        "noisy2",
        "--near-mm",
        6,
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(out)
    assert {r["method"] for r in rows} == {"random_walker"} and len(rows) == 5
    assert [int(r["n_foreground"]) + int(r["n_background"]) for r in rows] == [1, 6, 11, 16, 21]
    assert "noisy2, 5 clicks, seed 0, near band 6 mm" in (out / "summary.md").read_text()


# ---- a real server -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ball_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_server")
    (tmp / "studies").mkdir()
    ball = tmp / "ball.yaml"
    ball.write_text(
        yaml.safe_dump(
            {
                "factory": "fakes:build_ball_model",
                "ball_radius": 6,
                "spacing": [1.5, 1.5, 1.5],
                "cache_mb": 64,
                "max_windows": 2,
            }
        )
    )
    with running_server(tmp, tmp / "studies", [("model", ball), ("device", "cpu")]) as (url, _, _):
        yield url, ball, tmp


@pytest.mark.slow  # ~35 s on 2 quiet cores (server start-up, two CLI runs), more under load
def test_server_mode_measures_what_the_library_gives(shared_data, ball_server, tmp_path):
    from sam3d.data.cases import find_cases
    from sam3d.evaluation import EvalConfig, PredictorSegmenter, load_model_config, run_evaluation

    url, ball, server_tmp = ball_server
    common = ["--data", shared_data / "totalseg_mr", "--labels", "1", "5", "--clicks", 2, "--no-baseline"]
    r = _evaluate("--server", url, *common, "--out", tmp_path / "server")
    assert r.returncode == 0, r.stderr[-3000:]
    stored = server_tmp / "studies" / "totalseg_mr.nii.gz"
    assert stored.is_file()  # uploaded under the case's name
    server_rows = _rows(tmp_path / "server")
    assert {r["method"] for r in server_rows} == {"server:sam3d_point"} and len(server_rows) == 4

    # the library with the same model config, in this process, gives the same numbers
    segmenter = PredictorSegmenter.from_config(load_model_config(str(ball), REPO / "configs"), device="cpu")
    library_rows = run_evaluation(
        find_cases(shared_data / "totalseg_mr"), [segmenter], EvalConfig(clicks=2, labels=["1", "5"]), progress=False
    )
    for s, lib in zip(server_rows, library_rows, strict=True):
        assert (s["case"], int(s["label"]), int(s["click"])) == (lib["case"], lib["label"], lib["click"])
        assert float(s["dice"]) == pytest.approx(lib["dice"], rel=1e-5)
        assert float(s["hd95"]) == pytest.approx(lib["hd95"], rel=1e-5)  # csv: 6 digits
        assert float(s["dice"]) > 0  # the ball lies inside the organ around the first click

    # a second run uses the image already in the datastore (and must not upload it)
    before = stored.stat().st_mtime_ns
    r = _evaluate("--server", url, *common, "--out", tmp_path / "again", "--server-upload", "never")
    assert r.returncode == 0, r.stderr[-3000:]
    assert stored.stat().st_mtime_ns == before
    assert [r["dice"] for r in _rows(tmp_path / "again")] == [r["dice"] for r in server_rows]
