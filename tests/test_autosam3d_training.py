"""3D-SAutoMed training: slice samples, the chain step's gradients, the smoke recipe end to end."""

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sam3d.engine import EngineConfig, load_model
from sam3d.engine.auto import AutoEngine
from sam3d.models import AutoSam3D, build_network
from sam3d.models.lora import is_lora_parameter
from sam3d.training import load_recipe
from sam3d.training.auto_step import HALF, AutoSliceDataset, AutoStep, box_loss

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "tests" / "recipes" / "autosam3d_smoke.yaml"
CLASSES = ["liver", "spleen", "kidney_right"]
CT_VALUES = {"liver": 5, "spleen": 1, "kidney_right": 2}  # TotalSegmentator's `total` values


@pytest.fixture(scope="module")
def ct(shared_data):
    from sam3d.data.training import load_volume

    return load_volume(
        "totalseg_ct",
        str(shared_data / "totalseg_ct" / "image.nii.gz"),
        str(shared_data / "totalseg_ct" / "label.nii.gz"),
        (3.0, 3.0, 3.0),
    )


def test_samples_are_neighbouring_slices_with_class_indices(ct):
    names = {"totalseg_ct": {v: n for n, v in CT_VALUES.items()} | {52: "aorta"}}
    ds = AutoSliceDataset([ct], EngineConfig(spacing=(3.0,) * 3), CLASSES, names, size=32, seed=0)
    item = ds[5]
    assert item["image"].shape == item["label"].shape == (2 * HALF + 1, 32, 32)
    assert set(np.unique(item["label"].numpy())) <= {0, 1, 2, 3}  # aorta is not a class: background
    assert item["label"][HALF].max() > 0  # foreground_slices: slice t holds a class
    again = ds[5]
    assert torch.equal(again["image"], item["image"]) and torch.equal(again["label"], item["label"])
    t = int(item["target"].split()[1])
    liver = (ct.label[0, :, :, t] == 5).sum()
    assert (item["label"][HALF] == 1).any() == bool(liver > 0)


def test_box_loss_is_zero_for_the_right_boxes_and_skips_absent_classes():
    gt = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0]]])
    present = torch.tensor([[True, False]])
    assert float(box_loss(gt.clone(), gt, present)) == pytest.approx(0.0, abs=1e-4)  # GIoU has an eps
    off = gt.clone()
    off[0, 0, 0] += 0.1
    off[0, 1] = 0.9  # wrong, but the class is absent: not counted
    assert float(box_loss(off, gt, present)) > 0.5
    assert float(box_loss(off, gt, torch.zeros_like(present))) == 0.0


def test_chain_step_trains_lora_and_new_modules_not_the_frozen_encoder():
    torch.manual_seed(0)
    model = build_network("autosam3d_tiny")
    with torch.no_grad():  # LoRA B != 0, so that A gets gradients as well
        for name, p in model.encoder.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(std=0.1)
    step = AutoStep(model, {"auto": {"max_previous": 3, "teacher_boxes": 0.0}}, autocast=contextlib.nullcontext)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 2 * HALF + 1, 32, 32, generator=g)
    labels = torch.zeros(2, 2 * HALF + 1, 32, 32)
    labels[:, :, 8:20, 6:16] = 1
    labels[:, :, 22:28, 20:30] = 3
    loss, dice = step(images, labels, [11, 12])
    loss.backward()
    assert torch.isfinite(loss) and dice.shape == (2,)
    grads = {n: p.grad for n, p in model.named_parameters()}
    frozen = [n for n in grads if n.startswith("encoder.") and not is_lora_parameter(n)]
    assert frozen and all(grads[n] is None for n in frozen)  # the frozen base gets none
    lora = [n for n in grads if is_lora_parameter(n)]
    assert lora and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in lora)
    for module in (
        "local.",
        "box_generator.semantic",
        "box_generator.default_anchor",
        "decoder.history_init",
        "decoder.history_filter",
        "decoder.mask_tokens",
    ):
        assert any(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if n.startswith(module)), module


