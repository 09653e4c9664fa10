"""A baseline that needs no learned weights: scikit-image's random walker in a window around the prompts.

Given the clicks so far (and an optional box), on the image array `monai.transforms.LoadImage` returns:

1. Window: the bounding box of every click (and of the box) grown by `margin_mm` on each side (with a box:
   `box_margin_vox` voxels), clipped to the image. Everything outside it is background.
2. Intensities in the window are clipped to their [5, 95] percentiles, widened to include every clicked voxel's
   intensity with 10 % of that range to spare (a small structure can lie outside the percentiles), and scaled
   to [0, 1].
3. Seeds: each foreground click -> label 1 on the voxels of a ball of `seed_radius_mm` around it whose scaled
   intensity is within `seed_intensity_tol` of the clicked voxel's; each background click -> label 2 the same
   way (background balls are drawn after foreground ones, and every clicked voxel keeps its own label); the
   faces of the window that lie inside the image -> label 2 (the structure is assumed not to cross them; faces
   on the image's border stay unseeded, so a structure cut by the scan's edge is not penalised, unless no
   background seed would be left at all); with a box, every voxel of the window outside the box -> label 2,
   and when no foreground click exists yet the box's centre -> label 1 (as the engine does for click-only
   models).
4. `skimage.segmentation.random_walker(data, seeds, beta, mode="cg_j", tol, spacing=voxel spacing)`; label 1
   is the mask. Windows larger than `max_voxels` are subsampled by an integer stride and the answer upsampled
   by nearest neighbour.

Defaults (`RandomWalkerConfig`): margin 40 mm, seed balls of 6 mm within 0.1 of the click's intensity, beta
10000 (scikit-image divides it by 10 times the data's standard deviation; its default of 130 lets the
foreground leak away from single-voxel seeds), tol 1e-3, at most 2,000,000 voxels. They were chosen on
totalseg_ct and totalseg_mr (5 organs each, `center`, 10 clicks) among margins 30/40/60 mm, seed radii 0-10 mm
and beta 130-10000; single-voxel seeds gave Dice < 0.1. The baseline is memoryless: each click recomputes the
mask from all prompts so far.
"""

import math
import warnings
from dataclasses import dataclass

import numpy as np

from ..data.cases import load_array


@dataclass
class RandomWalkerConfig:
    margin_mm: float = 40.0
    box_margin_vox: int = 2
    seed_radius_mm: float = 6.0
    seed_intensity_tol: float = 0.1
    beta: float = 10000.0
    tol: float = 1e-3
    percentiles: tuple[float, float] = (5.0, 95.0)
    max_voxels: int = 2_000_000


class RandomWalkerSegmenter:
    """Segmenter (see `segmenters.Segmenter`) running the random walker; caches the last image it loaded."""

    name = "random_walker"

    def __init__(self, config: RandomWalkerConfig | None = None) -> None:
        self.config = config or RandomWalkerConfig()
        self._image: tuple[str, np.ndarray, tuple[float, float, float]] | None = None

    def describe(self) -> dict:
        c = self.config
        return {
            "method": "scikit-image random walker (no learned weights)",
            "parameters": f"window = clicks' bounding box + {c.margin_mm:g} mm; seeds: {c.seed_radius_mm:g} mm balls "
            f"within {c.seed_intensity_tol:g} of the click's intensity, window faces as background; beta {c.beta:g}, "
            f"mode cg_j, tol {c.tol:g}; intensities clipped to percentiles {list(c.percentiles)}",
        }

    def _load(self, image_path: str) -> tuple[np.ndarray, tuple[float, float, float]]:
        if self._image is None or self._image[0] != image_path:
            arr, affine = load_array(image_path)
            spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
            self._image = (image_path, np.squeeze(arr).astype(np.float32, copy=False), spacing)
        return self._image[1], self._image[2]

    def segment(self, image_path, foreground=None, background=None, roi=None, label: str = "") -> np.ndarray:
        image, spacing = self._load(str(image_path))
        return random_walker_segment(image, spacing, foreground, background, roi, self.config)


