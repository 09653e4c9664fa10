"""The engine end to end on real volumes, with models whose output is known."""

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from sam3d.engine import EngineConfig, InteractiveEngine, LoadedModel, Sam3DInputError
from sam3d.engine.cache import ByteLRU


class BallModel(nn.Module):
    """Logits = radius - distance to the first positive click, plus the previous mask when `accumulate` (then the
    last positive click, and each negative click carves a ball of `radius` out)."""

    img_size = 128
    low_res_size = 128  # no upsampling in the engine: the ball lands exactly where the model puts it
    supports_boxes = False

    def __init__(self, radius: float = 4.0, accumulate: bool = False) -> None:
        super().__init__()
        self.radius, self.accumulate = radius, accumulate
        self.encoded, self.mask_inputs = 0, []
        grid = torch.meshgrid(*[torch.arange(128.0)] * 3, indexing="ij")
        self.register_buffer("grid", torch.stack(grid, -1), persistent=False)

    def encode_image(self, x):
        self.encoded += 1
        return x.mean().reshape(1)

    def decode(self, emb, points=None, boxes=None, mask_input=None, multimask_output=False):
        coords, labels = points
        self.mask_inputs.append(mask_input)
        positive, negative = coords[0][labels[0] == 1], coords[0][labels[0] == 0]
        ball = torch.full(self.grid.shape[:3], -10.0)
        if len(positive):
            ball = self.radius - ((self.grid - positive[-1 if self.accumulate else 0]) ** 2).sum(-1).sqrt()
        if self.accumulate and mask_input is not None:
            ball = torch.maximum(ball, mask_input[0, 0])
            for click in negative:
                ball = torch.minimum(ball, ((self.grid - click) ** 2).sum(-1).sqrt() - self.radius)
        return ball[None, None], torch.ones(1, 1)


def engine_for(model, **cfg) -> InteractiveEngine:
    return InteractiveEngine(LoadedModel(model, None, None), EngineConfig(**cfg))


@pytest.fixture(scope="module")
def ct(shared_data):
    return str(shared_data / "totalseg_ct" / "image.nii.gz")


@pytest.fixture(scope="module")
def mr(shared_data):
    return str(shared_data / "totalseg_mr" / "image.nii.gz")


@pytest.mark.parametrize("name, click", [("ct", [60, 50, 56]), ("mr", [40, 30, 10]), ("mr", [116, 0, 19])])
def test_click_maps_to_model_grid_and_back(request, name, click):
    """A ball the model draws around the click comes back centred on the clicked voxel, on the image's grid."""
    path = request.getfixturevalue(name)
    ref = nib.load(path)
    res = engine_for(BallModel(radius=6.0)).segment(path, [click], [], label="x")
    assert res.mask.shape == ref.shape and res.mask.dtype == np.uint8
    np.testing.assert_allclose(res.affine, ref.affine, atol=1e-4)
    assert res.mask[tuple(click)] == 1
    vox = np.argwhere(res.mask)
    zooms = np.asarray(ref.header.get_zooms())
    dist_mm = np.linalg.norm((vox - click) * zooms, axis=1)
    assert dist_mm.max() <= 6.0 * 1.5 + zooms.max()  # nothing far from the click
    if not np.any(np.asarray(click) == 0) and not np.any(np.asarray(click) == np.asarray(ref.shape) - 1):
        np.testing.assert_allclose(vox.mean(0), click, atol=0.25)  # symmetric around it


def test_mr_is_not_ras_and_stays_on_its_own_grid(mr):
    """The MR is LPS: the mask must still address the same array the client clicked in."""
    ref = nib.load(mr)
    assert nib.aff2axcodes(ref.affine) != ("R", "A", "S")
    res = engine_for(BallModel(radius=3.0)).segment(mr, [[10, 80, 5]], [], label="x")
    assert res.mask[10, 80, 5] == 1 and res.mask[106, 10, 14] == 0