def test_smoke_recipe_trains_and_the_checkpoint_segments_the_ct(tmp_path, shared_data):
    from sam3d.training import train

    recipe = load_recipe(SMOKE, [f"output={tmp_path}", f"data.dir={shared_data}"])
    out = train(0, recipe, REPO)
    assert out["step"] == 3 and np.isfinite(out["loss"])
    header, *rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3
    side = yaml.safe_load((tmp_path / "model.yaml").read_text())
    assert side["preset"] == "autosam3d_tiny" and side["network"]["class_names"] == CLASSES
    loaded = load_model({"checkpoint": str(tmp_path / "model.safetensors")})
    assert isinstance(loaded.model, AutoSam3D) and loaded.model.class_names == CLASSES
    state = torch.load(tmp_path / "state.pt", weights_only=True)["model"]
    torch.manual_seed(recipe["seed"])
    init = AutoSam3D(loaded.model.config).state_dict()
    frozen, tuned = "encoder.blocks.0.attn.qkv.weight", "decoder.mask_tokens.weight"
    assert torch.equal(state[frozen], init[frozen]) and not torch.equal(state[tuned], init[tuned])
    res = AutoEngine(loaded, EngineConfig(spacing=(3.0, 3.0, 3.0), clip=(-200.0, 300.0), normalize="zscore")).segment(
        str(shared_data / "totalseg_ct" / "image.nii.gz")
    )
    assert res.mask.shape == (122, 101, 112) and res.info["label_names"] == {"liver": 1, "spleen": 2, "kidney_right": 3}


def test_gpu_recipe_builds_the_small_network_on_the_ct():
    from sam3d.models.autosam3d.network import ABDOMEN
    from sam3d.training.trainer import build_model

    recipe = load_recipe(REPO / "configs" / "train" / "autosam3d.yaml")
    model, sidecar, engine_cfg = build_model(recipe, REPO)
    assert isinstance(model, AutoSam3D) and sidecar["preset"] == "autosam3d_small"
    assert tuple(sidecar["network"]["class_names"]) == ABDOMEN and engine_cfg.spacing == (3.0, 3.0, 3.0)
    assert recipe["data"]["cases"] == ["totalseg_ct"] and recipe["auto"]["max_previous"] == 3


def test_cpu_recipe_trains_the_five_large_organs_on_the_served_grid():
    from sam3d.engine.model_config import load_model_config
    from sam3d.training.trainer import build_model

    recipe = load_recipe(REPO / "configs" / "train" / "autosam3d_cpu.yaml")
    model, sidecar, engine_cfg = build_model(recipe, REPO)
    served = load_model_config("autosam3d", REPO / "configs")
    assert sidecar["preset"] == "autosam3d_small" and engine_cfg.spacing == tuple(served["spacing"])
    assert model.class_names == ["spleen", "kidney_right", "kidney_left", "liver", "stomach"]


