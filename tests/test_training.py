"""Training pipeline: recipes, data (deformation, label-map synthesis, deterministic windows), the smoke recipe,
crash-and-resume, and 2 gloo processes against 1 with the same global batch."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from sam3d.data.synthesis import RandWindowDeformd, SynthesizeFromLabelsd
from sam3d.data.training import SamplingConfig, WindowDataset, list_sources, load_volume
from sam3d.engine import EngineConfig, load_model
from sam3d.engine.interactive import normalize_window
from sam3d.training import load_recipe, lr_factor

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "train" / "smoke.yaml"


@pytest.fixture(scope="module")
def tiny_cases(tmp_path_factory) -> Path:
    """Two cases of ellipsoids in a noisy background (2 mm voxels), written as the shared data layout."""
    root = tmp_path_factory.mktemp("cases")
    rng = np.random.default_rng(0)
    for n, shape in enumerate([(28, 26, 24), (24, 28, 26)]):
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
        label = np.zeros(shape, np.int16)
        blobs = [((8, 9, 10), (5, 4, 6)), ((18, 16, 12), (4, 6, 5)), ((12, 18, 16), (3, 3, 3))]  # (centre, radii)
        for value, (c, r) in enumerate(blobs, 1):
            inside = (((grid - np.add(c, n)) / r) ** 2).sum(-1) <= 1
            label[inside] = value
        image = 100 + 200 * label + rng.normal(0, 10, shape)
        folder = root / f"case{n}"
        folder.mkdir()
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(folder / "image.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(folder / "label.nii.gz"))
    return root


def _smoke(tmp_path, data_dir, *more) -> dict:
    return load_recipe(SMOKE, [f"output={tmp_path}", f"data.dir={data_dir}", "data.cases=null", *more])


def _train(recipe: dict) -> dict:
    from sam3d.training import train

    return train(0, recipe, REPO)


def test_recipe_base_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 1\ntrain: {steps: 10, batch_size: 2}\noptim: {lr: 0.1}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {steps: 20}\n")
    r = load_recipe(tmp_path / "child.yaml", ["optim.lr=0.5", "data.cases=[a, b]"])
    assert r["train"] == {"steps": 20, "batch_size": 2}
    assert r["optim"]["lr"] == 0.5 and r["data"]["cases"] == ["a", "b"] and r["seed"] == 1 and r["name"] == "child"
    for name in ("sam3d_default", "sam3d_default_cpu", "sam_med3d_finetune", "smoke"):
        assert load_recipe(REPO / "configs" / "train" / f"{name}.yaml")["train"]["steps"] > 0


@pytest.mark.parametrize(
    "recipe",
    sorted((REPO / "configs" / "train").glob("*.yaml")) + sorted((REPO / "tests" / "recipes").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_every_shipped_recipe_uses_only_known_keys(recipe):
    assert load_recipe(recipe)["name"] == recipe.stem


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stpes=3", "unknown recipe key train.'stpes'; did you mean 'steps'?"),
        ("sampling.min_voxel=3", "sampling.'min_voxel'; did you mean 'min_voxels'?"),
        ("optimm.lr=1", "unknown recipe key 'optimm'; did you mean 'optim'?"),
        ("validation.data.dirr=x", "validation.data.'dirr'"),
        ("train=3", "section 'train' must be a mapping"),
    ],
)
def test_a_misspelt_recipe_key_is_an_error_that_names_it(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_recipe(SMOKE, [override])


def test_a_section_for_another_kind_of_model_is_refused(tmp_path, tiny_cases):
    from sam3d.training import train

    recipe = load_recipe(SMOKE, [f"output={tmp_path}", f"data.dir={tiny_cases}", "text.refine_rounds=1"])
    with pytest.raises(ValueError, match="`text` section trains a text model"):
        train(0, recipe, REPO)


def test_lr_schedule():
    f = [lr_factor(s, 10, 100, 0.05) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(0.05, abs=1e-3)


def test_deform_and_synthesis_are_seeded():
    vol = torch.arange(40 * 40 * 40, dtype=torch.float32).reshape(1, 40, 40, 40) / 1000 - 5
    lab = torch.zeros(1, 40, 40, 40, dtype=torch.int32)
    lab[0, 10:30, 12:28, 8:20] = 3
    lab[0, 22:30, 12:20, 20:30] = 7
    d = {"image": vol, "label": lab, "start": (-4, 4, 4)}
    plain = RandWindowDeformd(size=32, prob=0.0)
    plain.set_random_state(0)
    out = plain(d)
    assert out["image"].shape == (1, 32, 32, 32) and out["label"].dtype == torch.int32
    assert torch.allclose(out["image"][0, 4:, :, :], vol[0, :28, 4:36, 4:36], atol=1e-4)  # a plain crop...
    # ...padded with the minimum, as the engine pads
    assert torch.allclose(out["image"][0, :4], vol.min().expand(4, 32, 32), atol=1e-4)
    assert torch.equal(out["label"][0, 4:], lab[0, :28, 4:36, 4:36])
    warp = RandWindowDeformd(size=32, prob=1.0)
    a, b = warp.set_random_state(5)(d), warp.set_random_state(5)(d)
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], out["image"])
    assert set(np.unique(a["label"].numpy())) <= {0, 3, 7}
    synth = SynthesizeFromLabelsd(prob=1.0, background_zero_prob=1.0)
    s1, s2 = synth.set_random_state(1)(out), synth.set_random_state(1)(out)
    assert s1["synthetic"] and torch.equal(s1["image"], s2["image"])
    img, lab32 = s1["image"][0], out["label"][0]
    assert torch.all(img[lab32 == 0] == 0) and torch.all(img[lab32 != 0] > 0)  # skull-stripped-like background
    assert img[lab32 == 3].mean() != pytest.approx(float(img[lab32 == 7].mean()), abs=1e-3)


def test_window_dataset(tiny_cases):
    vols = [load_volume(*s, (1.5, 1.5, 1.5)) for s in list_sources({"dir": str(tiny_cases)})]
    assert [v.name for v in vols] == ["case0", "case1"] and vols[0].image.shape == vols[0].label.shape
    cfg = EngineConfig()
    ds = WindowDataset(vols, cfg, SamplingConfig(size=32, min_voxels=8), seed=3)
    a, b, c = ds[11], ds[11], ds[12]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"]) and a["seed"] == b["seed"]
    assert a["seed"] != c["seed"] and a["image"].shape == (1, 32, 32, 32) and type(a["image"]) is torch.Tensor
    assert a["label"].sum() >= 8 and set(np.unique(a["label"].numpy())) <= {0.0, 1.0}
    plain = WindowDataset(vols, cfg, SamplingConfig(size=32, min_voxels=8), seed=3, augment=False)[0]
    assert not plain["synthetic"]
    # without augmentation the window is normalised exactly as the engine normalises a window
    from sam3d.engine.windows import crop

    vol = next(v for v in vols if v.name == plain["case"])
    raw = crop(vol.image[0], plain["start"], 32, float(vol.image.min()))
    assert torch.allclose(plain["image"][0], normalize_window(raw, cfg), atol=1e-4)


def _ct_case(root: Path, tiny_cases: Path) -> Path:
    """case0's label map as a CT: organs at 40 HU, label 3 as bone (440 HU), air (-1000 HU) around them."""
    case = root / "ct"
    case.mkdir()
    image = nib.load(str(tiny_cases / "case0" / "image.nii.gz"))
    label = np.asarray(nib.load(str(tiny_cases / "case0" / "label.nii.gz")).dataobj)
    hu = np.where(label > 0, 40.0 + 400 * (label == 3), -1000.0).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, image.affine), str(case / "image.nii.gz"))
    shutil.copy(tiny_cases / "case0" / "label.nii.gz", case / "label.nii.gz")
    return case


