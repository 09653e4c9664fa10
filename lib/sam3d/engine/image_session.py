"""One image, loaded once: the model-grid volume (RAS, isotropic spacing) and the maps to and from its own grid."""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage, Orientation, Spacing, SpatialResample

from .errors import Sam3DInputError
from .windows import crop


@dataclass(frozen=True)
class ImageKey:
    """Identifies the image's content: a changed file gets a new session."""

    path: str
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: str) -> "ImageKey":
        p = Path(path)
        if not p.exists():
            raise Sam3DInputError(f"image not found: {path}")
        if p.is_dir():  # a DICOM series: the newest file stands for the folder
            stats = [f.stat() for f in p.iterdir() if f.is_file()]
            return cls(str(p.resolve()), max((s.st_mtime_ns for s in stats), default=0), sum(s.st_size for s in stats))
        st = p.stat()
        return cls(str(p.resolve()), st.st_mtime_ns, st.st_size)


def looks_like_hounsfield(volume: torch.Tensor) -> bool:
    """A CT in Hounsfield units: air (below -500) in at least 0.1 % of its voxels. MR, and the images training
    synthesises, have no such values."""
    return bool((volume < -500).float().mean() >= 1e-3)


def load_image(path: str | os.PathLike) -> MetaTensor:
    """(1, X, Y, Z) as `monai.transforms.LoadImage` gives it (ITK for a DICOM folder): the array clicks address."""
    path = str(path)
    reader = "ITKReader" if os.path.isdir(path) else None
    try:
        return LoadImage(image_only=True, ensure_channel_first=True, reader=reader)(path)
    except Exception as e:  # the readers raise many types; the user needs one message
        raise Sam3DInputError(f"cannot read image {os.path.basename(path)!r}: {e}") from e


def to_model_grid(img: MetaTensor, spacing, mode: str = "bilinear") -> MetaTensor:
    """RAS orientation and isotropic `spacing`: the grid the model sees (labels: mode="nearest")."""
    ras = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(img)
    return Spacing(pixdim=tuple(spacing), mode=mode)(ras)


def _translation(offset) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = offset
    return t


class ImageSession:
    """The image on the model's grid, and index maps between that grid and the image's own array.

    The image's own array is what `monai.transforms.LoadImage` returns, which is what Slicer's and OHIF's MONAI
    Label clients address with their click indices.
    """

    def __init__(self, path: str, spacing: tuple[float, float, float], max_voxels: int) -> None:
        img = load_image(path)
        if img.ndim != 4 or img.shape[0] != 1:
            raise Sam3DInputError(f"expected a single-channel 3D image, got array shape {tuple(img.shape)}")
        if min(img.shape[1:]) < 2:
            raise Sam3DInputError(f"image is 2D (shape {tuple(img.shape[1:])}); sam3d segments 3D volumes")
        self.shape = tuple(int(s) for s in img.shape[1:])
        self.affine = np.asarray(img.affine, dtype=np.float64)
        zooms = np.linalg.norm(self.affine[:3, :3], axis=0)
        model_voxels = int(np.prod([n * z / s for n, z, s in zip(self.shape, zooms, spacing)]))
        if max(np.prod(self.shape), model_voxels) > max_voxels:
            raise Sam3DInputError(
                f"image too large: {self.shape} voxels at {np.round(zooms, 3).tolist()} mm is "
                f"{model_voxels:,} voxels at the model spacing; the server's limit is {max_voxels:,}"
            )
        data = img.float()
        if not torch.isfinite(data).all():
            raise Sam3DInputError("image contains NaN or infinite values")
        resampled = to_model_grid(data, spacing)
        self.volume = resampled.as_tensor()[0].contiguous()  # (X, Y, Z), RAS, isotropic
        self.model_affine = np.asarray(resampled.affine, dtype=np.float64)
        self.to_model = np.linalg.inv(self.model_affine) @ self.affine  # image index -> model-grid index
        self.background = float(self.volume.min())
        self.hounsfield = looks_like_hounsfield(self.volume)  # a CT: the model's CT window applies
        self.nbytes = self.volume.element_size() * self.volume.nelement()

    def image_to_model(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) indices of the image array -> (N, 3) float indices of the model grid."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return pts @ self.to_model[:3, :3].T + self.to_model[:3, 3]

    def mask_to_model(self, mask: np.ndarray) -> torch.Tensor:
        """A mask on the image's grid -> its share of each model-grid voxel (float32 in [0, 1], trilinear)."""
        if tuple(mask.shape) != self.shape:
            raise Sam3DInputError(f"mask of shape {list(mask.shape)} does not match the image's {list(self.shape)}")
        src = MetaTensor(torch.as_tensor(np.asarray(mask, dtype=np.float32))[None], affine=torch.as_tensor(self.affine))
        out = SpatialResample(mode="bilinear", padding_mode="zeros", align_corners=False)(
            src, dst_affine=torch.as_tensor(self.model_affine), spatial_size=tuple(self.volume.shape)
        )
        return out.as_tensor()[0].clamp(0, 1)

    def crop(self, start: tuple[int, int, int], size: int) -> torch.Tensor:
        """(size,)*3 window of the model-grid volume at `start`, padded with the image's minimum outside it."""
        return crop(self.volume, start, size, self.background)

    def to_image_grid(
        self, logits: torch.Tensor, logits_start: np.ndarray, box_start: np.ndarray, box_stop: np.ndarray
    ) -> np.ndarray:
        """Logits on part of the model grid (starting at model index `logits_start`) -> binary mask on the image grid.

        Only the image-grid box [box_start, box_stop) is resampled (the rest is background), because the
        windows cover a small part of a large scan.
        """
        mask = np.zeros(self.shape, dtype=np.uint8)
        size = tuple(int(b - a) for a, b in zip(box_start, box_stop))
        if min(size) <= 0:
            return mask
        src = MetaTensor(logits[None].float(), affine=torch.as_tensor(self.model_affine @ _translation(logits_start)))
        out = SpatialResample(mode="bilinear", padding_mode="border", align_corners=False)(
            src, dst_affine=torch.as_tensor(self.affine @ _translation(box_start)), spatial_size=size
        )
        sl = tuple(slice(int(a), int(b)) for a, b in zip(box_start, box_stop))
        mask[sl] = (out.as_tensor()[0] > 0).numpy()
        return mask

    def model_box_to_image_box(self, start: np.ndarray, stop: np.ndarray, margin: int = 1) -> tuple:
        """Image-grid index box that covers the model-grid box [start, stop)."""
        corners = np.array(np.meshgrid(*zip(start, stop), indexing="ij")).reshape(3, -1).T
        to_image = np.linalg.inv(self.to_model)
        pts = corners @ to_image[:3, :3].T + to_image[:3, 3]
        lo = np.clip(np.floor(pts.min(0)) - margin, 0, self.shape).astype(int)
        hi = np.clip(np.ceil(pts.max(0)) + margin + 1, 0, self.shape).astype(int)
        return lo, hi
