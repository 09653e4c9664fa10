"""The app's configuration and the `sam3d_point` task in-process: request parsing, error mapping, weights state."""

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from fastapi import HTTPException

from sam3d.engine import Sam3DInputError
from sam3d.monailabel import AppConfigError, Sam3DPointInfer, TaskSpec, load_app_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BALL = {"factory": "fakes:build_ball_model", "ball_radius": 3, "spacing": [1.5, 1.5, 1.5]}
LABELS = {"liver": 5, "spleen": 1, "structure": 255}


def spec(model_config=None, labels=None, error=None, name="sam3d_point") -> TaskSpec:
    return TaskSpec(name, "test", dict(model_config or BALL), "test task", dict(labels or LABELS), error=error)


@pytest.fixture
def tmpdir_for_results(tmp_path, monkeypatch):
    """Result files land in an own folder, so a test can see what is left there."""
    d = tmp_path / "results"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


@pytest.fixture(scope="module")
def ct(shared_data):
    return str(shared_data / "totalseg_ct" / "image.nii.gz")


class StubEngine:
    """Records requests; raises what it is told to."""

    def __init__(self, raise_on_segment=None):
        self.calls, self.raise_on_segment = [], raise_on_segment

    def segment(self, image_path, foreground, background, roi=None, label="structure"):
        self.calls.append((image_path, foreground, background, roi, label))
        if self.raise_on_segment:
            raise self.raise_on_segment
        from sam3d.engine import SegmentResult

        timings = {"load": 0.0, "encode": 0.0, "decode": 0.0, "total": 0.0}
        info = {"windows": [], "embedding_cached": True, "model": "Stub", "checkpoint": None}
        return SegmentResult(np.zeros((4, 4, 4), np.uint8), np.eye(4), timings, info)


def stub_task(engine, **kw) -> Sam3DPointInfer:
    return Sam3DPointInfer(spec(), device="cpu", engine_factory=lambda cfg, device: engine, **kw)


def status_of(fn) -> HTTPException:
    with pytest.raises(HTTPException) as e:
        fn()
    return e.value


# ---- configuration --------------------------------------------------------------------------------------------


def test_shipped_config_serves_the_shipped_click_model():
    c = load_app_config({}, CONFIGS)
    t = c.infers["sam3d_point"]
    assert t.error is None and t.model_name == "clicknet"
    assert t.model_config["preset"] == "clicknet_geodesic"
    assert t.model_config["checkpoint"] == str(REPO / "models" / "clicknet.safetensors")  # against the project root
    assert Path(t.model_config["checkpoint"]).is_file()  # the weights ship with the repository
    assert c.labels["hippocampus_left"] and "structure" in c.labels  # brain structures among the suggestions
    assert c.device == "auto" and c.preload is False and c.strict_labels is True
    assert c.labels["liver"] == 5 and c.labels["aorta"] == 52 and "structure" in c.labels


def test_conf_short_keys_and_dotted_paths(tmp_path):
    c = load_app_config(
        {
            "model": "sam_med3d_turbo",
            "checkpoint": "weights/turbo.pth",
            "device": "cuda:1",
            "preload": "true",
            "strict_labels": "false",
            "infers.sam3d_point.spacing": "[2, 2, 2]",
            "infers.extra.model": "sam3d_small",
            "labels.tumour": "200",
            "server_mode": "true",  # MONAI Label's own key: ignored
            "nonsense": "1",  # unknown: ignored with a warning
        },
        CONFIGS,
        cwd=tmp_path,
    )
    t = c.infers["sam3d_point"]
    assert t.model_config["preset"] == "sam_med3d_turbo"
    assert t.model_config["checkpoint"] == str(tmp_path / "weights" / "turbo.pth")  # --conf paths: against cwd
    assert t.model_config["spacing"] == [2, 2, 2]
    assert c.device == "cuda:1" and c.preload is True and c.strict_labels is False
    assert c.labels["tumour"] == 200 and c.infers["sam3d_point"].labels["tumour"] == 200
    extra = c.infers["extra"]
    assert extra.model_config["preset"] == "sam3d_small" and extra.conf_prefix == "infers.extra."


def test_conf_can_point_at_a_model_yaml_and_remove_a_task(tmp_path):
    (tmp_path / "ball.yaml").write_text(yaml.safe_dump(BALL))
    conf = {"model": "ball.yaml", "infers.gone.model": "sam3d_small", "infers.gone": "null"}
    c = load_app_config(conf, CONFIGS, cwd=tmp_path)
    assert c.infers["sam3d_point"].model_config["factory"] == "fakes:build_ball_model"
    assert "gone" not in c.infers