def test_a_real_ct_trains_through_the_ct_window_as_it_is_served(tmp_path, tiny_cases):
    """Unsynthesised windows of a CT (air below -500 HU) are clipped to `ct_clip`, as the engine clips a CT."""
    _ct_case(tmp_path, tiny_cases)
    vols = [load_volume(*s, (2.0, 2.0, 2.0)) for s in list_sources({"dir": str(tmp_path)})]
    mr = [load_volume(*s, (2.0, 2.0, 2.0)) for s in list_sources({"dir": str(tiny_cases)})]
    assert [v.hounsfield for v in vols] == [True] and not any(v.hounsfield for v in mr)
    cfg = EngineConfig(ct_clip=(-200.0, 300.0), normalize="none")
    window = WindowDataset(vols, cfg, SamplingConfig(size=32, min_voxels=8), seed=3, augment=False)[0]["image"]
    assert float(window.min()) == -200.0 and float(window.max()) == 300.0


def test_background_samples_click_on_air_and_expect_an_empty_mask(tmp_path, tiny_cases):
    """A CT's air is found by HU; a volume that `background_cases` does not name (an MR whose label 0 is tissue)
    never gives such a sample."""
    _ct_case(tmp_path, tiny_cases)
    ct = [load_volume(*s, (2.0, 2.0, 2.0)) for s in list_sources({"dir": str(tmp_path)})]
    mr = [load_volume(*s, (2.0, 2.0, 2.0)) for s in list_sources({"dir": str(tiny_cases)})]
    cfg = EngineConfig(ct_clip=(-200.0, 300.0), normalize="none")
    sampling = SamplingConfig(size=32, min_voxels=8, background_prob=1.0, intensity_aug_prob=0.0, deform_prob=0.0)
    raw = ct[0].image[0]
    for i in range(4):
        item = WindowDataset(ct, cfg, sampling, seed=1)[i]
        click = tuple(int(v) for v in item["click"])
        assert item["target"] == "air" and item["label"].sum() == 0 and not item["synthetic"]
        assert float(item["image"][(0, *click)]) == -200.0  # air, clipped as the engine clips it
        start = np.asarray(item["start"])
        inside = np.all((np.asarray(click) + start >= 0) & (np.asarray(click) + start < raw.shape))
        assert not inside or float(raw[tuple(np.asarray(click) + start)]) < -500
    for i in range(4):
        item = WindowDataset(mr, cfg, sampling, seed=1)[i]
        assert item["label"].sum() >= 8 and list(item["click"]) == [-1, -1, -1]