def test_second_click_reuses_the_embedding(ct):
    model = BallModel()
    eng = engine_for(model)
    first = eng.segment(ct, [[60, 50, 56]], [], label="liver")
    second = eng.segment(ct, [[60, 50, 56]], [[62, 50, 56]], label="liver")
    assert not first.info["embedding_cached"] and first.timings["encode"] > 0
    assert second.info["embedding_cached"] and second.timings["encode"] == 0.0
    assert second.info["windows"][0]["start"] == first.info["windows"][0]["start"]
    assert model.encoded == 1
    assert second.timings["load"] == 0.0


def test_next_click_refines_the_previous_mask_of_the_same_label(ct):
    model = BallModel(radius=3.0, accumulate=True)
    eng = engine_for(model)
    a, b = [50, 50, 56], [70, 50, 56]
    eng.segment(ct, [a], [], label="liver")
    assert float(model.mask_inputs[-1].abs().max()) == 0.0  # first click: zeros, as SAM-Med3D
    both = eng.segment(ct, [a, b], [], label="liver")
    assert both.mask[tuple(a)] == 1 and both.mask[tuple(b)] == 1
    other_label = eng.segment(ct, [b], [], label="spleen")
    assert other_label.mask[tuple(a)] == 0 and other_label.mask[tuple(b)] == 1
    restart = eng.segment(ct, [b], [], label="liver")  # not an extension of [a, b]: starts over
    assert restart.mask[tuple(a)] == 0 and restart.mask[tuple(b)] == 1


def test_a_prior_mask_starts_a_new_click_sequence(ct, shared_data):
    """One class of an automatic answer as the previous mask: the first click refines it, later clicks continue."""
    liver = np.asarray(nib.load(shared_data / "totalseg_ct" / "label.nii.gz").dataobj) == 5
    model = BallModel(radius=3.0, accumulate=True)
    eng = engine_for(model)
    edge = np.argwhere(liver)[np.argmin(np.argwhere(liver)[:, 0])]
    click = (edge - [2, 0, 0]).tolist()  # just outside the liver, a missed part to add
    first = eng.segment(ct, [click], [], label="liver", prior=liver)
    assert float(model.mask_inputs[0].max()) == 10.0  # the prior, as confident logits
    assert first.mask[tuple(click)] == 1
    inter = (first.mask.astype(bool) & liver).sum()
    assert inter / liver.sum() > 0.97  # all the liver kept (resampled twice through the 1.5 mm grid), in and
    assert (first.mask.astype(bool) & ~liver).sum() < 0.05 * liver.sum()  # out of the click's window; little more
    plain = engine_for(BallModel(radius=3.0, accumulate=True)).segment(ct, [click], [], label="liver")
    assert (plain.mask.astype(bool) & liver).sum() == 0
    more = eng.segment(ct, [click, [32, 20, 20]], [], label="liver")  # extends: continues from its own answer
    assert (more.mask.astype(bool) & liver).sum() == inter
    with pytest.raises(Sam3DInputError, match="does not match the image"):
        eng.segment(ct, [click], [], label="spleen", prior=liver[:-1])