def test_unknown_model_is_a_task_error_not_a_startup_failure():
    c = load_app_config({"model": "no_such_model"}, CONFIGS)
    assert "no_such_model" in c.infers["sam3d_point"].error and "sam3d_small" in c.infers["sam3d_point"].error


def test_a_tasks_kind_is_its_models_and_setting_it_is_a_task_error():
    c = load_app_config({"infers.odd.model": "sam3d_small", "infers.odd.kind": "telepathy"}, CONFIGS)
    kinds = {name: (t.kind, t.error) for name, t in c.infers.items() if name != "odd"}
    assert kinds == {
        "sam3d_point": ("point", None),
        "sam3d_semantic_point": ("point", None),
        "sam3d_text": ("text", None),
        "sam3d_auto": ("auto", None),
    }
    assert "infers.odd.kind` is not a setting" in c.infers["odd"].error
    assert "kind" not in c.infers["sam3d_auto"].model_config


def test_broken_app_yaml_fails_loudly(tmp_path):
    (tmp_path / "app.yaml").write_text("infers: [1, 2\n")
    with pytest.raises(AppConfigError):
        load_app_config({"config": str(tmp_path / "app.yaml")}, CONFIGS)
    with pytest.raises(AppConfigError):
        load_app_config({"preload": "maybe"}, CONFIGS)


# ---- request parsing and error mapping ----------------------------------------------------------------------------


def test_request_is_passed_to_the_engine(ct, tmpdir_for_results):
    engine = StubEngine()
    task = stub_task(engine)
    req = {"image": ct, "foreground": [[1, 2, 3]], "background": [[4, 5, 6.0]], "roi": [], "label": "liver", "x": 1}
    out, res = task(req)
    assert engine.calls == [(ct, [[1, 2, 3]], [[4, 5, 6.0]], None, "liver")]
    assert Path(out).parent == tmpdir_for_results and nib.load(out).shape == (4, 4, 4)
    assert res["label_names"] == {"liver": 1} and res["task"] == "sam3d_point" and res["network"] == "Stub"
    assert {"load", "encode", "decode", "write", "request"} <= set(res["timings"])


def test_missing_label_means_the_generic_structure(ct, tmpdir_for_results):
    engine = StubEngine()
    stub_task(engine)({"image": ct, "foreground": [[1, 2, 3]]})
    assert engine.calls[0][-1] == "structure"


@pytest.mark.parametrize(
    "request_, status, fragment",
    [
        ({}, 422, "no prompt"),
        ({"foreground": [], "background": [], "roi": []}, 422, "no prompt"),
        ({"foreground": [[1, 2]]}, 422, "voxel indices"),
        ({"foreground": "1,2,3"}, 422, "voxel indices"),
        ({"foreground": [[1, 2, float("nan")]]}, 422, "voxel indices"),
        ({"foreground": [[1, 2, True]]}, 422, "voxel indices"),
        ({"foreground": [[1, 2, 3]], "roi": "all"}, 422, "roi"),
        ({"foreground": [[1, 2, 3]], "label": 5}, 422, "label"),
        ({"foreground": [[1, 2, 3]], "label": "x" * 129}, 422, "at most 128"),
        ({"foreground": [[1, 2, 3]], "label": "liver\n"}, 422, "printable"),
    ],
)
def test_bad_requests_are_422_before_any_model_work(ct, request_, status, fragment):
    engine = StubEngine()
    err = status_of(lambda: stub_task(engine)({"image": ct, **request_}))
    assert err.status_code == status and fragment in err.detail
    assert engine.calls == []


@pytest.mark.parametrize("strict", [True, False])
def test_the_click_task_takes_any_structure_name(ct, tmpdir_for_results, strict):
    engine = StubEngine()
    for name in ("left hippocampus", "autochthon_left", "Segment_1"):
        stub_task(engine, strict_labels=strict)({"image": ct, "foreground": [[1, 2, 3]], "label": name})
        assert engine.calls[-1][-1] == name


def test_missing_image_is_404(tmp_path):
    task = stub_task(StubEngine())
    err = status_of(lambda: task({"image": str(tmp_path / "nope.nii.gz"), "foreground": [[1, 2, 3]]}))
    assert err.status_code == 404
    err = status_of(lambda: task({"image": "", "foreground": [[1, 2, 3]]}))
    assert err.status_code == 422 and "no image" in err.detail


