"""Training windows as MONAI-style dictionary transforms: spatial deformation and label-map synthesis.

Every transform works on one model window (torch tensors shaped (1, S, S, S)) and draws its randomness from its
own `self.R` (MONAI's `Randomizable`), so `Compose.set_random_state(seed)` makes a sample reproducible.

- `RandWindowDeformd`: crops a window of the model grid at a given start, through one `grid_sample` that also
  applies a random affine (rotation, scaling) and a smooth elastic displacement (a coarse random field,
  upsampled). The image is padded with its minimum outside the volume, as the engine pads its windows. A zoom
  (`data["zoom"]` > 1) makes the window cover zoom x S voxels about the same centre, as the engine's AutoZoom
  sees a large structure on a coarser grid.
- `SynthesizeFromLabelsd`: SynthSeg-style images from a label map alone: a random intensity (mean and spread)
  per label, a smooth multiplicative bias field, blur, a random acquisition resolution (down- then up-sampled),
  gamma and noise. A few real label maps thus give unlimited images of unseen contrasts.
- `body_tissue_labels`: the unlabelled voxels of a body split into tissues of their own (fat and soft tissue by
  HU in a CT; a body around the organs of a label map alone), so that a synthesised body is not its air.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from scipy import ndimage


def _rotation(angles: np.ndarray) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


class RandWindowDeformd(Randomizable, MapTransform):
    """Volume (1, X, Y, Z) -> window (1, S, S, S) starting at `data[start_key]`, randomly rotated, scaled, warped.

    `image_keys` are resampled bilinearly and padded with their minimum; `label_keys` by nearest neighbour and
    padded with 0. With probability `1 - prob` (or all ranges zero) the window is a plain crop.
    """

    def __init__(
        self,
        image_keys: KeysCollection = ("image",),
        label_keys: KeysCollection = ("label",),
        size: int = 128,
        start_key: str = "start",
        prob: float = 0.8,
        rotate_deg: float = 15.0,
        scale: float = 0.15,
        elastic_voxels: float = 3.0,
        elastic_grid: int = 5,
        flip_prob: float = 0.0,
        zoom_key: str = "zoom",
    ) -> None:
        MapTransform.__init__(self, list(image_keys) + list(label_keys), allow_missing_keys=True)
        self.image_keys, self.label_keys = tuple(image_keys), tuple(label_keys)
        self.size, self.start_key, self.prob = size, start_key, prob
        self.rotate_deg, self.scale = rotate_deg, scale
        self.elastic_voxels, self.elastic_grid = elastic_voxels, elastic_grid
        self.flip_prob = flip_prob
        self.zoom_key = zoom_key

    def randomize(self, data=None) -> None:
        self._do = self.R.rand() < self.prob
        self._angles = np.deg2rad(self.R.uniform(-self.rotate_deg, self.rotate_deg, 3))
        self._scales = self.R.uniform(1 - self.scale, 1 + self.scale, 3)
        g = self.elastic_grid
        self._field = self.R.normal(0.0, 1.0, (3, g, g, g)) * self.elastic_voxels * self.R.rand()
        self._flips = self.R.rand(3) < self.flip_prob

    def _grid(self, shape: tuple[int, ...], start: np.ndarray, zoom: float = 1.0) -> torch.Tensor:
        """Sampling grid (1, S, S, S, 3) in grid_sample's normalised (x=last axis) convention."""
        s = self.size
        idx = torch.arange(s, dtype=torch.float32)
        mesh = torch.stack(torch.meshgrid(idx, idx, idx, indexing="ij"), -1)  # (S, S, S, 3) window indices
        if self._do or zoom != 1.0:
            c = (s - 1) / 2
            m = _rotation(self._angles) @ np.diag(1.0 / self._scales) if self._do else np.eye(3)
            mesh = (mesh - c) @ torch.as_tensor(m * zoom, dtype=torch.float32).T + c
        if self._do:
            disp = F.interpolate(
                torch.as_tensor(self._field, dtype=torch.float32)[None],
                size=(s, s, s),
                mode="trilinear",
                align_corners=True,
            )[0]
            mesh = mesh + disp.permute(1, 2, 3, 0) * zoom
        for ax in range(3):
            if self._flips[ax]:
                mesh[..., ax] = mesh.flip(ax)[..., ax]
        coords = mesh + torch.as_tensor(start, dtype=torch.float32)
        n = torch.as_tensor(shape, dtype=torch.float32)
        norm = (2 * coords + 1) / n - 1  # align_corners=False
        return norm.flip(-1)[None]

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        ref = d[self.image_keys[0]] if self.image_keys[0] in d else d[self.label_keys[0]]
        shape = tuple(ref.shape[1:])
        grid = self._grid(shape, np.asarray(d[self.start_key], dtype=np.float64), float(d.get(self.zoom_key, 1.0)))
        for key in self.image_keys:
            if key in d:
                vol = torch.as_tensor(d[key], dtype=torch.float32)
                low = vol.min()
                out = F.grid_sample((vol - low)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
                d[key] = out[0] + low
        for key in self.label_keys:
            if key in d:
                lab = torch.as_tensor(d[key])
                out = F.grid_sample(lab[None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
                d[key] = out[0].round().to(torch.int32)
        return d


class SynthesizeFromLabelsd(Randomizable, MapTransform):
    """Replace `image_key` by an image synthesised from the label map `label_key` (both (1, S, S, S)), with `prob`.

    Intensities lie roughly in [0, 1]; with `background_zero_prob` label 0 is exactly 0 (a skull-stripped MR).
    `data["synthetic"]` records whether the image was synthesised.
    """

    def __init__(
        self,
        label_key: str = "label",
        image_key: str = "image",
        prob: float = 0.5,
        max_label: int = 256,
        std_range: tuple[float, float] = (0.0, 0.08),
        bias_strength: float = 0.4,
        bias_grid: int = 4,
        blur_sigma: tuple[float, float] = (0.0, 1.0),
        resolution_factor: tuple[float, float] = (1.0, 3.0),
        noise_std: tuple[float, float] = (0.0, 0.05),
        gamma_log_std: float = 0.3,
        background_zero_prob: float = 0.4,
    ) -> None:
        MapTransform.__init__(self, [label_key, image_key], allow_missing_keys=True)
        self.label_key, self.image_key, self.prob, self.max_label = label_key, image_key, prob, max_label
        self.std_range, self.bias_strength, self.bias_grid = std_range, bias_strength, bias_grid
        self.blur_sigma, self.resolution_factor, self.noise_std = blur_sigma, resolution_factor, noise_std
        self.gamma_log_std, self.background_zero_prob = gamma_log_std, background_zero_prob

    def randomize(self, data=None) -> None:
        self._do = self.R.rand() < self.prob
        if not self._do:
            return
        n = self.max_label + 1
        self._means = self.R.uniform(0.0, 1.0, n)
        self._stds = self.R.uniform(*self.std_range, n)
        if self.R.rand() < self.background_zero_prob:
            self._means[0], self._stds[0] = 0.0, 0.0
        self._bias = self.R.normal(0.0, self.bias_strength * self.R.rand(), (self.bias_grid,) * 3)
        self._sigma = self.R.uniform(*self.blur_sigma)
        self._factor = self.R.uniform(*self.resolution_factor, 3) if self.R.rand() < 0.5 else np.ones(3)
        self._noise = self.R.uniform(*self.noise_std)
        self._gamma = float(np.exp(self.R.normal(0.0, self.gamma_log_std)))
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        d["synthetic"] = bool(self._do)
        if not self._do:
            return d
        lab = torch.as_tensor(d[self.label_key]).long().clamp(0, self.max_label)
        gen = torch.Generator().manual_seed(self._seed)
        means = torch.as_tensor(self._means, dtype=torch.float32)
        stds = torch.as_tensor(self._stds, dtype=torch.float32)
        img = means[lab] + stds[lab] * torch.randn(lab.shape, generator=gen)
        background = lab == 0 if self._means[0] == 0.0 else None
        shape = tuple(lab.shape[1:])
        img = img[None]  # (1, 1, S, S, S)
        if np.any(self._factor > 1.01):  # a coarser acquisition: average down, interpolate back
            low = tuple(max(2, int(round(s / f))) for s, f in zip(shape, self._factor))
            img = F.interpolate(F.adaptive_avg_pool3d(img, low), size=shape, mode="trilinear", align_corners=False)
        if self._sigma > 0.05:
            img = _gaussian_blur(img, self._sigma)
        bias = F.interpolate(
            torch.as_tensor(self._bias, dtype=torch.float32)[None, None],
            size=shape,
            mode="trilinear",
            align_corners=True,
        )
        img = img * torch.exp(bias)
        img = img.clamp_min(0)
        img = img / img.max().clamp_min(1e-6)
        img = img**self._gamma
        img = img + self._noise * torch.randn(img.shape, generator=gen)
        img = img[0]
        if background is not None:
            img = torch.where(background, torch.zeros_like(img), img.clamp_min(1e-3))
        d[self.image_key] = img
        return d


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (1, 1, X, Y, Z), sigma in voxels, edges replicated."""
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    for ax in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + ax] = len(k)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - ax)] = pad[2 * (2 - ax) + 1] = r
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.view(shape))
    return x


FAT, SOFT_TISSUE = 254, 255  # the extra labels of `body_tissue_labels` (SynthesizeFromLabelsd's max_label is 256)


def body_tissue_labels(label: np.ndarray, image: np.ndarray | None, spacing, body_margin_mm: float = 30.0):
    """Label map (X, Y, Z) whose unlabelled body has labels of its own: FAT and SOFT_TISSUE by HU in a CT; for a
    label map alone, SOFT_TISSUE within `body_margin_mm` (in-plane) of any structure, holes filled, per slice.
    A label map of organs alone would otherwise synthesise organs floating in air."""
    out = np.array(label, dtype=np.int32, copy=True)
    free = out == 0
    if image is not None:
        out[free & (image >= -500) & (image < -30)] = FAT
        out[free & (image >= -30)] = SOFT_TISSUE
        return out
    for z in range(out.shape[2]):
        organs = label[..., z] != 0
        if not organs.any():
            continue
        near = ndimage.distance_transform_edt(~organs, sampling=spacing[:2]) <= body_margin_mm
        out[..., z][ndimage.binary_fill_holes(near) & free[..., z]] = SOFT_TISSUE
    return out
