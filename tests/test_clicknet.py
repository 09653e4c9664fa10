"""The early-fusion click model (sam3d.models.clicknet): its prompt channels, its interface, its checkpoint, its
training data (label maps without images, generated shapes) and a resumable training run."""

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import ndimage

from sam3d.data.prior_masks import perturbed_mask
from sam3d.data.shapes import blob, shape_label_map, sheet, shell
from sam3d.data.training import SamplingConfig, WindowDataset, list_sources, load_volumes
from sam3d.engine import EngineConfig, load_model
from sam3d.engine.checkpoint import save_checkpoint
from sam3d.engine.interactive import InteractiveEngine
from sam3d.models import ClickNetConfig, build_network
from sam3d.training import InteractiveConfig, PointStep, build_loss, load_recipe

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "tests" / "recipes" / "clicknet_smoke.yaml"


def _tiny(**kw):
    torch.manual_seed(0)
    return build_network("clicknet_small", img_size=16, filters=8, blocks_down=[1, 1, 1], **kw).eval()


def test_prompt_maps_put_each_prompt_where_it_was_given():
    net = _tiny()
    coords = torch.tensor([[[3.0, 4.0, 5.0], [12.0, 12.0, 12.0], [15.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, 0, -1]])  # positive, negative, padding
    prev = torch.full((1, 1, 16, 16, 16), -20.0)
    prev[..., 8:10, 8:10, 8:10] = 3.0
    box = torch.tensor([[[2.0, 2.0, 2.0], [5.0, 6.0, 7.0]]])
    maps = net.prompt_maps(1, (coords, labels), box, prev)[0]
    assert maps[0].sum() == 8 and maps[0, 8, 8, 8] == 1  # previous mask: logits > 0
    assert maps[1, 3, 4, 5] == 1 and maps[1, 12, 12, 12] < 1e-6  # the positive ball, not the negative
    assert maps[2, 12, 12, 12] == 1 and maps[2, 3, 4, 5] < 1e-6
    assert maps[1, 15, 0, 0] < 1e-6 and maps[2, 15, 0, 0] < 1e-6  # padding draws nothing
    assert maps[3].sum() == 4 * 5 * 6 and maps[3, 2, 2, 2] == 1 and maps[3, 5, 6, 7] == 1 and maps[3, 6, 6, 7] == 0
    empty = net.prompt_maps(1, None, None, torch.zeros(1, 1, 16, 16, 16))[0]  # a first click: no previous mask
    assert empty.abs().sum() == 0


def test_decode_answers_the_window_with_a_confidence():
    net = _tiny()
    image = torch.randn(2, 1, 16, 16, 16)
    emb = net.encode_image(image)
    assert emb is image  # early fusion: nothing to cache but the window
    points = (torch.tensor([[[8.0, 8.0, 8.0]]] * 2), torch.tensor([[1], [1]]))
    logits, score = net.decode(emb, points=points, mask_input=torch.zeros(2, 1, 16, 16, 16))
    assert logits.shape == (2, 1, 16, 16, 16) and score.shape == (2, 1)
    assert ((score >= 0) & (score <= 1)).all()
    assert net.low_res_size == net.img_size == 16 and net.supports_boxes


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model settings"):
        build_network("clicknet_small", width=3)
    with pytest.raises(ValueError, match="divisible"):
        ClickNetConfig(img_size=20)
    with pytest.raises(ValueError, match="unknown backbone"):
        ClickNetConfig(backbone="vnet")


@pytest.mark.parametrize("preset", ["clicknet_small", "clicknet_dynunet"])
def test_checkpoint_round_trip_in_half_precision(tmp_path, preset):
    torch.manual_seed(0)
    net = build_network(preset, img_size=16, filters=8, blocks_down=[1, 1, 1]).eval()  # DynUNet shares tensors
    save_checkpoint(net, tmp_path / "c.safetensors", {"preset": preset, "network": net.config.to_dict()}, half=True)
    loaded = load_model({"checkpoint": str(tmp_path / "c.safetensors")}).model
    assert loaded.config == net.config
    x = torch.randn(1, 1, 16, 16, 16)
    pts = (torch.tensor([[[8.0, 8.0, 8.0]]]), torch.tensor([[1]]))
    with torch.no_grad():
        a, b = net.decode(x, points=pts)[0], loaded.decode(x, points=pts)[0]
    torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)  # float16 weights