def test_engine_input_errors_are_422_and_leave_no_file(ct, tmpdir_for_results):
    engine = StubEngine(raise_on_segment=Sam3DInputError("foreground point [1, 2, 999] is outside the image"))
    err = status_of(lambda: stub_task(engine)({"image": ct, "foreground": [[1, 2, 999]]}))
    assert err.status_code == 422 and "outside the image" in err.detail
    assert list(tmpdir_for_results.iterdir()) == []


def test_a_failed_write_leaves_no_file(ct, tmpdir_for_results, monkeypatch):
    import monailabel.transform.writer

    def half_written(data, filename, **kw):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(monailabel.transform.writer, "write_nifti", half_written)
    with pytest.raises(OSError):
        stub_task(StubEngine())({"image": ct, "foreground": [[1, 2, 3]]})
    assert list(tmpdir_for_results.iterdir()) == []


# ---- weights ---------------------------------------------------------------------------------------------------


def test_missing_weights_keep_the_task_listed_and_answer_503(tmp_path, ct):
    t = Sam3DPointInfer(spec({"preset": "sam3d_small", "checkpoint": str(tmp_path / "none.safetensors")}), device="cpu")
    assert t.is_valid()
    info = t.info()
    assert info["type"] == "deepgrow" and info["dimension"] == 3 and info["labels"] == LABELS
    assert info["sam3d"]["status"] == "weights_missing"
    assert info["description"].startswith("UNAVAILABLE") and "--conf checkpoint" in info["description"]
    err = status_of(lambda: t({"image": ct, "foreground": [[1, 2, 3]]}))
    assert err.status_code == 503 and "weights missing" in err.detail and "none.safetensors" in err.detail

    none = Sam3DPointInfer(spec({"preset": "sam3d_small", "checkpoint": None}, name="other"), device="cpu")
    assert none.status()[0] == "weights_missing"
    assert "no checkpoint configured" in none.info()["description"]


def test_config_error_is_listed_and_answers_503(ct):
    t = Sam3DPointInfer(spec(error="model config 'x' not found"), device="cpu")
    assert t.is_valid() and "configuration error" in t.info()["description"]
    assert status_of(lambda: t({"image": ct, "foreground": [[1, 2, 3]]})).status_code == 503


def test_load_failure_is_500_with_the_reason_and_shown_in_info(ct):
    def broken(cfg, device):
        raise RuntimeError("size mismatch for image_encoder.pos_embed")

    t = Sam3DPointInfer(spec(), device="cpu", engine_factory=broken)
    err = status_of(lambda: t({"image": ct, "foreground": [[1, 2, 3]]}))
    assert err.status_code == 500 and "size mismatch" in err.detail
    assert t.info()["sam3d"]["status"] == "load_failed"


def test_preload_loads_in_the_background():
    t = Sam3DPointInfer(spec(), device="cpu", preload=True)
    for _ in range(100):
        if t.status()[0] == "ready":
            break
        time.sleep(0.05)
    assert t.status()[0] == "ready"


def test_an_unusable_device_is_a_config_error(ct):
    import torch

    bad = "cuda:99" if torch.cuda.is_available() else "cuda"
    t = Sam3DPointInfer(spec(), device=bad)
    assert t.status()[0] == "config_error" and "CUDA" in t.info()["description"]
    assert status_of(lambda: t({"image": ct, "foreground": [[1, 2, 3]]})).status_code == 503
    assert Sam3DPointInfer(spec(), device="tpu").status()[0] == "config_error"


def test_a_changed_checkpoint_is_reloaded_and_a_bad_one_keeps_the_last_good(tmp_path, ct, tmpdir_for_results):
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(b"v1")
    built = []

    def factory(cfg, device):
        data = Path(cfg["checkpoint"]).read_bytes()
        if data == b"broken":
            raise ValueError("not a safetensors file")
        built.append(data)
        return StubEngine()

    t = Sam3DPointInfer(spec({"preset": "sam3d_small", "checkpoint": str(ckpt)}), device="cpu", engine_factory=factory)
    assert t.status()[0] == "not_loaded"
    req = {"image": ct, "foreground": [[1, 2, 3]]}
    t(req)
    t(req)
    assert built == [b"v1"] and t.status()[0] == "ready"
    ckpt.write_bytes(b"v2-longer")
    t(req)
    assert built == [b"v1", b"v2-longer"]
    ckpt.write_bytes(b"broken")
    t(req)  # still answers, with the v2 weights
    state, message = t.status()
    assert state == "ready" and "previous weights" in message


