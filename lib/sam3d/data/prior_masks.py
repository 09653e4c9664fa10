"""Simulated previous answers: the reference mask, a little wrong, as a click model sees it when a user corrects a
good mask (an automatic result given as `prior`, or an answer from an earlier click).

A network trained only on its own early answers never sees a nearly right mask and learns to redraw whatever it
is given (clicknet did: with the reference given as the previous mask and one click at the centre, the liver's
Dice fell to 0.79). Shown such masks, it learns to keep them and change them where a click says so.

`perturbed_mask(gt, rng)` applies one or two of: erosion or dilation by 1-2 voxels, a cut along a random plane
(the part of an object that an earlier window did not reach), a shift by up to 2 voxels, and nothing (a right mask
stays right).
"""

import numpy as np
from scipy import ndimage


def _grow(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    k = int(rng.integers(1, 3))
    if rng.random() < 0.5:
        return ndimage.binary_erosion(mask, iterations=k)
    return ndimage.binary_dilation(mask, iterations=k)


def _cut(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep the part of the mask on one side of a random plane that leaves 50-90 % of it."""
    idx = np.argwhere(mask)
    normal = rng.normal(size=3)
    normal /= np.linalg.norm(normal)
    proj = idx @ normal
    threshold = np.quantile(proj, 1 - rng.uniform(0.5, 0.9))
    out = np.zeros_like(mask)
    keep = idx[proj >= threshold]
    out[tuple(keep.T)] = True
    return out


def _shift(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    offset = rng.integers(-2, 3, size=3)
    return ndimage.shift(mask.astype(np.uint8), offset, order=0, mode="constant", cval=0).astype(bool)


def _keep(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return mask.copy()


PERTURBATIONS = (_grow, _cut, _shift, _keep)


def perturbed_mask(gt: np.ndarray, rng: np.random.Generator, may_keep: bool = True) -> np.ndarray:
    """A bool mask near `gt` (bool, any shape); never empty when `gt` is not (an emptied mask falls back to `gt`).
    `may_keep=False` (evaluation: a right mask leaves nothing to correct) always changes something."""
    gt = np.asarray(gt, dtype=bool)
    if not gt.any():
        return gt.copy()
    kinds = PERTURBATIONS if may_keep else PERTURBATIONS[:-1]
    out = gt
    for _ in range(int(rng.integers(1, 3))):
        out = kinds[int(rng.integers(len(kinds)))](out, rng)
        if not out.any():
            out = gt
    if not may_keep and np.array_equal(out, gt):
        return _cut(gt, rng) if gt.sum() > 1 else gt
    return out