def test_a_prior_is_corrected_by_background_clicks_alone(ct, shared_data):
    """An automatic answer that went too far: a background click takes part away and keeps the rest."""
    liver = np.asarray(nib.load(shared_data / "totalseg_ct" / "label.nii.gz").dataobj) == 5
    eng = engine_for(BallModel(radius=3.0, accumulate=True))
    inside = np.argwhere(liver)[len(np.argwhere(liver)) // 2].tolist()
    with pytest.raises(Sam3DInputError, match="only background"):  # nothing to take away from
        eng.segment(ct, [], [inside], label="liver")
    res = eng.segment(ct, [], [inside], label="liver", prior=liver)
    kept = (res.mask.astype(bool) & liver).sum() / liver.sum()
    assert res.mask[tuple(inside)] == 0 and 0.9 < kept < 1.0
    assert (res.mask.astype(bool) & ~liver).sum() < 0.05 * liver.sum()  # only the resampling's rim


def test_structure_larger_than_a_window_is_followed(ct):
    """A ball wider than the 128^3 window is not cut at the window's edge."""
    res = engine_for(BallModel(radius=90.0)).segment(ct, [[60, 50, 56]], [], label="x")
    assert len(res.info["windows"]) > 1
    extent = np.ptp(np.argwhere(res.mask), axis=0) + 1  # image voxels are 3 mm, model voxels 1.5 mm
    assert extent.max() > 128 * 1.5 / 3.0 + 4
    single = engine_for(BallModel(radius=90.0), max_windows=1).segment(ct, [[60, 50, 56]], [], label="x")
    assert len(single.info["windows"]) == 1 and single.mask.sum() < res.mask.sum()


def test_a_correction_looks_again_only_where_it_moved_the_masks_edge(ct):
    """nnInteractive's "refine changed regions": a click that leaves the edge in place reruns one window, the other
    windows' answers stay; a click that moves the edge is followed into the neighbours."""
    model = BallModel(radius=90.0)  # answers the same ball whatever else is clicked
    eng = engine_for(model)
    first = eng.segment(ct, [[60, 50, 56]], [], label="x")
    same = eng.segment(ct, [[60, 50, 56]], [[5, 5, 5]], label="x")  # a background click the model ignores
    assert len(first.info["windows"]) > 1 and len(same.info["windows"]) == 1
    assert np.array_equal(same.mask, first.mask)

    grow = engine_for(BallModel(radius=40.0, accumulate=True))
    small = grow.segment(ct, [[60, 50, 56]], [], label="x")
    far = [60, 50, 80]  # a second ball across the window's far face in k: the edge moved there
    both = grow.segment(ct, [[60, 50, 56], far], [], label="x")
    assert len(both.info["windows"]) > 1 and both.mask[tuple(far)] == 1 and both.mask[60, 50, 56] == 1
    assert both.mask.sum() > small.mask.sum()


def test_roi_limits_a_click_only_model(ct):
    roi = [55, 45, 65, 55, 50, 60]  # i0, j0, i1, j1, k0, k1
    res = engine_for(BallModel(radius=30.0)).segment(ct, [[60, 50, 56]], [], roi=roi, label="x")
    vox = np.argwhere(res.mask)
    assert vox.min(0).tolist() >= [55, 45, 50] and vox.max(0).tolist() <= [65, 55, 60]
    center_only = engine_for(BallModel(radius=3.0)).segment(ct, [], [], roi=roi, label="x")
    assert center_only.mask[60, 50, 55] == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"foreground": [[122, 0, 0]]}, "outside the image"),
        ({"foreground": [[-1, 0, 0]]}, "outside the image"),
        ({"foreground": [[1, 2]]}, "voxel indices"),
        ({}, "no prompt"),
        ({"background": [[1, 1, 1]]}, "only background"),
        ({"foreground": [[1, 1, 1]], "roi": [5, 5, 1, 1, 5, 6]}, "roi"),
    ],
)
def test_bad_prompts_are_refused_and_the_engine_keeps_working(ct, kwargs, message):
    eng = engine_for(BallModel())
    with pytest.raises(Sam3DInputError, match=message):
        eng.segment(ct, label="x", **kwargs)
    assert eng.segment(ct, [[60, 50, 56]], [], label="x").mask.any()