def test_engine_serves_the_family_on_a_real_volume(shared_data, tmp_path):
    net = _tiny()
    save_checkpoint(net, tmp_path / "c.safetensors", {"preset": "clicknet_small", "network": net.config.to_dict()})
    engine = InteractiveEngine(
        load_model({"checkpoint": str(tmp_path / "c.safetensors")}),
        EngineConfig(spacing=(3.0, 3.0, 3.0), max_windows=2),
    )
    image = shared_data / "totalseg_ct" / "image.nii.gz"
    shape = nib.load(str(image)).shape
    first = engine.segment(str(image), foreground=[[60, 50, 56]], label="liver")
    assert first.mask.shape == shape and first.mask.dtype == np.uint8
    second = engine.segment(str(image), foreground=[[60, 50, 56]], background=[[20, 20, 20]], label="liver")
    assert second.info["embedding_cached"]  # the window is kept between clicks


def test_shapes_are_seeded_and_have_their_kind():
    a = shape_label_map(32, np.random.default_rng(3))
    b = shape_label_map(32, np.random.default_rng(3))
    assert np.array_equal(a, b) and a.dtype == np.int32
    assert (a == 1).any() and a.max() >= 2  # a body and objects in it
    rng = np.random.default_rng(0)
    thin = sheet(40, rng)
    assert thin.sum() > 50 and not ndimage.binary_erosion(thin, iterations=2).any()  # 1-3 voxels thick
    wall = shell(48, np.random.default_rng(1))
    filled = ndimage.binary_fill_holes(wall)
    assert wall.sum() > 50 and filled.sum() > 1.5 * wall.sum()  # hollow
    assert blob(32, rng, center=(16, 16, 16), radius=(5, 5))[16, 16, 16]


def test_label_maps_without_images_are_always_synthesised(tmp_path):
    lab = shape_label_map(40, np.random.default_rng(0))
    nib.save(nib.Nifti1Image(lab.astype(np.int16), np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "seg_a.nii.gz"))
    data = {"label_maps": {"maps": str(tmp_path / "seg_*.nii.gz")}, "shapes": {"count": 1, "size": 32}}
    assert list_sources(data) == [("maps_seg_a", None, str(tmp_path / "seg_a.nii.gz"))]
    volumes = load_volumes(data, (2.0, 2.0, 2.0))
    assert [v.name for v in volumes] == ["maps_seg_a", "shapes_0"] and all(v.image is None for v in volumes)
    cfg = SamplingConfig(size=16, min_voxels=8, synth_prob=0.0, case_weights={"shapes_*": 0.0})
    ds = WindowDataset(volumes, EngineConfig(spacing=(2.0, 2.0, 2.0)), cfg, seed=0)
    items = [ds[i] for i in range(4)]
    assert all(i["case"] == "maps_seg_a" and i["synthetic"] for i in items)  # weight 0: never the shapes
    assert not torch.equal(items[0]["image"], items[1]["image"]) and items[0]["label"].sum() >= 8
    with pytest.raises(FileNotFoundError, match="no file matches"):
        list_sources({"label_maps": {"x": str(tmp_path / "none_*.nii.gz")}})


def test_last_round_training_step_backpropagates_through_the_last_round_only():
    net = _tiny().train()
    cfg = InteractiveConfig(
        rounds=3, grad_rounds="last", loss_resolution="low", iou_loss_weight=0.0, box_prob=0.0, spacing_mm=2.0
    )
    step = PointStep(net, cfg, build_loss("dice_ce", balanced=True))
    labels = torch.zeros(2, 1, 16, 16, 16)
    labels[:, :, 4:10, 5:11, 6:12] = 1
    loss, dice = step(torch.randn(2, 1, 16, 16, 16), labels, [5, 6])
    loss.backward()
    assert torch.isfinite(loss) and dice.shape == (3,)
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="grad_rounds"):
        InteractiveConfig.from_dict({"grad_rounds": "some"})
    with pytest.raises(ValueError, match="prior_mask_prob needs grad_rounds: last"):
        InteractiveConfig.from_dict({"prior_mask_prob": 0.3})
    # a sample that gives its first click (on air: an empty target) trains beside one the simulator clicks
    labels[0] = 0
    loss, dice = step(torch.randn(2, 1, 16, 16, 16), labels, [5, 6], torch.tensor([[2, 2, 2], [-1, -1, -1]]))
    loss.backward()
    assert torch.isfinite(loss) and dice.shape == (3,)


