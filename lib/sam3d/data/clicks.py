"""The click simulator: where a simulated annotator clicks next, given the reference mask and the last prediction.

Written once and shared by evaluation (the protocols of the evaluation harness) and training (iterative click
sampling). It works on boolean arrays only (numpy; a CPU torch tensor goes through `np.asarray` without a
copy), knows nothing about files or MONAI Label, and is deterministic given a seed or a `numpy.random.Generator`.

Coordinates are voxel indices (i, j, k) of the arrays given, i.e. of the array `monai.transforms.LoadImage`
returns when the evaluation hands it that array. Distances are in mm when `spacing` is given, else in voxels.

Protocols (`ClickSimulator(protocol)`, iterations counted from 1):

- ``center`` (default; RITM, CVPR 2025 SegFM3D): one click per iteration at the interior-most voxel (maximum of
  the Euclidean distance transform) of the largest connected error region (26-connectivity, false negatives and
  false positives labelled separately; ties go to the missed region). Positive when that region is missed
  (false negative), negative when it is extra (false positive). The distance transform treats the array's edge
  as a boundary.
- ``random`` (SAM-Med3D): first click uniform over the foreground; then one click uniform over the error region
  (false negatives and false positives together), positive when it falls on the foreground.
- ``noisy1`` / ``noisy2``: SegSAM-3D's robustness schedules (Table IV), then ``center`` clicks from iteration 6:

  ======== ========================================== ==============================================
  iter.    noisy1 (positional noise)                  noisy2 (semantic noise)
  ======== ========================================== ==============================================
  1        1 positive ``center`` click (correct)      1 positive ``center`` click (correct)
  2, 4     2 background voxels of the near band,      5 voxels of the near band, labels flipped
           labelled positive (incorrect)              (inside -> negative, outside -> positive)
  3, 5     5 voxels of the error region, correct      5 voxels of the near band, correct labels
           labels (as ``random``)
  ======== ========================================== ==============================================

  The *near band* ("near the target") is every voxel whose Euclidean distance to the target's surface is at
  most ``near_mm`` (default 10 mm): the shell outside the target within ``near_mm`` of it plus the rim inside
  it within ``near_mm`` of the background. Points are drawn uniformly without replacement (fewer when the
  region holds fewer voxels). A point the schedule calls "random" is thus random in place but never far
  from the target, which is what makes setting 2's wrong labels conflict with the image.
- ``box``: iteration 1 gives a 3D box (the reference's bounding box, each of its six faces moved independently
  by a uniform offset in [-box_jitter_mm, +box_jitter_mm], rounded to voxels and clipped to the array) and no
  point; later iterations give ``center`` clicks.
"""

import zlib
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

PROTOCOLS = ("center", "random", "noisy1", "noisy2", "box")

_CONN26 = np.ones((3, 3, 3), dtype=bool)

Point = tuple[int, int, int]


@dataclass
class Prompt:
    """The prompts one iteration adds: points (ijk, is_positive) and, for `box` on iteration 1, a box."""

    points: list[tuple[Point, bool]] = field(default_factory=list)
    box: tuple[Point, Point] | None = None  # inclusive voxel corners (lo, hi)

    @property
    def foreground(self) -> list[Point]:
        return [p for p, pos in self.points if pos]

    @property
    def background(self) -> list[Point]:
        return [p for p, pos in self.points if not pos]

    def roi(self) -> list[int] | None:
        """The box as MONAI Label's `roi` ([i0, j0, i1, j1, k0, k1]), or None."""
        if self.box is None:
            return None
        (i0, j0, k0), (i1, j1, k1) = self.box
        return [i0, j0, i1, j1, k0, k1]

    def __bool__(self) -> bool:
        return bool(self.points) or self.box is not None


def derive_seed(seed: int, *keys) -> int:
    """A seed for one (case, label, ...) from the run's seed: stable across processes (no Python `hash`)."""
    words = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(str(k).encode()) for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def _as_bool(a) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 3:
        raise ValueError(f"expected a 3D mask, got shape {arr.shape}")
    return arr if arr.dtype == bool else arr != 0


def _bbox(mask: np.ndarray, pad: int = 0) -> tuple[slice, ...] | None:
    """The slices of mask's bounding box grown by `pad` voxels (clipped), or None when mask is empty."""
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    if any(len(i) == 0 for i in idx):
        return None
    return tuple(slice(max(int(i[0]) - pad, 0), min(int(i[-1]) + pad + 1, n)) for i, n in zip(idx, mask.shape))


def _spacing(spacing) -> np.ndarray:
    return np.ones(3) if spacing is None else np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))


def error_regions(gt, pred) -> tuple[np.ndarray, np.ndarray]:
    """(false negatives, false positives) as boolean arrays; `pred=None` is an empty prediction."""
    gt = _as_bool(gt)
    if pred is None:
        return gt.copy(), np.zeros_like(gt)
    pred = _as_bool(pred)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the reference's {gt.shape}")
    return gt & ~pred, pred & ~gt


def interior_point(region: np.ndarray, spacing=None) -> Point:
    """The voxel of `region` farthest from its boundary (EDT maximum; the array's edge counts as boundary).

    Ties go to the first voxel in C order. Only the region's bounding box is transformed.
    """
    box = _bbox(region)
    if box is None:
        raise ValueError("empty region")
    sub = np.pad(region[box], 1)  # zero border: the array edge is a boundary, as in RITM
    dist = ndimage.distance_transform_edt(sub, sampling=_spacing(spacing))
    local = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return tuple(int(c - 1 + s.start) for c, s in zip(local, box))