def test_bad_images_are_refused(tmp_path, ct):
    eng = engine_for(BallModel())
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not a nifti file")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), flat)
    thin = tmp_path / "thin.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 1), np.float32), np.eye(4)), thin)
    nans = tmp_path / "nans.nii.gz"
    data = np.zeros((16, 16, 16), np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), nans)
    for path, message in [
        (corrupt, "cannot read image"),
        (flat, "3D"),
        (thin, "2D"),
        (nans, "NaN"),
        (tmp_path / "missing.nii.gz", "not found"),
    ]:
        with pytest.raises(Sam3DInputError, match=message):
            eng.segment(str(path), [[1, 1, 0]], [], label="x")
    with pytest.raises(Sam3DInputError, match="too large"):
        engine_for(BallModel(), max_voxels=1000).segment(ct, [[1, 1, 1]], [], label="x")
    assert eng.segment(ct, [[60, 50, 56]], [], label="x").mask.any()


def test_changed_image_gets_a_new_session(tmp_path, ct):
    path = tmp_path / "img.nii.gz"
    shutil.copy(ct, path)
    model = BallModel()
    eng = engine_for(model)
    eng.segment(str(path), [[60, 50, 56]], [], label="x")
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine), path)
    res = eng.segment(str(path), [[60, 50, 56]], [], label="x")
    assert not res.info["embedding_cached"] and res.timings["load"] > 0 and model.encoded == 2


def test_dicom_series_and_nrrd_load(shared_data):
    dicom = shared_data / "dcmqi_ct3slice"
    folder_res = None
    series = sorted(dicom.glob("*.dcm"))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for f in series:
            shutil.copy(f, d)
        folder_res = engine_for(BallModel(radius=3.0)).segment(d, [[256, 256, 1]], [], label="x")
    assert folder_res.mask.shape == (512, 512, 3) and folder_res.mask[256, 256, 1] == 1
    nrrd = shared_data / "pyradiomics_small" / "prostate_phantom_subvolume.nrrd"
    res = engine_for(BallModel(radius=3.0)).segment(str(nrrd), [[40, 30, 6]], [], label="x")
    assert res.mask.shape == (82, 67, 13) and res.mask[40, 30, 6] == 1


def test_write_label_keeps_the_grid(tmp_path, mr):
    eng = engine_for(BallModel())
    res = eng.segment(mr, [[40, 30, 10]], [], label="x")
    out = tmp_path / "label.nii.gz"
    eng.write_label(res, str(out))
    saved = nib.load(out)
    assert saved.shape == res.mask.shape
    np.testing.assert_allclose(saved.affine, nib.load(mr).affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), res.mask)
    assert [p.name for p in tmp_path.iterdir()] == ["label.nii.gz"]  # no temporary file left behind


def test_byte_lru_evicts_least_recent_by_bytes():
    cache = ByteLRU(100, sizeof=len)
    cache.put("a", b"x" * 40)
    cache.put("b", b"x" * 40)
    cache.get("a")
    cache.put("c", b"x" * 40)  # over budget: "b" is the least recently used
    assert "a" in cache and "c" in cache and "b" not in cache and cache.nbytes == 80
    cache.put("huge", b"x" * 101)
    assert "huge" not in cache


class ThresholdModel(nn.Module):
    """Segments the bright voxels of its window: it answers only what the window shows, as a real network does."""

    img_size = low_res_size = 32
    supports_boxes = False

    def encode_image(self, x):
        return x

    def decode(self, emb, points=None, boxes=None, mask_input=None, multimask_output=False):
        return emb - 0.5, torch.ones(1, 1)


@pytest.fixture(scope="module")
def spheres(tmp_path_factory):
    """A 1 mm image with a bright sphere 60 mm across around (40, 50, 50) and one 10 mm across around (85, 85, 85)."""
    grid = np.stack(np.meshgrid(*[np.arange(100)] * 3, indexing="ij"), -1)
    image = (np.linalg.norm(grid - [40, 50, 50], axis=-1) <= 30).astype(np.float32)
    image[np.linalg.norm(grid - [85, 85, 85], axis=-1) <= 5] = 1.0
    path = tmp_path_factory.mktemp("spheres") / "spheres.nii.gz"
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(path))
    return str(path), image > 0.5


