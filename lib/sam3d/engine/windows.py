"""Where the model's cubic window goes on the model grid, and where to look next when a mask reaches its edge."""

import numpy as np
import torch
from scipy import ndimage


def window_start(center: np.ndarray, size: int, volume_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Start of a window of `size` centred on `center`, kept inside the volume where the volume is larger.

    Along an axis shorter than the window, the volume is centred in it (the rest is padding).
    """
    start = []
    for c, n in zip(center, volume_shape):
        if n <= size:
            start.append(-((size - n) // 2))
        else:
            start.append(int(np.clip(int(round(float(c))) - size // 2, 0, n - size)))
    return tuple(start)


def contains(start: tuple[int, ...], size: int, points: np.ndarray, margin: float) -> bool:
    """True when every point lies at least `margin` voxels inside the window."""
    if len(points) == 0:
        return True
    lo = np.asarray(start) + margin
    hi = np.asarray(start) + size - 1 - margin
    return bool(np.all((points >= lo) & (points <= hi)))


def touched_faces(mask: torch.Tensor, start: tuple[int, ...], volume_shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Faces (axis, -1 | +1) of the window where the mask reaches the edge and the volume goes on beyond it."""
    size = mask.shape[0]
    faces = []
    for axis in range(3):
        for side in (-1, 1):
            inside = start[axis] > 0 if side < 0 else start[axis] + size < volume_shape[axis]
            edge = mask.select(axis, 0 if side < 0 else size - 1)
            if inside and bool(edge.any()):
                faces.append((axis, side))
    return faces


def changed_faces(
    before: torch.Tensor,
    after: torch.Tensor,
    start: tuple[int, ...],
    volume_shape: tuple[int, ...],
    tolerance: float = 0.1,
) -> list[tuple[int, int]]:
    """Faces where a correction moved the mask's edge: either mask reaches the face and more than `tolerance` of
    their union there changed. Only across these does the neighbour's earlier answer need another look."""
    size = after.shape[0]
    faces = []
    touched = set(touched_faces(before, start, volume_shape)) | set(touched_faces(after, start, volume_shape))
    for face in sorted(touched):
        axis, side = face
        old, new = (m.select(axis, 0 if side < 0 else size - 1) for m in (before, after))
        if int((old ^ new).sum()) > tolerance * int((old | new).sum()):
            faces.append(face)
    return faces


def neighbour_start(start: tuple[int, ...], face: tuple[int, int], size: int, volume_shape: tuple[int, ...]):
    """The window half a window further across `face`, kept inside the volume."""
    axis, side = face
    s = list(start)
    s[axis] = int(np.clip(s[axis] + side * (size // 2), 0, max(volume_shape[axis] - size, 0)))
    return tuple(s)


def interior_point(mask: np.ndarray) -> np.ndarray | None:
    """The voxel deepest inside the mask (distance-transform maximum), or None for an empty mask."""
    if not mask.any():
        return None
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    return np.array(np.unravel_index(int(np.argmax(dist)), mask.shape), dtype=np.float64)


def overlap(start: tuple, size: int, shape: tuple) -> tuple[tuple, tuple]:
    """Slices of a window at `start` (in the window) and of the volume where the two overlap."""
    in_window, in_volume = [], []
    for s, n in zip(start, shape):
        a, b = max(s, 0), min(s + size, n)
        in_volume.append(slice(a, b))
        in_window.append(slice(a - s, b - s))
    return tuple(in_window), tuple(in_volume)


def crop(volume: torch.Tensor, start: tuple, size: int, fill: float) -> torch.Tensor:
    """The (size,)*3 window of `volume` at `start`, `fill` where it reaches outside the volume."""
    out = torch.full((size,) * 3, fill, dtype=volume.dtype)
    in_window, in_volume = overlap(start, size, volume.shape)
    out[in_window] = volume[in_volume]
    return out
