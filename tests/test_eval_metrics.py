"""Evaluation metrics against hand-computed values, NoC, and a perfect predictor through the evaluation loop."""

import math

import numpy as np
import pytest

from sam3d.data.cases import Case, LoadedCase
from sam3d.evaluation import EvalConfig, noc, run_target, segmentation_metrics


def cube_pair(shift=2):
    """A 10^3 cube (voxels 5..14) and the same cube shifted by `shift` voxels along axis 0."""
    gt = np.zeros((24, 20, 20), bool)
    gt[5:15, 5:15, 5:15] = True
    pred = np.zeros_like(gt)
    pred[5 + shift : 15 + shift, 5:15, 5:15] = True
    return pred, gt


# Surface voxels of either cube (MONAI: the mask minus its erosion): 488. Distances from the shifted cube's
# surface to the other's (the same by symmetry), for a shift of 2 along i:
#   top face i=16 (100 voxels): 2;  ring i=15 (36): 1;  side rings i=7..14 (288): 0 (shared);
#   bottom face i=7 inside the ring (64): min(2, distance to the side faces) -> 28 at 1, 36 at 2.
#   => 288 at 0, 64 at 1, 136 at 2.
N_SURFACE = 488


def test_cube_against_shifted_cube_isotropic():
    pred, gt = cube_pair()
    m = segmentation_metrics(pred, gt, spacing=(1, 1, 1))
    assert m["dice"] == pytest.approx(2 * 800 / 2000)  # overlap 8 x 10 x 10
    assert m["iou"] == pytest.approx(800 / 1200)
    assert m["hd95"] == pytest.approx(2.0)  # 136 of 488 distances (28 %) are 2: the 95th percentile is 2
    assert m["assd"] == pytest.approx((64 * 1 + 136 * 2) / N_SURFACE)
    assert m["nsd"] == pytest.approx(1.0)  # every distance <= 2 mm
    assert m["volume_error"] == 0.0
    tight = segmentation_metrics(pred, gt, spacing=(1, 1, 1), nsd_tolerance_mm=1.0)
    assert tight["nsd"] == pytest.approx((288 + 64) / N_SURFACE)


def test_cube_against_shifted_cube_in_mm():
    # 2 mm along the shift: the top face is 4 mm away; the bottom face's distances to the side faces stay 1 mm
    # per voxel: rings at 1, 2, 3, 4 mm hold 28, 20, 12, 4 voxels.
    pred, gt = cube_pair()
    m = segmentation_metrics(pred, gt, spacing=(2, 1, 1))
    assert m["dice"] == pytest.approx(0.8)
    assert m["hd95"] == pytest.approx(4.0)
    assert m["assd"] == pytest.approx((100 * 4 + 36 * 2 + 28 * 1 + 20 * 2 + 12 * 3 + 4 * 4) / N_SURFACE)
    assert m["nsd"] == pytest.approx((288 + 36 + 28 + 20) / N_SURFACE)


def test_identical_empty_and_partial_masks():
    _, gt = cube_pair()
    m = segmentation_metrics(gt, gt, spacing=(3, 3, 3))
    assert m == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0, "volume_error": 0.0}
    empty = segmentation_metrics(np.zeros_like(gt), gt)
    assert empty["dice"] == 0 and empty["nsd"] == 0 and empty["volume_error"] == -1.0
    assert math.isinf(empty["hd95"]) and math.isinf(empty["assd"])
    half = gt.copy()
    half[:, :, 10:] = False
    assert segmentation_metrics(half, gt)["volume_error"] == pytest.approx(-0.5)
    assert segmentation_metrics(np.zeros_like(gt), np.zeros_like(gt))["dice"] == 1.0


def test_masks_touching_the_array_edge():
    gt = np.zeros((10, 10, 10), bool)
    gt[0:5, 0:5, 0:5] = True
    m = segmentation_metrics(gt, gt)
    assert m["dice"] == 1.0 and m["hd95"] == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))