def test_autozoom_sees_a_structure_larger_than_the_window_on_a_coarser_grid(spheres):
    path, truth = spheres
    large = truth & (np.arange(100)[:, None, None] < 75)
    engine = engine_for(ThresholdModel(), spacing=(1.0, 1.0, 1.0), normalize="none", max_zoom=4.0)
    res = engine.segment(path, [[40, 50, 50]], [], label="large")
    # 32 mm, then 48 mm windows cut the sphere; at 2.25 x 1 mm the 72 mm window holds it whole, in one window
    assert res.info["zoom"] == pytest.approx(2.25) and len(res.info["windows"]) == 1
    assert 2 * (res.mask.astype(bool) & large).sum() / (res.mask.sum() + large.sum()) > 0.9
    # the sequence's next click stays on that grid; a small structure keeps the finest grid
    again = engine.segment(path, [[40, 50, 50], [30, 50, 50]], [], label="large")
    assert again.info["zoom"] == pytest.approx(2.25)
    small = engine.segment(path, [[85, 85, 85]], [], label="small")
    assert small.info["zoom"] == 1.0 and small.info["spacing"] == [1.0, 1.0, 1.0]
    # a box around the sphere starts on a grid that holds it: no finer grid is tried first
    boxed = engine_for(ThresholdModel(), spacing=(1.0, 1.0, 1.0), normalize="none", max_zoom=4.0)
    res = boxed.segment(path, [], [], roi=[10, 20, 70, 80, 20, 80], label="boxed")
    assert res.info["zoom"] == pytest.approx(2.25) and res.timings["encode"] > 0
    assert sorted(zoom for _, zoom in boxed._sessions._items) == [1.0, 2.25]  # the box measured at 1, then 2.25
    # without AutoZoom the finest grid follows the sphere with more windows
    plain = engine_for(ThresholdModel(), spacing=(1.0, 1.0, 1.0), normalize="none").segment(path, [[40, 50, 50]], [])
    assert plain.info["zoom"] == 1.0 and len(plain.info["windows"]) > 1


def test_engine_config_refuses_an_unknown_precision_or_zoom():
    assert EngineConfig.from_dict({"precision": "bf16", "max_zoom": 4}).precision == "bf16"
    with pytest.raises(ValueError, match="precision must be fp32 or bf16, got 'fp16'"):
        EngineConfig.from_dict({"precision": "fp16"})
    with pytest.raises(ValueError, match="max_zoom must be >= 1"):
        EngineConfig.from_dict({"max_zoom": 0.5})


class WindowRecorder(BallModel):
    """A ball model that keeps the range of every window it encodes."""

    def encode_image(self, x):
        self.ranges = getattr(self, "ranges", []) + [(float(x.min()), float(x.max()))]
        return super().encode_image(x)


def test_a_ct_is_seen_through_the_models_ct_window_and_an_mr_is_not(ct, mr):
    """The CT is recognised by its air (HU below -500) and clipped to `ct_clip`; an MR keeps its bright voxels."""
    seen = {}
    for name, path, click in (("ct", ct, [60, 50, 56]), ("mr", mr, [58, 45, 10])):
        model = WindowRecorder()
        engine_for(model, spacing=(3.0, 3.0, 3.0), ct_clip=(-200.0, 300.0), normalize="none").segment(path, [click], [])
        seen[name] = model.ranges[0]
    assert seen["ct"] == (-200.0, 300.0)
    assert seen["mr"][1] > 600, seen


def test_engine_config_refuses_an_unknown_intensity_setting():
    assert EngineConfig.from_dict({"intensity": {"ct_clip": [-200, 300]}}).ct_clip == (-200.0, 300.0)
    with pytest.raises(ValueError, match=r"unknown intensity setting\(s\) \['window'\]"):
        EngineConfig.from_dict({"intensity": {"window": [-200, 300]}})