def test_ball_model_through_the_real_engine(ct, tmpdir_for_results):
    t = Sam3DPointInfer(spec(), device="cpu")
    click = [60, 50, 56]
    out, res = t({"image": ct, "foreground": [click], "label": "liver"})
    mask = np.asarray(nib.load(out).dataobj)
    assert mask.shape == nib.load(ct).shape and mask[tuple(click)] == 1
    np.testing.assert_allclose(np.argwhere(mask).mean(0), click, atol=1.0)
    assert res["embedding_cached"] is False and res["network"] == "ball"
    _, res2 = t({"image": ct, "foreground": [click, [61, 50, 56]], "label": "liver"})
    assert res2["embedding_cached"] is True and res2["timings"]["encode"] == 0.0
    assert t._engine.model.encode_calls == 1


TINY = dict(
    encoder_embed_dim=48,
    encoder_depth=1,
    encoder_num_heads=2,
    encoder_global_attn_indexes=[0],
    prompt_embed_dim=48,
    decoder_num_heads=2,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=16,
)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_a_preset_network_with_weights_on_disk(tmp_path, ct, tmpdir_for_results, fmt):
    """The path real models take: preset + network overrides + a checkpoint file (ours, or SAM-Med3D's .pth)."""
    import torch

    from sam3d.engine import save_checkpoint
    from sam3d.models import build_sam3d

    net = build_sam3d("sam3d_small", **TINY)
    path = tmp_path / f"tiny.{fmt}"
    if fmt == "safetensors":
        save_checkpoint(net, path, {"preset": "sam3d_small", "network": TINY})
    else:
        torch.save({"model_state_dict": net.state_dict(), "epoch": 1}, path)
    cfg = {"preset": "sam3d_small", "network": TINY, "checkpoint": str(path), "max_windows": 1}
    t = Sam3DPointInfer(spec(cfg), device="cpu")
    out, res = t({"image": ct, "foreground": [[60, 50, 56]], "label": "liver"})
    assert nib.load(out).shape == nib.load(ct).shape
    assert res["checkpoint"] == str(path) and res["network"] == "sam3d_small" and t.status()[0] == "ready"


# ---- the app ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [-1, 1])  # -1: in the request's thread; 1: MONAI Label's infer thread pool
def test_app_registers_tasks_and_maps_errors_to_http(tmp_path, shared_data, monkeypatch, concurrency):
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_INFER_CONCURRENCY", concurrency)
    monkeypatch.setattr(settings, "MONAI_LABEL_SESSION_PATH", str(tmp_path / "sessions"))
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTO_UPDATE_SCORING", False)
    monkeypatch.setattr(settings, "MONAI_LABEL_DATASTORE_AUTO_RELOAD", False)
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(shared_data / "totalseg_mr" / "image.nii.gz", studies / "mr.nii.gz")
    (tmp_path / "ball.yaml").write_text(yaml.safe_dump(BALL))

    main_py = REPO / "apps" / "sam3d" / "main.py"
    mod_spec = importlib.util.spec_from_file_location("sam3d_app_main", main_py)
    main = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(main)
    app = main.MyApp(str(main_py.parent), str(studies), {"model": str(tmp_path / "ball.yaml"), "device": "cpu"})

    info = app.info()
    assert info["models"]["sam3d_point"]["type"] == "deepgrow" and "liver" in info["labels"]
    assert set(info["strategies"]) == {"random", "first", "uncertainty"}
    err = status_of(lambda: app.infer({"model": "sam3d_point", "image": "nope", "foreground": [[1, 2, 3]]}))
    assert err.status_code == 404 and "nope" in err.detail
    err = status_of(lambda: app.infer({"model": "no_such_task", "image": "mr", "foreground": [[1, 2, 3]]}))
    assert err.status_code == 404 and "no_such_task" in err.detail
    err = status_of(lambda: app.infer({"model": "sam3d_point", "image": "mr", "foreground": [[40, 30, 99]]}))
    assert err.status_code == 422 and "outside the image" in err.detail  # survives the thread pool's f.result()
    result = app.infer({"model": "sam3d_point", "image": "mr", "foreground": [[40, 30, 10]], "label": "liver"})
    assert nib.load(result["file"]).shape == (117, 91, 20)
    os.unlink(result["file"])