def test_a_click_on_air_is_followed_by_negative_clicks_on_what_the_network_drew():
    from sam3d.data.clicks import ClickSimulator
    from sam3d.training.interactive import _next_prompt

    sim, empty = ClickSimulator("center", seed=0), np.zeros((12, 12, 12), bool)
    assert _next_prompt(sim, empty, None, 1, (3, 4, 5)).points == [((3, 4, 5), True)]
    drawn = empty.copy()
    drawn[2:7, 2:7, 2:7] = True
    assert _next_prompt(sim, empty, drawn, 2, (3, 4, 5)).points == [((4, 4, 4), False)]
    assert _next_prompt(sim, empty, empty, 2, (3, 4, 5)).points == []


def test_sampling_targets_restrict_a_case_to_some_labels(tiny_cases):
    vols = [load_volume(*s, (1.5, 1.5, 1.5)) for s in list_sources({"dir": str(tiny_cases)})]
    ds = WindowDataset(vols, EngineConfig(), SamplingConfig(size=32, min_voxels=8, targets={"case0": [2]}), seed=1)
    by_case = {"case0": set(), "case1": set()}
    for i in range(40):
        item = ds[i]
        by_case[item["case"]].update(int(v) for v in item["target"].split("+"))
    assert by_case["case0"] == {2} and by_case["case1"] == {1, 2, 3}  # no merge with a label left out
    with pytest.raises(ValueError, match="no training volume 'nope'"):
        WindowDataset(vols, EngineConfig(), SamplingConfig(size=32, targets={"nope": [1]}))
    with pytest.raises(ValueError, match=r"values \[9\] are absent"):
        WindowDataset(vols, EngineConfig(), SamplingConfig(size=32, targets={"case1": [1, 9]}))