def test_meta_style_sam_checkpoint_loads_into_the_frozen_encoder(tmp_path):
    """A `.pth` with SAM's `image_encoder.*` keys (other parts too), for a larger image: loaded with
    weights_only, position tables resized, LoRA untouched."""
    from sam3d.models.autosam3d.slice_encoder import SliceEncoderViT

    cfg = build_network("autosam3d_tiny").config
    big = SliceEncoderViT(
        64,
        cfg.patch_size,
        3,
        cfg.encoder_embed_dim,
        cfg.encoder_depth,
        cfg.encoder_num_heads,
        cfg.mlp_ratio,
        cfg.embed_dim,
        cfg.window_size,
        cfg.encoder_global_attn_indexes,
    )
    torch.nn.init.normal_(big.blocks[0].attn.qkv.weight)
    sam = {f"image_encoder.{k}": v for k, v in big.state_dict().items()}
    sam["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    path = tmp_path / "sam_vit_tiny.pth"
    torch.save(sam, path)
    model = build_network("autosam3d_tiny")
    lora_before = model.encoder.blocks[0].attn.qkv.lora_a.detach().clone()
    AutoStep(model, {"auto": {"sam_checkpoint": str(path)}}, autocast=contextlib.nullcontext)
    assert torch.equal(model.encoder.blocks[0].attn.qkv.weight, big.blocks[0].attn.qkv.weight)
    assert model.encoder.pos_embed.shape[1] == cfg.img_size // cfg.patch_size
    assert torch.equal(model.encoder.blocks[0].attn.qkv.lora_a, lora_before)
    with pytest.raises(ValueError, match="freeze_encoder"):
        AutoStep(
            build_network("autosam3d_tiny", freeze_encoder=False),
            {"auto": {"sam_checkpoint": str(path)}},
            autocast=contextlib.nullcontext,
        )


def test_in_plane_augmentation_moves_image_and_label_together():
    from sam3d.data.training import Volume

    lab = torch.zeros(1, 40, 30, 12, dtype=torch.int32)
    lab[0, 5:20, 4:14] = 1
    lab[0, 22:36, 16:28] = 2
    vol = Volume("synthetic", (lab.float() * 10.0), lab)
    names = {"synthetic": {1: "liver", 2: "spleen"}}
    cfg = EngineConfig(spacing=(3.0,) * 3, normalize="none")
    plain = AutoSliceDataset([vol], cfg, CLASSES, names, size=32, seed=0, augment=0.0)
    moved = AutoSliceDataset([vol], cfg, CLASSES, names, size=32, seed=0, augment=1.0)
    for i in range(3):
        a, b = plain[i], moved[i]
        assert b["image"].shape == a["image"].shape and not torch.equal(b["label"], a["label"])
        assert set(np.unique(b["label"].numpy())) <= {0, 1, 2}  # labels stay labels
        for c in (1, 2):  # each class still sits on its own intensity (x 0.9-1.1, +-0.1: the intensity change)
            inside = b["image"][b["label"] == c]
            assert abs(float(inside.median()) - 10.0 * c) < 1.2 + 0.1 * c * 10


def _organs_volume(image: bool):
    """A 40 x 30 x 12 scan: liver (1) and spleen (2) boxes in a body of 30 HU, air outside; or its label map alone."""
    from sam3d.data.training import Volume

    lab = torch.zeros(1, 40, 30, 12, dtype=torch.int32)
    lab[0, 8:20, 6:14, 2:10] = 1
    lab[0, 22:34, 16:26, 3:9] = 2
    hu = torch.full(lab.shape, -1000.0)
    hu[0, 4:38, 3:28] = 30.0
    hu[lab > 0] = 60.0 + 20.0 * lab[lab > 0].float()
    return Volume("organs", hu if image else None, lab)


def test_a_label_map_alone_trains_on_synthesised_images_whose_body_is_not_its_air():
    vol = _organs_volume(image=False)
    cfg = EngineConfig(spacing=(3.0,) * 3, ct_clip=(-200.0, 300.0), normalize="zscore_foreground")
    ds = AutoSliceDataset([vol], cfg, CLASSES, {"organs": {1: "liver", 2: "spleen"}}, size=32, seed=0)
    item = ds[0]
    assert item["synthetic"] and item["image"].shape == (2 * HALF + 1, 32, 32) and torch.isfinite(item["image"]).all()
    from sam3d.data.synthesis import SOFT_TISSUE, body_tissue_labels

    tissues = body_tissue_labels(vol.label[0].numpy(), None, (3.0, 3.0, 3.0), body_margin_mm=9.0)
    # the body: within 9 mm (3 voxels) of an organ on its slice, and only where an organ is
    assert tissues[5, 10, 5] == SOFT_TISSUE and tissues[0, 0, 5] == 0 and (tissues[..., 0] == 0).all()
    assert (tissues[vol.label[0].numpy() > 0] == vol.label[0].numpy()[vol.label[0].numpy() > 0]).all()


def test_a_cts_unlabelled_body_splits_into_fat_and_soft_tissue_by_hu():
    from sam3d.data.synthesis import FAT, SOFT_TISSUE, body_tissue_labels

    label = np.zeros((4, 1, 1), dtype=np.int32)
    label[3] = 7
    image = np.array([-1000.0, -100.0, 40.0, 50.0]).reshape(4, 1, 1)
    assert body_tissue_labels(label, image, (1.0, 1.0, 1.0)).ravel().tolist() == [0, FAT, SOFT_TISSUE, 7]


def test_partial_scans_repeat_their_edge_slices_and_reversed_scans_mirror_the_chain():
    from sam3d.training.auto_step import SliceSampling

    vol = _organs_volume(image=True)
    names = {"organs": {1: "liver", 2: "spleen"}}
    cfg = EngineConfig(spacing=(3.0,) * 3, normalize="none")
    cut = AutoSliceDataset([vol], cfg, CLASSES, names, size=32, sampling=SliceSampling(partial_prob=1.0))
    thin = 0
    for i in range(20):
        item = cut[i]
        same = [torch.equal(item["image"][k], item["image"][k + 1]) for k in range(2 * HALF)]
        thin += sum(same) > 0
        assert item["label"].shape == (2 * HALF + 1, 32, 32)
    assert thin >= 5  # scans of a few slices: the slices beyond them are the edge slice again
    flipped = AutoSliceDataset([vol], cfg, CLASSES, names, size=32, sampling=SliceSampling(flip_slices_prob=1.0))
    plain = AutoSliceDataset([vol], cfg, CLASSES, names, size=32)
    a, b = plain[3], flipped[3]
    assert a["target"] == b["target"] and torch.equal(a["label"].flip(0), b["label"])


def test_synthesis_recipe_reads_the_label_maps_names_beside_them(shared_data):
    from sam3d.training.names import case_names

    recipe = load_recipe(REPO / "configs" / "train" / "autosam3d_synth.yaml")
    names = case_names(recipe, REPO)
    assert names["amos_label"][6] == "liver" and names["totalseg_ct"][5] == "liver"
    assert "synthseg_training_seg_01" not in names  # heads: no abdominal names, every slice background
    served = load_recipe(REPO / "configs" / "train" / "autosam3d_cpu.yaml")["model"]["network"]["class_names"]
    assert recipe["model"]["network"]["class_names"] == served and recipe["auto"]["synth_prob"] > 0


def test_a_compact_resume_state_is_a_third_of_the_size_and_the_next_leg_resumes_from_it(tmp_path, shared_data):
    from sam3d.cli.export_weights import main as export
    from sam3d.training import train

    first = tmp_path / "leg1"
    train(0, load_recipe(SMOKE, [f"output={first}", f"data.dir={shared_data}"]), REPO)
    committed = tmp_path / "committed.state.pt"
    assert export([str(first / "state.pt"), str(committed), "--state"]) == 0
    full, small = torch.load(first / "state.pt", weights_only=True), torch.load(committed, weights_only=True)
    assert committed.stat().st_size < 0.45 * (first / "state.pt").stat().st_size
    assert small["step"] == full["step"] == 3 and small["scheduler"] == full["scheduler"]
    key = "decoder.mask_tokens.weight"
    torch.testing.assert_close(small["model"][key].float(), full["model"][key], rtol=1e-3, atol=1e-3)
    moments = next(iter(small["optimizer"]["state"].values()))
    assert "exp_avg" not in moments and moments["exp_avg_sq"].dtype == torch.bfloat16
    second = tmp_path / "leg2"
    overrides = [f"output={second}", f"data.dir={shared_data}", f"resume_from={committed}", "train.steps=5"]
    out = train(0, load_recipe(SMOKE, overrides), REPO)
    assert out["step"] == 5 and np.isfinite(out["loss"])
    resumed = torch.load(second / "state.pt", weights_only=True)
    assert all("exp_avg" in s for s in resumed["optimizer"]["state"].values())
