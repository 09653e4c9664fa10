"""RefSAM3D training: names from the cases, zoom-out samples, the text step, the smoke recipe end to end."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from offline import no_network  # noqa: F401 - fixture
from sam3d.engine import EngineConfig, load_model
from sam3d.engine.text_search import TextEngine, zoom_out_layout
from sam3d.models import RefSam3D
from sam3d.training import load_recipe
from sam3d.training.names import case_names
from sam3d.training.text_step import ZoomOutDataset, trained_vocabulary

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "tests" / "recipes" / "refsam3d_smoke.yaml"


def test_case_names_with_a_builtin_table(shared_data):
    recipe = {"data": {"dir": str(shared_data)}, "text": {"names": {"voxelmorph_aseg": "freesurfer_aseg"}}}
    names = case_names(recipe, REPO)
    assert names["totalseg_ct"][5] == "liver" and names["colin27_aal"][1] == "Precentral_L"
    assert names["voxelmorph_aseg"][17] == "Left-Hippocampus"
    with pytest.raises(ValueError, match="unknown table"):
        case_names({"text": {"names": {"x": "nope"}}}, REPO)


def test_the_vocabulary_is_what_the_recipe_targets():
    names = {"ct": {1: "spleen", 5: "liver", 7: "pancreas"}, "mr": {1: "Left-Hippocampus"}}
    assert trained_vocabulary(names, {}) == ["left hippocampus", "liver", "pancreas", "spleen"]
    assert trained_vocabulary(names, {"data": {"cases": ["ct"]}}) == ["liver", "pancreas", "spleen"]
    recipe = {"sampling": {"targets": {"ct": [5, 1]}}}
    assert trained_vocabulary(names, recipe) == ["left hippocampus", "liver", "spleen"]


def test_zoom_out_samples_hold_the_whole_structure(shared_data):
    from sam3d.data.training import SamplingConfig, WindowDataset, load_volume

    vol = load_volume(
        "totalseg_ct",
        str(shared_data / "totalseg_ct" / "image.nii.gz"),
        str(shared_data / "totalseg_ct" / "label.nii.gz"),
        (3.0, 3.0, 3.0),
    )
    windows = WindowDataset([vol], EngineConfig(spacing=(3.0,) * 3), SamplingConfig(size=32, min_voxels=8), seed=0)
    ds = ZoomOutDataset(windows, prob=1.0)
    item = ds[3]
    assert item["image"].shape == (1, 32, 32, 32) and item["label"].shape == (1, 32, 32, 32)
    value = int(item["target"])
    # the whole volume, shrunk by one scale (122 x 101 x 112 -> 32 x 26 x 29, centred): the structure's share of
    # that part is its share of the volume, and nothing lies outside it
    where, inner = zoom_out_layout(tuple(vol.image.shape[1:]), 32)
    assert inner == (32, 26, 29) and float(item["label"].sum()) == float(item["label"][0][where].sum())
    share = float((vol.label == value).float().mean())
    assert abs(float(item["label"][0][where].mean()) - share) < 0.25 * share + 1e-3
    assert torch.isfinite(item["image"]).all() and float(item["image"].std()) > 0.1
    assert ZoomOutDataset(windows, prob=0.0)[3]["start"] == windows[3]["start"]  # plain windows otherwise


def test_thin_samples_are_a_centred_slab_through_the_target(shared_data):
    from sam3d.data.training import SamplingConfig, WindowDataset, load_volume

    vol = load_volume(
        "totalseg_ct",
        str(shared_data / "totalseg_ct" / "image.nii.gz"),
        str(shared_data / "totalseg_ct" / "label.nii.gz"),
        (3.0, 3.0, 3.0),
    )
    cfg = SamplingConfig(size=32, min_voxels=8, synth_prob=0.0, intensity_aug_prob=0.0, thin_prob=1.0, thin_slices=3)
    windows = WindowDataset([vol], EngineConfig(spacing=(3.0,) * 3), cfg, seed=0)
    for item in (windows[5], ZoomOutDataset(windows, prob=1.0)[5]):
        slices = np.flatnonzero(item["image"][0].std(dim=(0, 1)).numpy() > 0)  # slices with an image in them
        assert 1 <= len(slices) <= 3 and abs(slices.mean() - 15.5) <= 1.0  # a slab in the middle
        held = np.flatnonzero(item["label"][0].sum(dim=(0, 1)).numpy())
        assert len(held) and set(held) <= set(slices)  # the target only where the image is


def test_smoke_recipe_trains_and_the_checkpoint_serves_text(tmp_path, shared_data, no_network):  # noqa: F811
    from sam3d.training import train

    recipe = load_recipe(SMOKE, [f"output={tmp_path}", f"data.dir={shared_data}"])
    out = train(0, recipe, REPO)
    assert out["step"] == 3 and np.isfinite(out["loss"])
    header, *rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3
    val = (tmp_path / "val.csv").read_text().splitlines()
    assert val[0].startswith("step,dice_text,dice_1") and len(val) == 2  # text Dice beside the click Dice
    side = yaml.safe_load((tmp_path / "model.yaml").read_text())
    assert side["preset"] == "refsam3d_tiny" and "liver" in side["network"]["vocabulary"]
    assert "left kidney" in side["network"]["vocabulary"]
    loaded = load_model({"checkpoint": str(tmp_path / "model.safetensors")})
    assert isinstance(loaded.model, RefSam3D) and "liver" in loaded.model.config.vocabulary
    # the frozen encoder did not move, the adapters did
    state = torch.load(tmp_path / "state.pt", weights_only=True)["model"]
    torch.manual_seed(recipe["seed"])
    init = RefSam3D(loaded.model.config).state_dict()
    key = "image_encoder.blocks.0.attn.qkv.weight"
    assert torch.equal(state[key], init[key])
    assert not torch.equal(init["adapters.0.up.weight"], state["adapters.0.up.weight"])
    engine = TextEngine(loaded, EngineConfig(spacing=(3.0, 3.0, 3.0)))
    res = engine.segment_text(str(shared_data / "totalseg_ct" / "image.nii.gz"), "the liver")
    assert res.mask.shape == (122, 101, 112) and res.info["closest_name"] == "liver"


def test_gpu_recipe_builds_refsam3d_from_the_model_config():
    from sam3d.training.trainer import build_model

    small = "model.network={encoder_depth: 4, encoder_global_attn_indexes: [1, 3]}"
    recipe = load_recipe(REPO / "configs" / "train" / "refsam3d.yaml", ["model.init_required=false", small])
    model, sidecar, engine_cfg = build_model(recipe, REPO)
    assert isinstance(model, RefSam3D) and sidecar["preset"] == "refsam3d_turbo"
    assert recipe["data"]["cases"] == ["totalseg_ct", "voxelmorph_aseg"]
    assert recipe["optim"]["freeze"] == ["image_encoder"]
    assert engine_cfg.spacing == (1.5, 1.5, 1.5)
    with pytest.raises(ValueError, match="init_checkpoint"):
        build_model(load_recipe(REPO / "configs" / "train" / "refsam3d.yaml", [small]), REPO)


@pytest.mark.slow
def test_training_teaches_the_text_to_pick_the_structure(tmp_path, no_network):  # noqa: F811
    """Three equally bright ellipsoids named liver, spleen and left kidney: only the text tells them apart. After a
    short run (about 2.5 min on 2 CPU cores) the whole-image search answers each name with its own ellipsoid,
    whatever template phrases it."""
    import json

    import nibabel as nib

    from sam3d.training import train

    rng = np.random.default_rng(0)
    shape = (30, 30, 30)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    for n in range(2):
        label = np.zeros(shape, np.int16)
        blobs = [((9, 9, 10), (5, 4, 6)), ((20, 18, 12), (4, 6, 5)), ((12, 20, 20), (4, 4, 4))]  # (centre, radii)
        for value, (c, r) in enumerate(blobs, 1):
            label[(((grid - np.add(c, n)) / r) ** 2).sum(-1) <= 1] = value
        image = 100 + 150 * (label > 0) + rng.normal(0, 10, shape)
        folder = tmp_path / "cases" / f"case{n}"
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(folder / "image.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.diag([2.0, 2.0, 2.0, 1.0])), str(folder / "label.nii.gz"))
    (tmp_path / "cases" / "label_names.json").write_text(json.dumps({"1": "liver", "2": "spleen", "3": "kidney_left"}))
    sampling = (
        "sampling={min_voxels: 8, synth_prob: 0.0, deform_prob: 0.0, random_window_prob: 0.0, jitter: 0.05, "
        "merge_prob: 0.0, intensity_aug_prob: 0.0}"
    )
    recipe = load_recipe(
        SMOKE,
        [
            f"output={tmp_path / 'run'}",
            f"data.dir={tmp_path / 'cases'}",
            "data.cases=null",
            "train.steps=450",
            "checkpoint.every=450",
            "optim.freeze=[]",
            "optim.lr=2.0e-3",
            "optim.warmup_steps=10",
            "model.spacing=[2.0, 2.0, 2.0]",
            "text.refine_rounds=0",
            "text.zoom_out_prob=0.0",
            sampling,
        ],
    )
    train(0, recipe, REPO)
    engine = TextEngine(
        load_model({"checkpoint": str(tmp_path / "run" / "model.safetensors")}), EngineConfig(spacing=(2.0, 2.0, 2.0))
    )
    label = np.asarray(nib.load(str(tmp_path / "cases" / "case1" / "label.nii.gz")).dataobj)

    def dice(a, b):
        return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)

    for value, name in [(1, "liver"), (2, "spleen"), (3, "left kidney")]:
        for prompt in (name, f"the {name}", name.capitalize(), f"A computed tomography of the {name}."):
            mask = engine.segment_text(str(tmp_path / "cases" / "case1" / "image.nii.gz"), prompt).mask > 0
            scores = {v: dice(mask, label == v) for v in (1, 2, 3)}
            others = max(s for v, s in scores.items() if v != value)
            assert scores[value] > 0.8 and others < 0.2, (prompt, scores)