def test_size_power_makes_a_large_structure_a_frequent_target():
    from sam3d.data.training import Volume

    label = torch.zeros(1, 40, 40, 40, dtype=torch.int32)
    label[0, 2:38, 2:38, 2:20] = 1  # 23,328 voxels
    label[0, 30:35, 30:35, 30:35] = 2  # 125 voxels
    vol = Volume("two", None, label)

    def share_of_large(power):
        cfg = SamplingConfig(
            size=32, min_voxels=8, random_window_prob=0.0, deform_prob=0.0, merge_prob=0.0, size_power=power
        )
        ds = WindowDataset([vol], EngineConfig(), cfg, seed=0)
        return np.mean([ds[i]["target"] == "1" for i in range(40)])

    assert 0.3 < share_of_large(0.0) < 0.7  # every label alike
    assert share_of_large(1.0) > 0.9  # ~ voxels: the large one 187 times as often


def test_smoke_recipe_trains_and_serves(tmp_path, tiny_cases):
    out = _train(_smoke(tmp_path, tiny_cases))
    assert out["step"] == 4 and np.isfinite(out["loss"])
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 5
    assert "dice_1" in (tmp_path / "val.csv").read_text() and any((tmp_path / "tb").iterdir())
    side = yaml.safe_load((tmp_path / "model.yaml").read_text())
    assert side["preset"] == "sam3d_small" and side["network"]["img_size"] == 32 and side["step"] == 4
    assert side["network"]["swap_dense_pe_axes"] is False  # the whole config: later preset changes cannot alter it
    assert yaml.safe_load((tmp_path / "summary.json").read_text())["step"] == 4  # the run ended
    loaded = load_model({"checkpoint": str(tmp_path / "model.safetensors")})  # the engine reads the sidecar
    assert loaded.model.img_size == 32
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 4
    # a finished run re-run does nothing
    assert _train(_smoke(tmp_path, tiny_cases))["step"] == 4


def test_crash_then_resume_equals_uninterrupted(tmp_path, tiny_cases):
    """A process killed after step 3 (checkpoints every 2) leaves a whole checkpoint of step 2; re-running
    resumes there and ends with the weights of a run that was never interrupted."""
    steps = ["train.steps=6", "checkpoint.every=2", "validation.every=0", "log.tensorboard=false"]
    full = tmp_path / "full"
    _train(_smoke(full, tiny_cases, *steps))
    crashed = tmp_path / "crashed"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        "--config",
        str(SMOKE),
        f"output={crashed}",
        f"data.dir={tiny_cases}",
        "data.cases=null",
        *steps,
        "debug.exit_at_step=3",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert torch.load(crashed / "state.pt", weights_only=True)["step"] == 2
    assert yaml.safe_load((crashed / "model.yaml").read_text())["step"] == 2
    load_model({"checkpoint": str(crashed / "model.safetensors")})  # the served file is whole
    assert not list(crashed.glob(".*.tmp"))
    out = _train(_smoke(crashed, tiny_cases, *steps))
    assert out["step"] == 6
    a, b = load_file(str(full / "model.safetensors")), load_file(str(crashed / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps_logged = [int(r.split(",")[0]) for r in (crashed / "metrics.csv").read_text().splitlines()[1:]]
    assert steps_logged == [1, 2, 3, 4, 5, 6]  # step 3 ran twice: once before the crash, once after


def test_stop_at_step_ends_a_leg_there_and_the_next_leg_goes_on(tmp_path, tiny_cases):
    steps = ["train.steps=5", "checkpoint.every=10", "validation.every=0", "log.tensorboard=false"]
    assert _train(_smoke(tmp_path, tiny_cases, *steps, "train.stop_at_step=2"))["step"] == 2
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 2  # checkpointed where it stopped
    assert _train(_smoke(tmp_path, tiny_cases, *steps))["step"] == 5


def test_accumulation_matches_one_big_batch(tmp_path, tiny_cases):
    common = [
        "train.steps=2",
        "train.batch_size=2",
        "validation.every=0",
        "log.tensorboard=false",
        "checkpoint.every=2",
    ]
    _train(_smoke(tmp_path / "one", tiny_cases, *common, "train.accumulate=1"))
    _train(_smoke(tmp_path / "acc", tiny_cases, *common, "train.accumulate=2"))
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "acc" / "model.safetensors"))
    # Adam divides by sqrt(v): where a gradient is ~0, the rounding difference between one summed batch and two
    # accumulated halves moves a weight by a small fraction of lr (1e-3)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-5)