def test_noc():
    dices = [0.5, 0.82, 0.86, 0.95]
    assert noc(dices, 0.80) == (2, False)
    assert noc(dices, 0.85) == (3, False)
    assert noc(dices, 0.90) == (4, False)
    assert noc(dices, 0.99) == (4, True)  # never reached: the budget, counted as a failure
    assert noc([0.5, 0.6], 0.9, budget=10) == (10, True)
    assert noc([float("nan"), 0.95], 0.9) == (2, False)
    assert noc([0.95], 0.9) == (1, False)


class Perfect:
    """A predictor that answers the reference itself."""

    name = "perfect"

    def __init__(self, gt):
        self.gt, self.calls = gt, 0

    def segment(self, image_path, foreground, background, roi, label):
        self.calls += 1
        return self.gt.astype(np.uint8)


def _loaded(label: np.ndarray) -> LoadedCase:
    case = Case("toy", image="unused.nii.gz", label="unused.nii.gz", names={3: "organ"})
    return LoadedCase(case, np.zeros(label.shape, np.float32), label, np.eye(4), (1.5, 1.5, 3.0))


@pytest.mark.parametrize("protocol", ["center", "random", "noisy1", "noisy2", "box"])
def test_perfect_predictor_scores_dice_1_hd95_0_noc_1(protocol):
    label = np.zeros((20, 20, 20), np.int32)
    label[4:12, 5:15, 6:10] = 3
    seg = Perfect(label == 3)
    trace = run_target(seg, _loaded(label), 3, EvalConfig(protocol=protocol, clicks=5))
    rows = trace.rows
    assert [r["click"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["dice"] == 1.0 and r["hd95"] == 0.0 and r["nsd"] == 1.0 for r in rows)
    assert noc([r["dice"] for r in rows], 0.90) == (1, False)
    assert rows[0]["label_name"] == "organ" and rows[0]["case"] == "toy"
    if protocol in ("center", "random", "box"):  # nothing left to correct: no further call
        assert seg.calls == 1 and all(r["seconds"] == 0.0 for r in rows[1:])


class KeepsThePrior:
    """A method that answers the mask it was given, whatever the clicks."""

    name = "keeps"

    def __init__(self) -> None:
        self.calls = []

    def segment(self, image_path, foreground, background, roi, label, prior=None):
        self.calls.append((list(foreground), list(background), prior))
        return prior


def test_prior_protocol_gives_the_perturbed_reference_and_clicks_on_its_errors():
    label = np.zeros((32, 32, 32), np.int32)
    label[6:26, 8:24, 4:28] = 3
    seg = KeepsThePrior()
    rows = run_target(seg, _loaded(label), 3, EvalConfig(clicks=3, seed=4, prior="perturbed")).rows
    prior = seg.calls[0][2].astype(bool)
    assert all(c[2] is seg.calls[0][2] for c in seg.calls)  # the same prior with every call
    first = rows[0]["prior_dice"]
    assert 0.3 < first < 1.0 and all(r["prior_dice"] == first for r in rows)
    assert all(r["dice"] == first for r in rows)  # a method that keeps the prior scores the prior
    (fg, bg, _), errors = seg.calls[0], prior != (label == 3)
    assert len(fg) + len(bg) == 1 and all(errors[tuple(p)] for p in [*fg, *bg])  # the first click corrects it
    again = run_target(KeepsThePrior(), _loaded(label), 3, EvalConfig(clicks=1, seed=4, prior="perturbed")).rows
    assert again[0]["prior_dice"] == first  # seeded per target


def test_random_walker_baseline_on_a_bright_ball():
    from sam3d.evaluation import random_walker_segment

    rng = np.random.default_rng(0)
    idx = np.indices((40, 40, 40))
    ball = ((idx - 20) ** 2).sum(0) <= 8**2
    image = np.where(ball, 100.0, 0.0) + rng.normal(0, 5, ball.shape)
    mask = random_walker_segment(image, (1.0, 1.0, 1.0), [[20, 20, 20]], [])
    assert mask.shape == ball.shape and mask.dtype == np.uint8
    assert segmentation_metrics(mask, ball)["dice"] > 0.95
    # a box and no click: the box's centre is the foreground seed, nothing outside the box
    boxed = random_walker_segment(image, (1.0, 1.0, 1.0), [], [], roi=[12, 12, 28, 28, 12, 28])
    assert segmentation_metrics(boxed, ball)["dice"] > 0.95
    assert not boxed[:10].any()
