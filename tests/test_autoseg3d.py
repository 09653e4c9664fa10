"""The 3D automatic model (issue 19): the network, its checkpoints, window samples, the step, training, serving."""

import contextlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sam3d.engine import EngineConfig, LoadedModel, load_model, save_checkpoint
from sam3d.engine.auto import AutoEngine
from sam3d.engine.windows import crop
from sam3d.models import AutoSeg3D, AutoSeg3DConfig, build_network, model_kind
from sam3d.training.auto_step import AutoStep
from sam3d.training.auto_window_step import AutoWindowDataset, AutoWindowStep, SliceSampling

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "tests" / "recipes" / "autoseg3d_smoke.yaml"
CLASSES = ["spleen", "kidney_right", "kidney_left", "liver", "stomach"]
TINY = {"img_size": 32, "blocks_down": [1, 1, 1]}  # a SegResNet of three stages on 32^3 windows: fast tests


def _tiny(**overrides) -> AutoSeg3D:
    torch.manual_seed(0)
    return build_network("autoseg3d_small", **{**TINY, **overrides})


def test_the_network_maps_a_window_to_background_plus_k_logits():
    model = _tiny()
    assert model_kind("autoseg3d_small") == "auto" and model.class_names == CLASSES and model.num_classes == 5
    assert model(torch.randn(2, 1, 32, 32, 32)).shape == (2, 6, 32, 32, 32)
    full = build_network("autoseg3d_small")  # the click model's backbone: 4 stages, blocks (1, 2, 2, 4)
    assert full.img_size == 64 and len(full.net.down_layers) == 4 and full.net.convInit.conv.in_channels == 1
    with pytest.raises(ValueError, match="unknown model settings"):
        AutoSeg3DConfig.from_dict({"class_names": ["liver"], "patch_size": 8})
    with pytest.raises(ValueError, match="divisible"):
        AutoSeg3DConfig(img_size=36)


def test_a_checkpoint_round_trip_rebuilds_the_network_from_its_sidecar(tmp_path):
    model = _tiny(class_names=["liver", "spleen"])
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path, {"preset": "autoseg3d_small", "network": model.config.to_dict()})
    loaded = load_model({"checkpoint": str(path), "preset": "autosam3d_small"})  # the sidecar's preset wins
    assert isinstance(loaded.model, AutoSeg3D) and loaded.model.class_names == ["liver", "spleen"]
    assert loaded.model.config == model.config
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model.eval()(x))


def test_a_window_beyond_the_volume_is_filled():
    """The training windows are cut with the engine's `crop`, which pads where a window leaves the scan."""
    x = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)
    w = crop(x, (-2, 1, 3), 4, -1.0)
    assert w.shape == (4, 4, 4) and (w[:2] == -1).all() and (w[:, :, 3:] == -1).all()
    assert torch.equal(w[2:, :, :3], x[0:2, 1:5, 3:6])


@pytest.fixture(scope="module")
def ct(shared_data):
    from sam3d.data.training import load_volume

    folder = shared_data / "totalseg_ct"
    return load_volume("totalseg_ct", str(folder / "image.nii.gz"), str(folder / "label.nii.gz"), (3.0, 3.0, 3.0))


@pytest.fixture(scope="module")
def ct_names(shared_data):
    from sam3d.training.names import case_names

    return case_names({"data": {"dir": str(shared_data), "cases": ["totalseg_ct"]}}, REPO)


def test_windows_hold_the_cts_classes_and_never_more_than_k(ct, ct_names):
    cfg = EngineConfig(spacing=(3.0,) * 3, ct_clip=(-200.0, 300.0), normalize="zscore_foreground")
    ds = AutoWindowDataset([ct], cfg, CLASSES, ct_names, size=32, seed=0, foreground_windows=1.0)
    by_name = {n: v for v, n in ct_names["totalseg_ct"].items()}
    seen = set()
    for i in range(12):
        item = ds[i]
        assert item["image"].shape == item["label"].shape == (1, 32, 32, 32) and not item["synthetic"]
        classes = set(np.unique(item["label"].numpy()).astype(int))
        assert classes <= set(range(6)) and item["label"].dtype == torch.float32
        k = int(item["target"].split()[1])  # "class k at (x, y, z)": the window is centred on a voxel of class k
        assert item["label"][0, 16, 16, 16] == k
        centre = tuple(int(a) for a in item["target"].split(" at ")[1].strip("()").split(","))
        assert int(ct.label[0][centre]) == by_name[CLASSES[k - 1]]  # the CT's own label value there
        seen |= classes
    assert seen == set(range(6))  # every class (and background) turns up
    again = ds[3]
    assert torch.equal(again["image"], ds[3]["image"]) and torch.equal(again["label"], ds[3]["label"])