def random_walker_segment(
    image: np.ndarray, spacing, foreground=None, background=None, roi=None, config: RandomWalkerConfig | None = None
) -> np.ndarray:
    """The baseline's mask (uint8, the image's shape) for these prompts; see the module's docstring."""
    from skimage.segmentation import random_walker

    cfg = config or RandomWalkerConfig()
    shape = np.array(image.shape)
    fg = np.rint(np.asarray(foreground if foreground is not None else [], dtype=np.float64).reshape(-1, 3)).astype(int)
    bg = np.rint(np.asarray(background if background is not None else [], dtype=np.float64).reshape(-1, 3)).astype(int)
    box = None
    if roi is not None and len(roi):
        i0, j0, i1, j1, k0, k1 = (int(round(float(v))) for v in roi)
        box = np.array([[i0, j0, k0], [i1, j1, k1]])
    anchors = [p for p in (fg, bg, box) if p is not None and len(p)]
    if not anchors:
        raise ValueError("no prompt: give a click or a box")
    pts = np.concatenate(anchors)
    if box is not None:
        margin = np.full(3, cfg.box_margin_vox)
    else:
        margin = np.ceil(cfg.margin_mm / np.asarray(spacing, dtype=np.float64)).astype(int)
    lo = np.clip(pts.min(0) - margin, 0, shape - 1)
    hi = np.clip(pts.max(0) + margin, 0, shape - 1) + 1  # exclusive
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    window = image[sl].astype(np.float32)

    lo_i, hi_i = np.percentile(window, cfg.percentiles)
    clicked = [window[tuple(p - lo)] for p in (*fg, *bg) if np.all(p - lo >= 0) and np.all(p - lo < window.shape)]
    if clicked:  # a small structure may lie outside the percentiles: keep every clicked intensity in range
        pad = 0.1 * max(float(hi_i - lo_i), 1e-6)
        lo_i, hi_i = min(lo_i, min(clicked) - pad), max(hi_i, max(clicked) + pad)
    data = (np.clip(window, lo_i, hi_i) - lo_i) / max(float(hi_i - lo_i), 1e-6)

    seeds = np.zeros(window.shape, dtype=np.int32)
    for axis in range(3):  # faces inside the image: background
        if lo[axis] > 0:
            seeds[(slice(None),) * axis + (0,)] = 2
        if hi[axis] < shape[axis]:
            seeds[(slice(None),) * axis + (-1,)] = 2
    if box is not None:
        inside = np.zeros(window.shape, dtype=bool)
        blo, bhi = np.clip(box[0] - lo, 0, None), box[1] - lo + 1
        inside[blo[0] : bhi[0], blo[1] : bhi[1], blo[2] : bhi[2]] = True
        seeds[~inside] = 2
        if len(fg) == 0:
            fg = np.rint(box.mean(0)).astype(int)[None]
    fg_w = [p - lo for p in fg if np.all(p - lo >= 0) and np.all(p - lo < window.shape)]
    bg_w = [p - lo for p in bg if np.all(p - lo >= 0) and np.all(p - lo < window.shape)]
    for points, value in ((fg_w, 1), (bg_w, 2)):
        for q in points:
            _paint_ball(seeds, data, q, value, spacing, cfg.seed_radius_mm, cfg.seed_intensity_tol)
    for points, value in ((fg_w, 1), (bg_w, 2)):
        for q in points:
            seeds[tuple(q)] = value

    if not (seeds == 2).any():  # the window is the whole image and no click is negative: its faces are
        for axis in range(3):
            seeds[(slice(None),) * axis + (0,)] = 2
            seeds[(slice(None),) * axis + (-1,)] = 2
        for q in fg_w:
            seeds[tuple(q)] = 1
    out = np.zeros(image.shape, dtype=np.uint8)
    if not (seeds == 1).any():
        return out

    stride = max(1, math.ceil((window.size / cfg.max_voxels) ** (1 / 3)))
    if stride > 1:  # keep every seed: a strided grid would drop most clicks
        small_seeds = np.zeros(tuple(-(-n // stride) for n in window.shape), dtype=np.int32)
        for value in (2, 1):
            small_seeds[tuple((np.argwhere(seeds == value) // stride).T)] = value
        data, run_seeds = data[::stride, ::stride, ::stride], small_seeds
    else:
        run_seeds = seeds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "probability range outside [0, 1]" at this beta: labels still sound
        labels = random_walker(
            data, run_seeds, beta=cfg.beta, mode="cg_j", tol=cfg.tol, spacing=tuple(float(s) * stride for s in spacing)
        )
    mask = labels == 1
    if stride > 1:
        for axis in range(3):
            mask = np.repeat(mask, stride, axis=axis)
        mask = mask[: window.shape[0], : window.shape[1], : window.shape[2]]
    out[sl] = mask
    return out


def _paint_ball(seeds, data, q, value, spacing, radius_mm, tol) -> None:
    """seeds[v] = value for the voxels v within radius_mm of q whose data is within tol of data[q]."""
    sp = np.asarray(spacing, dtype=np.float64)
    r = np.floor(radius_mm / sp).astype(int)
    a, b = np.maximum(q - r, 0), np.minimum(q + r + 1, seeds.shape)
    sl = tuple(slice(int(x), int(y)) for x, y in zip(a, b))
    offsets = np.ogrid[tuple(slice(int(x - qq), int(y - qq)) for x, y, qq in zip(a, b, q))]
    ball = sum((o * s) ** 2 for o, s in zip(offsets, sp)) <= radius_mm**2
    close = np.abs(data[sl] - data[tuple(q)]) <= tol
    seeds[sl][ball & close] = value