def _largest_component(mask: np.ndarray) -> tuple[np.ndarray | None, int]:
    box = _bbox(mask)
    if box is None:
        return None, 0
    labels, n = ndimage.label(mask[box], structure=_CONN26)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    best = int(np.argmax(sizes))
    out = np.zeros(mask.shape, dtype=bool)
    out[box] = labels == best
    return out, int(sizes[best])


def center_click(gt, pred=None, spacing=None) -> tuple[Point, bool] | None:
    """The ``center`` protocol's click: (ijk, is_positive), or None when the prediction has no error."""
    fn, fp = error_regions(gt, pred)
    fn_cc, fn_size = _largest_component(fn)
    fp_cc, fp_size = _largest_component(fp)
    if fn_size == 0 and fp_size == 0:
        return None
    if fn_size >= fp_size:
        return interior_point(fn_cc, spacing), True
    return interior_point(fp_cc, spacing), False


def _sample(mask: np.ndarray, rng: np.random.Generator, n: int) -> list[Point]:
    """Up to n voxels of mask, uniformly without replacement, in the order drawn."""
    flat = np.flatnonzero(mask)
    if len(flat) == 0:
        return []
    pick = rng.choice(len(flat), size=min(n, len(flat)), replace=False)
    return [tuple(int(v) for v in np.unravel_index(int(flat[i]), mask.shape)) for i in pick]


def random_click(gt, pred, rng: np.random.Generator) -> tuple[Point, bool] | None:
    """The ``random`` protocol's click: uniform over the error region (over the foreground when pred is None)."""
    gt_b = _as_bool(gt)
    fn, fp = error_regions(gt_b, pred)
    pts = _sample(fn | fp, rng, 1)
    if not pts:
        return None
    return pts[0], bool(gt_b[pts[0]])


def near_band(gt, near_mm: float, spacing=None) -> np.ndarray:
    """Voxels within `near_mm` (Euclidean, mm with `spacing`) of the target's surface, on both sides of it."""
    gt = _as_bool(gt)
    sp = _spacing(spacing)
    pad = [int(np.ceil(near_mm / s)) + 1 for s in sp]
    box = _bbox(gt)
    if box is None:
        raise ValueError("empty reference mask")
    box = tuple(slice(max(b.start - p, 0), min(b.stop + p, n)) for b, p, n in zip(box, pad, gt.shape))
    sub = gt[box]
    outside = ndimage.distance_transform_edt(~sub, sampling=sp)  # distance to the target
    inside = ndimage.distance_transform_edt(np.pad(sub, 1), sampling=sp)[1:-1, 1:-1, 1:-1]  # to the background
    band = np.zeros(gt.shape, dtype=bool)
    band[box] = np.where(sub, inside <= near_mm, outside <= near_mm)
    return band


def jittered_box(
    gt, rng: np.random.Generator | None = None, jitter_mm: float = 0.0, spacing=None
) -> tuple[Point, Point]:
    """The reference's bounding box (inclusive corners), each face moved by up to `jitter_mm`, clipped."""
    gt = _as_bool(gt)
    box = _bbox(gt)
    if box is None:
        raise ValueError("empty reference mask")
    lo = np.array([s.start for s in box])
    hi = np.array([s.stop - 1 for s in box])
    if jitter_mm > 0:
        rng = rng if rng is not None else np.random.default_rng(0)
        limit = jitter_mm / _spacing(spacing)
        lo = lo + np.rint(rng.uniform(-limit, limit)).astype(int)
        hi = hi + np.rint(rng.uniform(-limit, limit)).astype(int)
    shape = np.array(gt.shape) - 1
    lo, hi = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi)


class ClickSimulator:
    """A simulated annotator for one target: `next(gt, pred, iteration)` gives the prompts that iteration adds.

    `seed` is an int or a `numpy.random.Generator`; use `derive_seed(seed, case, label)` for one simulator per
    target, so that each target's clicks do not depend on which targets ran before it. `pred` is the current
    prediction (None before the first one); an empty `Prompt` means the prediction is already perfect.
    """

    def __init__(
        self, protocol: str = "center", seed=0, spacing=None, near_mm: float = 10.0, box_jitter_mm: float = 0.0
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown click protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
        self.protocol = protocol
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.spacing = None if spacing is None else tuple(float(s) for s in _spacing(spacing))
        self.near_mm = float(near_mm)
        self.box_jitter_mm = float(box_jitter_mm)

    def next(self, gt, pred=None, iteration: int = 1) -> Prompt:
        if iteration < 1:
            raise ValueError("iterations count from 1")
        gt = _as_bool(gt)
        if not gt.any():
            raise ValueError("the reference mask is empty: nothing to click on")
        if iteration == 1:
            pred = None  # the first prompt never depends on an earlier answer
        p = self.protocol
        if p == "box" and iteration == 1:
            return Prompt(box=jittered_box(gt, self.rng, self.box_jitter_mm, self.spacing))
        if p == "random":
            return self._one(random_click(gt, pred, self.rng))
        if p in ("noisy1", "noisy2") and 2 <= iteration <= 5:
            return self._noisy(gt, pred, iteration)
        return self._one(center_click(gt, pred, self.spacing))

    @staticmethod
    def _one(click) -> Prompt:
        return Prompt(points=[] if click is None else [click])

    def _noisy(self, gt: np.ndarray, pred, iteration: int) -> Prompt:
        wrong = iteration in (2, 4)
        band = near_band(gt, self.near_mm, self.spacing)
        if self.protocol == "noisy1":
            if wrong:  # negatives mislabelled as positive
                return Prompt(points=[(p, True) for p in _sample(band & ~gt, self.rng, 2)])
            fn, fp = error_regions(gt, pred)
            return Prompt(points=[(p, bool(gt[p])) for p in _sample(fn | fp, self.rng, 5)])
        pts = _sample(band, self.rng, 5)
        return Prompt(points=[(p, bool(gt[p]) != wrong) for p in pts])