def test_partial_and_reversed_scans_and_synthesised_windows(ct, ct_names):
    cfg = EngineConfig(spacing=(3.0,) * 3, ct_clip=(-200.0, 300.0), normalize="zscore_foreground")
    cut = AutoWindowDataset([ct], cfg, CLASSES, ct_names, size=32, sampling=SliceSampling(partial_prob=1.0))
    padded = 0
    for i in range(8):
        item = cut[i]
        empty = [bool((item["image"][0, :, :, z] == item["image"].min()).all()) for z in range(32)]
        padded += sum(empty) > 0
        assert not item["label"][0][..., np.array(empty)].any()  # padding is background
    assert padded >= 4  # short scans: planes beyond them are the scan's minimum
    plain = AutoWindowDataset([ct], cfg, CLASSES, ct_names, size=32)
    flipped = AutoWindowDataset([ct], cfg, CLASSES, ct_names, size=32, sampling=SliceSampling(flip_slices_prob=1.0))
    a, b = plain[2], flipped[2]
    assert a["target"] == b["target"] and torch.equal(a["label"].flip(-1), b["label"])
    synth = AutoWindowDataset([ct], cfg, CLASSES, ct_names, size=32, sampling=SliceSampling(synth_prob=1.0))
    item = synth[0]
    assert item["synthetic"] and torch.isfinite(item["image"]).all() and item["image"].std() > 0.1
    with pytest.raises(ValueError, match="fov_prob"):
        AutoWindowDataset([ct], cfg, CLASSES, ct_names, size=32, sampling=SliceSampling(fov_prob=0.3))


def test_one_step_has_a_finite_loss_that_reaches_every_layer():
    model = _tiny()
    step = AutoWindowStep(model, {"auto": {"augment": 0.5}}, autocast=contextlib.nullcontext)
    images = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(2, 1, 32, 32, 32)
    labels[:, :, 4:14, 6:20, 8:24] = 4
    labels[1, :, 18:28, 18:28, 4:12] = 1
    loss, dice = step(images, labels, [11, 12])
    loss.backward()
    assert torch.isfinite(loss) and dice.shape == (1,) and 0.0 <= float(dice) <= 1.0
    for name in ("net.convInit.conv.weight", "net.conv_final.2.conv.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="max_previous"):
        AutoWindowStep(model, {"auto": {"max_previous": 3}}, autocast=contextlib.nullcontext)
    with pytest.raises(ValueError, match="foreground_windows"):
        AutoStep(build_network("autosam3d_tiny"), {"auto": {"foreground_windows": 0.9}}, contextlib.nullcontext)


def test_train_script_runs_the_smoke_recipe_with_the_window_step(tmp_path, shared_data):
    import yaml

    from sam3d.cli.train import main

    assert main(["--config", str(SMOKE), f"output={tmp_path}", f"data.dir={shared_data}"]) == 0
    header, *rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and all(np.isfinite(float(r.split(",")[1])) for r in rows)
    side = yaml.safe_load((tmp_path / "model.yaml").read_text())
    assert side["preset"] == "autoseg3d_small" and side["step"] == 3
    loaded = load_model({"checkpoint": str(tmp_path / "model.safetensors")})
    assert isinstance(loaded.model, AutoSeg3D) and loaded.model.class_names == ["liver", "spleen", "kidney_right"]


def test_the_engine_labels_a_real_volume_on_its_own_grid(shared_data):
    image = shared_data / "totalseg_mr" / "image.nii.gz"
    model = _tiny()
    cfg = EngineConfig(spacing=(3.0, 3.0, 3.0), ct_clip=(-200.0, 300.0), normalize="zscore_foreground")
    engine = AutoEngine(LoadedModel(model, None, None, "autoseg3d_small"), cfg, order="top_down")
    res = engine.segment(str(image))
    img = nib.load(str(image))
    assert res.mask.shape == img.shape and np.allclose(res.affine, img.affine)
    assert res.mask.dtype == np.uint8 and set(np.unique(res.mask)) <= set(range(6))
    info = res.info
    assert info["order"] == "sliding_window" and info["label_names"] == {n: i + 1 for i, n in enumerate(CLASSES)}
    assert info["slices"] == info["familiar_slices"] > 0 and {"load", "decode", "resample"} <= set(res.timings)
    found = [n for n, v in info["voxels"].items() if v]
    assert set(info["confidence"]) == set(found) and all(0 < c <= 1 for c in info["confidence"].values())
    assert ("message" in info) == (not found)
    assert engine.segment(str(image), order="middle").info["cached"]  # the slice order changes nothing
