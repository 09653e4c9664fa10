"""The click simulator on hand-made reference masks and error regions, for every protocol."""

import numpy as np
import pytest
import torch

from sam3d.data.clicks import (
    PROTOCOLS,
    ClickSimulator,
    Prompt,
    center_click,
    derive_seed,
    interior_point,
    jittered_box,
    near_band,
    random_click,
)


def cube(shape=(30, 30, 30), lo=(5, 5, 5), hi=(15, 15, 15)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


# ---- center ------------------------------------------------------------------------------------------------


def test_center_first_click_is_the_cube_centre():
    gt = cube()  # voxels 5..14: the EDT peaks at 9 and 10 (distance 5); ties go to the first in C order
    assert center_click(gt, None) == ((9, 9, 9), True)
    assert ClickSimulator("center").next(gt, None, 1).points == [((9, 9, 9), True)]


def test_center_clicks_the_largest_missed_region():
    gt = cube()
    pred = gt.copy()
    pred[5:15, 5:15, 5:8] = False  # missed slab of 10x10x3 = 300 voxels
    pred[20:22, 20:22, 20:22] = True  # extra blob of 8 voxels
    (p, positive) = center_click(gt, pred)
    assert positive
    # the slab's middle plane k = 6 is 2 voxels from its faces; so is every (i, j) in 6..13: the first wins
    assert p == (6, 6, 6)


def test_center_clicks_the_largest_extra_region_negative():
    gt = cube()
    pred = gt.copy()
    pred[5:15, 5:15, 15:20] = True  # extra slab 10x10x5 = 500 voxels (k 15..19), middle k = 17 (3 deep)
    pred[5, 5, 5] = False  # one missed voxel
    assert center_click(gt, pred) == ((7, 7, 17), False)  # (i, j) 3 from the slab's sides: first in C order


def test_center_tie_goes_to_the_missed_region_and_perfect_gives_none():
    gt = np.zeros((10, 10, 10), bool)
    gt[2, 2, 2] = True
    pred = np.zeros_like(gt)
    pred[7, 7, 7] = True
    assert center_click(gt, pred) == ((2, 2, 2), True)
    assert center_click(gt, gt) is None
    prompt = ClickSimulator("center").next(gt, gt, 2)
    assert not prompt and prompt.points == []


def test_center_uses_26_connectivity_components():
    gt = np.zeros((12, 12, 12), bool)
    # two diagonal-touching 2-voxel pieces form one 26-connected region of 4 voxels ...
    gt[1, 1, 1:3] = True
    gt[2, 2, 3:5] = True
    # ... which beats a face-connected region of 3 voxels
    gt[8, 8, 7:10] = True
    p, positive = center_click(gt, None)
    assert positive and p[:2] in ((1, 1), (2, 2))


def test_interior_point_in_mm_follows_the_spacing():
    region = np.zeros((5, 17, 17), bool)
    region[1:4, 1:16, 1:16] = True  # 3 x 15 x 15 voxels
    # in voxels the thin axis limits the distance to 2 everywhere on its middle plane: the first such voxel
    assert interior_point(region) == (2, 2, 2)
    # at 5 mm along i the thin axis is 15 mm thick (10 mm from its middle to the edge): the unique peak is the
    # middle of the square, 8 mm from its sides
    assert interior_point(region, spacing=(5, 1, 1)) == (2, 8, 8)


def test_center_treats_the_array_edge_as_boundary():
    gt = np.zeros((10, 10, 10), bool)
    gt[0:4, 0:4, 0:4] = True  # touches the corner of the array
    p, _ = center_click(gt, None)
    assert p == (1, 1, 1)  # not (0, 0, 0), which would be "interior" without a padded edge


# ---- random ------------------------------------------------------------------------------------------------


def test_random_first_click_in_foreground_then_in_the_error_region():
    gt = cube()
    sim = ClickSimulator("random", seed=3)
    first = sim.next(gt, None, 1).points
    assert len(first) == 1 and first[0][1] and gt[first[0][0]]
    pred = gt.copy()
    pred[5:15, 5:15, 5:10] = False  # missed
    pred[20:25, 20:25, 20:25] = True  # extra
    fn, fp = gt & ~pred, pred & ~gt
    seen = set()
    for it in range(2, 60):
        ((p, positive),) = sim.next(gt, pred, it).points
        assert fn[p] or fp[p]
        assert positive == bool(fn[p])
        seen.add(positive)
    assert seen == {True, False}  # both parts of the error region get clicks


def test_random_click_function_and_perfect_prediction():
    gt = cube()
    rng = np.random.default_rng(0)
    assert random_click(gt, gt, rng) is None
    p, positive = random_click(gt, None, rng)
    assert positive and gt[p]


# ---- near band, noisy protocols -------------------------------------------------------------------------------


def test_near_band_is_a_ball_around_a_single_voxel():
    gt = np.zeros((21, 21, 21), bool)
    gt[10, 10, 10] = True
    # integer points with x^2 + y^2 + z^2 <= 4: 1 + 6 (r=1) + 12 (r=sqrt 2) + 8 (r=sqrt 3) + 6 (r=2) = 33
    assert near_band(gt, 2.0).sum() == 33
    assert near_band(gt, 2.0, spacing=(2, 2, 2)).sum() == 7  # 2 mm at 2 mm voxels: the 6 face neighbours
    band = near_band(cube(), 2.0)
    assert band[5, 9, 9] and band[6, 9, 9] and not band[7, 9, 9]  # inside rim: 1 and 2 voxels deep
    assert band[4, 9, 9] and band[3, 9, 9] and not band[2, 9, 9]  # outside shell: 1 and 2 voxels away


def test_noisy1_follows_segsam3d_setting_1():
    gt = cube()
    sim = ClickSimulator("noisy1", seed=1, near_mm=3.0)
    band = near_band(gt, 3.0)
    it1 = sim.next(gt, None, 1).points
    assert it1 == [((9, 9, 9), True)]
    pred = gt.copy()
    pred[5:15, 5:15, 5:9] = False
    for it in (2, 4):
        pts = sim.next(gt, pred, it).points
        assert len(pts) == 2
        assert all(pos for _, pos in pts)  # labelled positive ...
        assert all(not gt[p] and band[p] for p, _ in pts)  # ... but background, near the target
    for it in (3, 5):
        pts = sim.next(gt, pred, it).points
        assert len(pts) == 5
        assert all(gt[p] != pred[p] and pos == bool(gt[p]) for p, pos in pts)  # error region, correct labels
    assert sim.next(gt, pred, 6).points == [center_click(gt, pred)]


def test_noisy2_follows_segsam3d_setting_2():
    gt = cube()
    sim = ClickSimulator("noisy2", seed=2, near_mm=3.0)
    band = near_band(gt, 3.0)
    assert sim.next(gt, None, 1).points == [((9, 9, 9), True)]
    pred = gt.copy()
    labels_seen = set()
    for it in (2, 3, 4, 5):
        pts = sim.next(gt, pred, it).points
        assert len(pts) == 5
        assert all(band[p] for p, _ in pts)
        wrong = it in (2, 4)
        assert all(pos == (bool(gt[p]) != wrong) for p, pos in pts)
        labels_seen |= {pos for _, pos in pts}
    assert labels_seen == {True, False}
    assert sim.next(gt, pred, 6).points == []  # perfect prediction: center has nothing to correct


def test_noisy_points_are_in_mm():
    gt = cube()
    sim = ClickSimulator("noisy2", seed=0, spacing=(3, 3, 3), near_mm=3.0)  # 3 mm = one voxel
    pts = sim.next(gt, gt, 2).points
    assert all(near_band(gt, 1.0)[p] for p, _ in pts)


# ---- box ---------------------------------------------------------------------------------------------------


def test_box_then_center_clicks():
    gt = cube(lo=(4, 6, 8), hi=(10, 12, 20))
    sim = ClickSimulator("box", seed=0)
    first = sim.next(gt, None, 1)
    assert first.points == [] and first.box == ((4, 6, 8), (9, 11, 19))
    assert first.roi() == [4, 6, 9, 11, 8, 19]
    pred = gt.copy()
    pred[4:10, 6:12, 8:11] = False
    assert sim.next(gt, pred, 2).points == [center_click(gt, pred)]


def test_box_jitter_is_bounded_and_clipped():
    gt = cube(lo=(0, 6, 8), hi=(10, 12, 30))
    for seed in range(20):
        (lo, hi) = jittered_box(gt, np.random.default_rng(seed), jitter_mm=6.0, spacing=(3, 3, 3))
        assert all(0 <= a <= b <= 29 for a, b in zip(lo, hi))
        assert all(abs(a - b) <= 2 for a, b in zip(lo, (0, 6, 8)))
        assert all(abs(a - b) <= 2 for a, b in zip(hi, (9, 11, 29)))
    boxes = {jittered_box(gt, np.random.default_rng(s), 6.0, (3, 3, 3)) for s in range(20)}
    assert len(boxes) > 1


# ---- determinism, inputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_protocol_is_deterministic(protocol):
    gt = cube()
    pred = gt.copy()
    pred[5:15, 5:15, 5:9] = False
    pred[18:22, 5:10, 5:10] = True

    def run(seed):
        sim = ClickSimulator(protocol, seed=seed, spacing=(1.5, 1.5, 3), box_jitter_mm=3.0)
        return [sim.next(gt, None if it == 1 else pred, it) for it in range(1, 7)]

    a, b = run(derive_seed(7, "case", 1)), run(derive_seed(7, "case", 1))
    assert [(p.points, p.box) for p in a] == [(p.points, p.box) for p in b]
    assert all(p for p in a)
    if protocol != "center":
        c = run(derive_seed(7, "case", 2))
        assert [(p.points, p.box) for p in a] != [(p.points, p.box) for p in c]


def test_derive_seed_is_stable_and_separates_keys():
    assert derive_seed(0, "a", 1) == derive_seed(0, "a", 1)
    assert len({derive_seed(0, "a", 1), derive_seed(0, "a", 2), derive_seed(1, "a", 1), derive_seed(0, "b", 1)}) == 4


def test_accepts_torch_tensors_and_integer_masks():
    gt = torch.from_numpy(cube().astype(np.uint8))
    assert center_click(gt, None) == ((9, 9, 9), True)
    assert center_click(gt.bool(), torch.zeros_like(gt)) == ((9, 9, 9), True)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown click protocol"):
        ClickSimulator("nope")
    with pytest.raises(ValueError, match="empty"):
        ClickSimulator().next(np.zeros((4, 4, 4), bool), None, 1)
    with pytest.raises(ValueError, match="shape"):
        center_click(cube(), np.zeros((3, 3, 3), bool))
    assert Prompt().roi() is None