@pytest.mark.slow
def test_torchrun_two_gloo_processes_match_one(tmp_path, tiny_cases):
    """`torchrun --nproc-per-node 2` with global batch 4 ends with the weights of one process with batch 4."""
    common = ["train.steps=4", "train.batch_size=4", "validation.every=0", "log.tensorboard=false"]
    _train(_smoke(tmp_path / "one", tiny_cases, *common))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(port),
        str(REPO / "scripts" / "train.py"),
        "--config",
        str(SMOKE),
        f"output={tmp_path / 'two'}",
        f"data.dir={tiny_cases}",
        "data.cases=null",
        *common,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    # The same samples and clicks; only the order of float additions differs (each rank averages its half of
    # the batch, then gloo averages the two). Adam divides by sqrt(v): a parameter whose gradient is ~0 can move
    # by up to lr per step either way on a rounding difference, so the bound is a few lr (1e-3) per weight,
    # while the weights as a whole agree to far below that.
    worst, total, n = 0.0, 0.0, 0
    for k in a:
        d = (a[k].float() - b[k].float()).abs()
        worst, total, n = max(worst, float(d.max())), total + float(d.sum()), n + d.numel()
    assert worst < 4e-3 and total / n < 1e-4, (worst, total / n)
    one = (tmp_path / "one" / "metrics.csv").read_text().splitlines()
    two = (tmp_path / "two" / "metrics.csv").read_text().splitlines()
    for r1, r2 in zip(one[1:], two[1:]):
        assert float(r1.split(",")[1]) == pytest.approx(float(r2.split(",")[1]), rel=1e-3)


def test_balanced_dice_ce_pushes_a_missed_target_up():
    from sam3d.training.losses import build_loss

    target = torch.zeros(1, 1, 32, 32, 32)
    target[..., 4:8, 4:8, 4:8] = 1
    grads = {}
    for balanced in (False, True):
        logits = torch.full((1, 1, 32, 32, 32), -8.0, requires_grad=True)  # "nothing here", saturated
        build_loss("dice_ce", balanced=balanced)(logits, target).backward()
        grads[balanced] = float(-logits.grad[target > 0].mean())
    assert grads[True] > 100 * grads[False] > 0
    with pytest.raises(ValueError):
        build_loss("dice_focal", balanced=True)