def test_last_round_probs_choose_the_round_with_gradients():
    """`last_round_probs` [1, 0, 0]: every batch stops after its first click (the rounds after repeat its Dice);
    a weight per round, under grad_rounds: last, or the recipe is refused."""
    net, calls = _tiny().train(), []
    decode = net.decode

    def count(*args, **kwargs):
        calls.append(1)
        return decode(*args, **kwargs)

    net.decode = count
    cfg = InteractiveConfig.from_dict(
        {
            "rounds": 3,
            "grad_rounds": "last",
            "loss_resolution": "low",
            "iou_loss_weight": 0.0,
            "box_prob": 0.0,
            "spacing_mm": 2.0,
            "last_round_probs": [1, 0, 0],
        }
    )
    labels = torch.zeros(2, 1, 16, 16, 16)
    labels[:, :, 4:10, 5:11, 6:12] = 1
    for seeds in ([5, 6], [7, 8], [9, 10]):
        _, dice = PointStep(net, cfg, build_loss("dice_ce"))(torch.randn(2, 1, 16, 16, 16), labels, seeds)
        assert dice[0] == dice[1] == dice[2]
    assert len(calls) == 3
    with pytest.raises(ValueError, match="last_round_probs"):
        InteractiveConfig.from_dict({"grad_rounds": "last", "rounds": 3, "last_round_probs": [1, 1]})
    with pytest.raises(ValueError, match="last_round_probs"):
        InteractiveConfig.from_dict({"rounds": 2, "last_round_probs": [1, 1]})


def test_prior_mask_samples_start_from_a_near_correct_mask():
    """With `prior_mask_prob` 1 every sample's first decode sees a mask near the reference, not an empty one."""
    gt = np.zeros((32, 32, 32), bool)
    gt[8:24, 10:22, 6:26] = True
    rng = np.random.default_rng(0)
    dices = [float(2 * (m & gt).sum() / (m.sum() + gt.sum())) for m in (perturbed_mask(gt, rng) for _ in range(40))]
    assert min(dices) > 0.3 and 1.0 in dices and np.mean(dices) < 0.95
    assert not perturbed_mask(np.zeros((8, 8, 8), bool), rng).any()

    net, seen = _tiny().train(), []
    decode = net.decode

    def spy(*args, mask_input=None, **kwargs):
        seen.append(mask_input.clone())
        return decode(*args, mask_input=mask_input, **kwargs)

    net.decode = spy
    cfg = InteractiveConfig(
        rounds=1, grad_rounds="last", loss_resolution="low", iou_loss_weight=0.0, box_prob=0.0, prior_mask_prob=1.0
    )
    labels = torch.zeros(2, 1, 16, 16, 16)
    labels[:, :, 4:12, 5:11, 3:13] = 1
    loss, _ = PointStep(net, cfg, build_loss("dice_ce"))(torch.randn(2, 1, 16, 16, 16), labels, [5, 6])
    loss.backward()
    prior = seen[0] > 0
    assert prior.shape == labels.shape
    for b in range(2):
        overlap = (prior[b] & (labels[b] > 0)).sum() / (labels[b] > 0).sum()
        assert overlap > 0.3, "a prior sample's previous mask is the reference, perturbed"


def test_smoke_run_is_killed_and_resumes_to_the_same_weights(tmp_path):
    """The recipe's shape data alone; killed after step 3 (checkpoints every 2), the next leg (a new folder, from the
    saved resume state) goes on from step 2 and ends with the weights of a run that was never interrupted."""
    from sam3d.training import train

    steps = ["train.steps=4", "validation.every=0"]
    full = tmp_path / "full"
    train(0, load_recipe(SMOKE, [f"output={full}", *steps]), REPO)
    crashed = tmp_path / "crashed"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        "--config",
        str(SMOKE),
        f"output={crashed}",
        *steps,
        "debug.exit_at_step=3",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert torch.load(crashed / "state.pt", weights_only=True)["step"] == 2
    # the next leg on a clean checkout: a new output folder, started from the committed resume state
    leg = tmp_path / "next_leg"
    out = train(0, load_recipe(SMOKE, [f"output={leg}", f"resume_from={crashed / 'state.pt'}", *steps]), REPO)
    assert out["step"] == 4
    a, b = load_file(str(full / "model.safetensors")), load_file(str(leg / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
