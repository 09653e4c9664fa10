"""Synthetic label maps of generic shapes, so that a click model learns "the object at the click and its boundary"
rather than a handful of organs: smooth blobs, tubes and branching vessels, thin sheets, hollow shells, small
lesions inside larger structures, and objects that touch. Images are rendered from them like from any label map
(`sam3d.data.synthesis.SynthesizeFromLabelsd`: random contrast, bias, blur, resolution and noise).

`shape_label_map(size, rng)` -> (size, size, size) int32, 0 the background, 1 a large "body" around the objects,
2.. one value per object (a later object overwrites an earlier one where they meet, so objects touch).
"""

import numpy as np
from scipy import ndimage


def _smooth_noise(size: int, rng: np.random.Generator, grid: int = 5) -> np.ndarray:
    """A smooth random field in about [-1, 1] (a coarse Gaussian grid, upsampled)."""
    coarse = rng.normal(0.0, 1.0, (grid,) * 3)
    return ndimage.zoom(coarse, size / grid, order=3, mode="nearest")[:size, :size, :size] / 2


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _coords(size: int) -> np.ndarray:
    axis = np.arange(size, dtype=np.float32)
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1)


def blob(size: int, rng: np.random.Generator, center=None, radius=(4.0, 22.0), wobble: float = 0.35) -> np.ndarray:
    """A smooth ellipsoid with a bumpy surface."""
    c = rng.uniform(0.2 * size, 0.8 * size, 3) if center is None else np.asarray(center, dtype=np.float64)
    radii = rng.uniform(*radius, 3)
    local = (_coords(size) - c) @ _random_rotation(rng)
    q = np.sqrt(((local / radii) ** 2).sum(-1))
    return q < 1 + wobble * rng.uniform(0.2, 1.0) * _smooth_noise(size, rng)


def _curve(size: int, rng: np.random.Generator, start, steps: int) -> np.ndarray:
    """A smooth random walk with momentum (steps x 3), kept inside the volume."""
    pos, direction = np.asarray(start, dtype=np.float64), rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    out = []
    for _ in range(steps):
        direction = direction + rng.normal(0.0, 0.25, 3)
        direction /= np.linalg.norm(direction)
        pos = np.clip(pos + direction, 1, size - 2)
        out.append(pos.copy())
    return np.array(out)


def tube(size: int, rng: np.random.Generator, branches: int = 0) -> np.ndarray:
    """A tube of random radius along a smooth curve, with `branches` side branches (a vessel tree)."""
    path = _curve(size, rng, rng.uniform(0.2 * size, 0.8 * size, 3), int(rng.integers(size // 2, 2 * size)))
    paths = [path]
    for _ in range(branches):
        paths.append(_curve(size, rng, path[int(rng.integers(len(path)))], int(rng.integers(size // 4, size))))
    centre = np.zeros((size,) * 3, dtype=bool)
    for p in paths:
        idx = np.clip(np.rint(p).astype(int), 0, size - 1)
        centre[idx[:, 0], idx[:, 1], idx[:, 2]] = True
    return ndimage.distance_transform_edt(~centre) < rng.uniform(1.2, 4.0)


def sheet(size: int, rng: np.random.Generator) -> np.ndarray:
    """A thin curved sheet (1-3 voxels thick) over a disk-like patch."""
    local = (_coords(size) - size / 2) @ _random_rotation(rng)
    height = 0.15 * size * _smooth_noise(size, rng, 3)
    thick = rng.uniform(0.6, 1.6)
    extent = np.sqrt(local[..., 0] ** 2 + local[..., 1] ** 2) < rng.uniform(0.2, 0.45) * size
    return (np.abs(local[..., 2] - height) < thick) & extent


def shell(size: int, rng: np.random.Generator) -> np.ndarray:
    """A hollow blob: its wall only, 2-4 voxels thick."""
    solid = blob(size, rng, radius=(8.0, 22.0))
    return solid & ~ndimage.binary_erosion(solid, iterations=int(rng.integers(2, 5)))


SHAPES = ("blob", "tube", "vessels", "sheet", "shell")


def shape_label_map(size: int, rng: np.random.Generator, objects=(3, 8)) -> np.ndarray:
    """A random scene of touching objects in a body, with small lesions inside some of them; see the docstring."""
    lab = blob(size, rng, center=(size / 2,) * 3, radius=(0.35 * size, 0.55 * size), wobble=0.2).astype(np.int32)
    value = 2
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        if kind == "blob":
            mask = blob(size, rng)
        elif kind in ("tube", "vessels"):
            mask = tube(size, rng, branches=0 if kind == "tube" else int(rng.integers(1, 4)))
        elif kind == "sheet":
            mask = sheet(size, rng)
        else:
            mask = shell(size, rng)
        if mask.sum() < 30:
            continue
        lab[mask] = value
        if kind in ("blob", "shell") and rng.random() < 0.5:  # a lesion inside the structure
            inside = np.argwhere(mask)
            centre = inside[int(rng.integers(len(inside)))]
            lesion = blob(size, rng, center=centre, radius=(1.5, 5.0)) & ndimage.binary_dilation(mask, iterations=2)
            if lesion.sum() >= 8:
                value += 1
                lab[lesion] = value
        value += 1
    return lab