def test_empty_target_penalty_shrinks_a_blob_on_an_empty_target():
    """A 512-voxel blob on an empty target (a click on air): Dice + CE barely push it down; the penalty does, and it
    leaves a sample with a target as it was."""
    from sam3d.training.losses import EmptyTargetPenalty, build_loss

    target = torch.zeros(2, 1, 32, 32, 32)
    target[1, :, 4:12, 4:12, 4:12] = 1  # sample 0: empty
    pushes = {}
    for voxels in (0.0, 1000.0):
        logits = torch.full((2, 1, 32, 32, 32), -8.0)
        logits[0, :, 10:18, 10:18, 10:18] = 2.0
        logits.requires_grad_(True)
        loss = build_loss("dice_ce", empty_target_voxels=voxels)
        assert isinstance(loss, EmptyTargetPenalty) == (voxels > 0)
        loss(logits, target).backward()
        pushes[voxels] = float(logits.grad[0, :, 10:18, 10:18, 10:18].mean())
    assert pushes[1000.0] > 3 * pushes[0.0] > 0
    plain, penalised = build_loss("dice_ce"), build_loss("dice_ce", empty_target_voxels=1000.0)
    full = target[1:].clone()
    assert float(penalised(full * 4 - 2, full)) == pytest.approx(float(plain(full * 4 - 2, full)))


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_whole_files_and_resumes(tmp_path, tiny_cases):
    """SIGKILL (no handler runs) while a run checkpoints every step, three times at different moments: each
    time the served checkpoint and the resume state are whole, and the re-run resumes from the state's step."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        "--config",
        str(SMOKE),
        f"output={out}",
        f"data.dir={tiny_cases}",
        "data.cases=null",
        "train.steps=60",
        "checkpoint.every=1",
        "validation.every=0",
        "log.tensorboard=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    last_step = 0
    for delay in (0.0, 0.13, 0.29):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.time() + 240
        # wait until this run has written a checkpoint past the last one, then kill it a little later
        while time.time() < deadline and proc.poll() is None:
            if (out / "state.pt").is_file():
                try:
                    if torch.load(out / "state.pt", weights_only=True)["step"] > last_step + 1:
                        break
                except Exception:  # only the rename makes a new state.pt: a failed read is a defect
                    proc.kill()
                    raise
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = torch.load(out / "state.pt", weights_only=True)
        assert state["step"] > last_step
        last_step = state["step"]
        loaded = load_model({"checkpoint": str(out / "model.safetensors")})
        assert loaded.model.img_size == 32
    out_final = _train(
        _smoke(out, tiny_cases, "train.steps=60", "checkpoint.every=1", "validation.every=0", "log.tensorboard=false")
    )
    assert out_final["step"] == 60
    assert not list(out.glob(".*.tmp"))  # what the kills left behind is cleaned up
    logged = [int(r.split(",")[0]) for r in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert logged[-1] == 60 and set(range(1, 61)) <= set(logged)


def test_zoom_shows_a_structure_larger_than_the_window_whole():
    from sam3d.data.training import Volume

    label = torch.zeros(1, 100, 100, 60, dtype=torch.int32)
    label[0, 5:95, 10:90, 5:55] = 1  # 90 voxels across: a 32-voxel window sees a part of it
    label[0, 40:46, 40:46, 2:4] = 2
    vol = Volume("large", None, label)

    def samples(zoom_prob):
        cfg = SamplingConfig(
            size=32,
            min_voxels=8,
            random_window_prob=0.0,
            deform_prob=0.0,
            merge_prob=0.0,
            zoom_prob=zoom_prob,
            zoom_max=4.0,
            zoom_fill=(0.6, 0.9),
            targets={"large": [1]},
        )
        ds = WindowDataset([vol], EngineConfig(), cfg, seed=0)
        return [ds[i] for i in range(6)]

    def touches_a_face(mask):
        return any(f.any() for f in (mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]))

    plain, zoomed = samples(0.0), samples(1.0)
    assert all(s["zoom"] == 1.0 and touches_a_face(s["label"][0].numpy()) for s in plain)  # a part of the organ
    for s in zoomed:
        assert 90 / (0.9 * 32) - 1e-6 <= s["zoom"] <= 90 / (0.6 * 32) + 1e-6
        mask = s["label"][0].numpy()
        assert 0.1 < mask.mean() < 0.8 and not touches_a_face(mask)  # the whole organ, inside the window
    # the validation windows (no augmentation) never zoom
    cfg = SamplingConfig(size=32, min_voxels=8, zoom_prob=1.0)
    assert all(WindowDataset([vol], EngineConfig(), cfg, seed=0, augment=False)[i]["zoom"] == 1.0 for i in range(4))


def test_zoom_choices_show_each_structure_on_a_grid_drawn_from_them():
    from sam3d.data.training import Volume

    label = torch.zeros(1, 100, 100, 60, dtype=torch.int32)
    label[0, 5:95, 10:90, 5:55] = 1  # larger than a 32-voxel window at 1x
    vol = Volume("large", None, label)
    cfg = SamplingConfig(
        size=32, min_voxels=8, random_window_prob=0.0, deform_prob=0.0, jitter=0.0, zoom_choices=(0.5, 2.0)
    )
    windows, seen = WindowDataset([vol], EngineConfig(), cfg, seed=0), {0.5: [], 2.0: []}
    for i in range(16):
        s = windows[i]
        seen[s["zoom"]].append(float(s["label"].sum()) * s["zoom"] ** 3)  # model-grid voxels of organ in view
    assert all(seen.values())
    # a window on the finer grid sees a 16-voxel cube of the organ at most, on the coarser one up to a 64-voxel cube
    assert max(seen[0.5]) <= 16**3 + 1e-6 and min(seen[2.0]) > 16**3
    # validation windows (no augmentation) stay on the model's grid
    plain = WindowDataset([vol], EngineConfig(), cfg, seed=0, augment=False)
    assert all(plain[i]["zoom"] == 1.0 for i in range(4))
