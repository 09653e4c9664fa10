"""Training samples: model windows around structures (or at random) of real volumes, augmented or synthesised.

Volumes come from a case folder (`sam3d.data.cases`, as `../shared/data/`), a MONAI Label local datastore
(`DIR/*.nii.gz` with labels in `DIR/labels/final/<same name>`), label maps without an image (every image of
theirs is synthesised) and generated scenes of shapes (`sam3d.data.shapes`). Each volume is put on the model grid
once, by the engine's own `ImageSession` (RAS, the model spacing, bilinear), its label map the same way (nearest).

`WindowDataset[i]` is a function of (seed, i) alone: the same index gives the same sample in any process, worker
or resumed run. A sample is one binary target in one window:

    {"image": (1, S, S, S) float32, normalised as the engine normalises its windows,
     "label": (1, S, S, S) float32 0/1, "seed": int (the clicks' seed), "index": int,
     "case": str, "target": str (label values), "zoom": float (window voxels per model voxel), "synthetic": bool,
     "click": (3,) int64, the first click when the sample fixes it (a click on air), else -1s}

With `background_prob`, a training sample is a click on air (outside the body or head) whose answer is an empty
mask: the only way a network that always answers "the object at the click" learns that air is no object. Air is
below -500 HU in a real CT, and label 0 of a volume that `background_cases` names (a label map whose 0 is the
outside of the head; a skull-stripped image, where label 0 is also at the image's minimum).
"""

import fnmatch
import glob
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from scipy import ndimage
from torch.utils.data import Dataset

from ..engine.image_session import ImageSession, load_image, looks_like_hounsfield, to_model_grid
from ..engine.interactive import EngineConfig, normalize_window
from ..engine.windows import window_start
from .cases import find_cases
from .clicks import derive_seed
from .shapes import shape_label_map
from .synthesis import RandWindowDeformd, SynthesizeFromLabelsd

logger = logging.getLogger(__name__)


@dataclass
class Volume:
    """One labelled volume on the model grid, with an index of its labelled voxels per label value."""

    name: str
    image: torch.Tensor | None  # (1, X, Y, Z) float32; None: a label map alone, every image is synthesised
    label: torch.Tensor  # (1, X, Y, Z) int32
    values: np.ndarray = field(default=None)  # label values with at least min_voxels voxels
    _flat: np.ndarray = field(default=None, repr=False)
    _bounds: dict = field(default_factory=dict, repr=False)
    _box: tuple = field(default=None, repr=False)

    @cached_property
    def hounsfield(self) -> bool:
        """A real CT in HU: its unsynthesised windows get the model's CT window, as at inference."""
        return self.image is not None and looks_like_hounsfield(self.image)

    def index(self, min_voxels: int) -> None:
        lab = self.label[0].numpy()
        flat = np.flatnonzero(lab)
        vals = lab.reshape(-1)[flat]
        order = np.argsort(vals, kind="stable")
        self._flat, vals = flat[order], vals[order]
        uniq, starts, counts = np.unique(vals, return_index=True, return_counts=True)
        self._bounds = {int(v): (int(s), int(s + c)) for v, s, c in zip(uniq, starts, counts)}
        self.values = np.array([int(v) for v, c in zip(uniq, counts) if c >= min_voxels], dtype=np.int64)
        idx = np.array(np.unravel_index(flat, lab.shape), dtype=np.float64) if len(flat) else np.zeros((3, 1))
        self._box = (idx.min(1), idx.max(1))

    def random_voxel(self, value: int, rng: np.random.Generator) -> np.ndarray:
        lo, hi = self._bounds[int(value)]
        flat = self._flat[lo + int(rng.integers(hi - lo))]
        return np.array(np.unravel_index(flat, self.label.shape[1:]), dtype=np.float64)

    def box(self, value: int) -> tuple[np.ndarray, np.ndarray]:
        """Inclusive index box of one label value."""
        lo, hi = self._bounds[int(value)]
        idx = np.array(np.unravel_index(self._flat[lo:hi], self.label.shape[1:]))
        return idx.min(1).astype(np.float64), idx.max(1).astype(np.float64)

    def voxels(self, values: np.ndarray) -> np.ndarray:
        """Voxel count of each label value."""
        return np.array([self._bounds[int(v)][1] - self._bounds[int(v)][0] for v in values], dtype=np.float64)

    def foreground_box(self) -> tuple[np.ndarray, np.ndarray]:
        """Inclusive index box of the labelled voxels."""
        return self._box


def list_sources(data: dict) -> list[tuple[str, str | None, str]]:
    """(name, image path or None, label path) for the training volumes a recipe's `data` section names.

    Keys: `dir` (a case folder, optionally filtered by `cases` and `exclude`), `datastore` (a MONAI Label
    local datastore; its labelled images) and `label_maps` (`{name: glob}`: label maps without images, named
    `<name>_<file stem>`).
    """
    out = [(name, None, path) for name, path in label_map_sources(data.get("label_maps"))]
    if data.get("dir"):
        include, exclude = data.get("cases"), set(data.get("exclude") or [])
        for case in find_cases(data["dir"]):
            if (include and case.name not in include) or case.name in exclude:
                continue
            out.append((case.name, str(case.image), str(case.label)))
        if include:
            missing = set(include) - {n for n, _, _ in out}
            if missing:
                raise FileNotFoundError(f"cases {sorted(missing)} not found in {data['dir']}")
    if data.get("datastore"):
        root = Path(data["datastore"])
        for image in sorted(root.glob("*.nii*")):
            label = root / "labels" / "final" / image.name
            if label.is_file():
                out.append((image.name.split(".")[0], str(image), str(label)))
    if not out:
        raise FileNotFoundError(f"no training volumes in {data}")
    return out


def label_map_sources(label_maps: dict | None) -> list[tuple[str, str]]:
    """(name, path) of every file a `label_maps` section (`{prefix: glob}`) matches, named `<prefix>_<file stem>`."""
    out = []
    for prefix, pattern in (label_maps or {}).items():
        files = sorted(glob.glob(str(pattern)))
        if not files:
            raise FileNotFoundError(f"label_maps.{prefix}: no file matches {pattern}")
        out += [(f"{prefix}_{Path(f).name.split('.')[0]}", f) for f in files]
    return out


def load_volume(name: str, image_path: str | None, label_path: str, spacing) -> Volume:
    """Image and label map on the model grid, exactly as the engine resamples images (labels by nearest).

    Without an image path, the label map alone (its images are synthesised)."""
    lab = to_model_grid(load_image(label_path).float(), spacing, mode="nearest").as_tensor()[0]
    if image_path is None:
        return Volume(name, None, lab.round().to(torch.int32)[None].contiguous())
    sess = ImageSession(image_path, tuple(spacing), max_voxels=400_000_000)
    image = sess.volume
    if tuple(lab.shape) != tuple(image.shape):  # rounding of the output grid: crop/pad the label to the image
        fixed = torch.zeros(image.shape)
        sl = tuple(slice(0, min(a, b)) for a, b in zip(image.shape, lab.shape))
        fixed[sl] = lab[sl]
        lab = fixed
    return Volume(name, image[None].contiguous(), lab.round().to(torch.int32)[None].contiguous())


def shape_volumes(count: int, size: int, seed: int = 0) -> list[Volume]:
    """`count` generated scenes of shapes (`sam3d.data.shapes`), named `shapes_<i>`, the same for a seed."""
    return [
        Volume(
            f"shapes_{i}",
            None,
            torch.from_numpy(shape_label_map(size, np.random.default_rng(derive_seed(seed, "shapes", i))))[
                None
            ].contiguous(),
        )
        for i in range(int(count))
    ]


def load_volumes(data: dict, spacing, seed: int = 0) -> list[Volume]:
    """Every training volume of a recipe's `data` section (`list_sources`, plus `shapes: {count, size}`)."""
    volumes = [load_volume(*s, spacing) for s in list_sources(data)] if _has_files(data) else []
    if data.get("shapes"):
        volumes += shape_volumes(int(data["shapes"].get("count", 16)), int(data["shapes"].get("size", 96)), seed)
    if not volumes:
        raise FileNotFoundError(f"no training volumes in {data}")
    return volumes


def _has_files(data: dict) -> bool:
    return any(data.get(k) for k in ("dir", "datastore", "label_maps"))


@dataclass
class SamplingConfig:
    size: int = 128
    min_voxels: int = 64  # smallest target (voxels on the model grid, in the window)
    random_window_prob: float = 0.25  # windows anywhere in the labelled part, else centred near a structure
    jitter: float = 0.2  # a structure's window centre moves by up to this fraction of the window
    merge_prob: float = 0.1  # the target joins its touching neighbours' labels
    synth_prob: float = 0.5
    deform_prob: float = 0.8
    rotate_deg: float = 15.0
    scale: float = 0.15
    elastic_voxels: float = 3.0
    flip_prob: float = 0.0
    intensity_aug_prob: float = 0.5
    case_weights: dict | None = None  # {name or glob pattern: weight}, first match wins; else 1
    thin_prob: float = 0.0  # samples cut to a slab of 1..thin_slices slices (last axis): scans of a few slices
    thin_slices: int = 4
    targets: dict | None = None  # {case: [label values]}: that case's only targets and merge partners (else all)
    size_power: float = 0.0  # a structure is chosen with probability ~ voxels^size_power (0: every label alike)
    zoom_prob: float = 0.0  # a structure larger than the window is seen whole, on a grid up to zoom_max times coarser
    zoom_max: float = 4.0
    zoom_fill: tuple = (0.5, 1.0)  # the fraction of the zoomed window its largest side then fills
    zoom_choices: tuple = ()  # each structure's window on one of these grids (multiples of the spacing), at random
    background_prob: float = 0.0  # samples that click on air and expect an empty mask (see the module's docstring)
    background_cases: tuple = ()  # names or globs of volumes whose label 0 is air; a real CT's air is found by HU
    background_margin_mm: float = 6.0  # the click on air is at least this far from anything that is not air

    @classmethod
    def from_dict(cls, d: dict | None) -> "SamplingConfig":
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        bad = set(d) - known
        if bad:
            raise ValueError(f"unknown sampling settings {sorted(bad)}; known: {sorted(known)}")
        return cls(**d)


def _matches(name: str, pattern: str) -> bool:
    """A volume's name against a recipe's name or glob (`synthseg_*`)."""
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def _case_weight(weights: dict | None, name: str) -> float:
    for pattern, w in (weights or {}).items():
        if _matches(name, pattern):
            return float(w)
    return 1.0


def thin_slab(mask: np.ndarray, most: int, rng: np.random.Generator) -> slice:
    """1..`most` consecutive slices (last axis) through a random slice of `mask`'s target."""
    zs = np.flatnonzero(mask.any(axis=(0, 1)))
    thick = int(rng.integers(1, most + 1))
    z0 = int(np.clip(int(rng.choice(zs)) - thick // 2, 0, max(mask.shape[-1] - thick, 0)))
    return slice(z0, z0 + thick)


def as_thin_scan(image, mask: np.ndarray, most: int, rng: np.random.Generator):
    """A window as the engine shows a scan of a few slices: the slab through the target, centred along the last
    axis (as `window_start` centres a short axis), the volume's minimum around it; the target only in the slab."""
    z = thin_slab(mask, most, rng)
    size, thick = mask.shape[-1], z.stop - z.start
    at = slice((size - thick) // 2, (size - thick) // 2 + thick)
    out = torch.full_like(torch.as_tensor(image), float(image.min()))
    out[..., at] = torch.as_tensor(image)[..., z]
    thin = np.zeros_like(mask)
    thin[..., at] = mask[..., z]
    return out, thin


def _plain(x) -> torch.Tensor:
    """A plain float32 tensor: MONAI's MetaTensor would route every op of the network through its metadata code."""
    if isinstance(x, MetaTensor):
        x = x.as_tensor()
    return torch.as_tensor(x, dtype=torch.float32)


class WindowDataset(Dataset):
    """`length` deterministic samples (index -> sample) from the volumes; see the module's docstring."""

    def __init__(
        self,
        volumes: list[Volume],
        engine_config: EngineConfig,
        sampling: SamplingConfig,
        seed: int = 0,
        length: int = 10**9,
        augment: bool = True,
    ) -> None:
        self.volumes, self.engine_config, self.cfg = volumes, engine_config, sampling
        self.seed, self.length, self.augment = int(seed), int(length), augment
        for v in volumes:
            if v.values is None:
                v.index(sampling.min_voxels)
        # case -> the label values it may target (absent: all); the volume's own index is narrowed too, so every
        # dataset over these volumes (training, validation, zoom-out) targets the same structures
        self.allowed = {}
        for case, values in (sampling.targets or {}).items():
            vol = next((v for v in volumes if v.name == case), None)
            if vol is None:
                raise ValueError(f"sampling.targets: no training volume {case!r}; volumes: {[v.name for v in volumes]}")
            allowed = np.array(sorted({int(x) for x in values}), dtype=np.int64)
            if not np.isin(allowed, vol.values).all():
                missing = sorted(set(allowed.tolist()) - set(vol.values.tolist()))
                raise ValueError(f"sampling.targets.{case}: values {missing} are absent or below min_voxels")
            vol.values = allowed
            self.allowed[case] = allowed
        weights = np.array([_case_weight(sampling.case_weights, v.name) for v in volumes], dtype=np.float64)
        self.weights = weights / weights.sum()
        c = sampling
        self.deform = RandWindowDeformd(
            size=c.size,
            prob=c.deform_prob if augment else 0.0,
            rotate_deg=c.rotate_deg,
            scale=c.scale,
            elastic_voxels=c.elastic_voxels,
            flip_prob=c.flip_prob if augment else 0.0,
        )
        self.synth = SynthesizeFromLabelsd(prob=c.synth_prob if augment else 0.0)
        self.synth_always = SynthesizeFromLabelsd(prob=1.0)  # label maps without an image
        p = c.intensity_aug_prob if augment else 0.0
        self.intensity = Compose(
            [
                RandScaleIntensityd("image", factors=0.1, prob=p),
                RandShiftIntensityd("image", offsets=0.1, prob=p),
                RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=p),
                RandGaussianSmoothd("image", sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), sigma_z=(0.25, 1.0), prob=p / 3),
                RandGaussianNoised("image", std=0.05, prob=p),
            ]
        )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(derive_seed(self.seed, "sample", int(index)))
        for _ in range(20):
            out = self._try(int(index), rng)
            if out is not None:
                return out
        raise RuntimeError(f"sample {index}: no target of {self.cfg.min_voxels}+ voxels in 20 windows")

    def _try(self, index: int, rng: np.random.Generator) -> dict | None:
        c, size = self.cfg, self.cfg.size
        vol = self.volumes[int(rng.choice(len(self.volumes), p=self.weights))]
        shape = vol.label.shape[1:]
        wanted, zoom = None, 1.0
        if len(vol.values) and rng.random() >= c.random_window_prob:
            if c.size_power:  # most labels of a scan are small: without this a large organ is a rare target
                weights = vol.voxels(vol.values) ** c.size_power
                wanted = int(rng.choice(vol.values, p=weights / weights.sum()))
            else:
                wanted = int(rng.choice(vol.values))
            center = vol.random_voxel(wanted, rng) + rng.uniform(-c.jitter, c.jitter, 3) * size
            if c.zoom_choices and self.augment:
                zoom = float(rng.choice(c.zoom_choices))
            elif c.zoom_prob and self.augment and rng.random() < c.zoom_prob:
                zoom, box_center = self._zoom_for(vol, wanted, rng)
                if zoom > 1.0:
                    center = box_center + rng.uniform(-c.jitter, c.jitter, 3) * size
        else:
            lo, hi = vol.foreground_box()
            center = rng.uniform(lo, hi + 1)
        start = window_start(center, size, shape)
        if zoom != 1.0:  # a zoomed window stays centred where it was aimed, even where a plain window would be clamped
            start = tuple(int(v) for v in np.round(center - (size - 1) / 2))
        d = {"label": vol.label, "start": start, "zoom": zoom}
        if vol.image is not None:  # a label map alone gets its image from the synthesis below
            d["image"] = vol.image
        sub_seed = int(rng.integers(2**31 - 1))
        self.deform.set_random_state(sub_seed)
        d = self.deform(d)
        lab = d["label"][0].numpy()
        if self.augment and c.background_prob and rng.random() < c.background_prob:
            click = self._air_click(vol, d, rng)
            if click is not None:
                return self._finish(
                    vol, d, np.zeros(lab.shape, dtype=bool), ["air"], index, start, zoom, sub_seed, rng, click=click
                )
        values, counts = np.unique(lab[lab != 0], return_counts=True)
        ok = values[counts >= c.min_voxels]
        if vol.name in self.allowed:
            ok = ok[np.isin(ok, self.allowed[vol.name])]
        if len(ok) == 0:
            return None
        target = wanted if wanted is not None and wanted in ok else int(rng.choice(ok))
        mask = lab == target
        chosen = [target]
        if rng.random() < c.merge_prob:
            ring = ndimage.binary_dilation(mask, iterations=2) & ~mask
            neighbours = [
                int(v)
                for v in np.unique(lab[ring])
                if v != 0 and v != target and (vol.name not in self.allowed or v in self.allowed[vol.name])
            ]
            if neighbours:
                extra = rng.choice(neighbours, size=int(rng.integers(1, min(3, len(neighbours)) + 1)), replace=False)
                chosen += [int(v) for v in extra]
                mask = np.isin(lab, chosen)
        return self._finish(vol, d, mask, chosen, index, start, zoom, sub_seed, rng)

    def _finish(self, vol, d, mask, chosen, index, start, zoom, sub_seed, rng, click=None) -> dict:
        """Synthesis, normalisation and intensity augmentation of a deformed window; the sample's dict. A click on
        air keeps a real image as it is: synthesised, a CT's air would look like the unlabelled body around it."""
        c = self.cfg
        synth = self.synth_always if vol.image is None else self.synth
        synth.set_random_state(sub_seed + 1)
        d = synth(d) if click is None or vol.image is None else {**d, "synthetic": False}
        if click is None and self.augment and rng.random() < c.thin_prob:
            d["image"], mask = as_thin_scan(d["image"], mask, c.thin_slices, rng)
        image = normalize_window(
            torch.as_tensor(d["image"][0], dtype=torch.float32),
            self._engine_cfg(d["synthetic"]),
            hounsfield=vol.hounsfield and not d["synthetic"],
        )
        d2 = {"image": image[None]}
        self.intensity.set_random_state(sub_seed + 2)
        d2 = self.intensity(d2)
        return {
            "image": _plain(d2["image"]).contiguous(),
            "label": torch.from_numpy(mask[None].astype(np.float32)),
            "seed": derive_seed(self.seed, "clicks", index),
            "index": index,
            "case": vol.name,
            "start": tuple(int(v) for v in start),  # window start on the model grid (before any deformation)
            "target": "+".join(str(v) for v in chosen),
            "zoom": zoom,
            "synthetic": bool(d["synthetic"]),
            "click": torch.tensor(click if click is not None else (-1, -1, -1), dtype=torch.int64),
        }

    def _air_click(self, vol: Volume, d: dict, rng: np.random.Generator) -> tuple[int, int, int] | None:
        """A voxel of the deformed window that is air, `background_margin_mm` deep into it; None when there is none."""
        lab = d["label"][0].numpy()
        named = any(_matches(vol.name, p) for p in self.cfg.background_cases)
        if vol.hounsfield:
            air = (lab == 0) & (np.asarray(d["image"][0]) < -500)
        elif named and vol.image is None:
            air = lab == 0
        elif named:
            img = np.asarray(d["image"][0])
            air = (lab == 0) & (img <= float(vol.image.min()) + 0.01 * float(vol.image.max() - vol.image.min()))
        else:
            return None
        deep = ndimage.distance_transform_edt(air, sampling=self.engine_config.spacing) >= self.cfg.background_margin_mm
        flat = np.flatnonzero(deep)
        if len(flat) == 0:
            return None
        return tuple(int(v) for v in np.unravel_index(int(flat[rng.integers(len(flat))]), deep.shape))

    def _zoom_for(self, vol: Volume, value: int, rng: np.random.Generator) -> tuple[float, np.ndarray]:
        """The zoom at which the structure's largest side fills a random `zoom_fill` fraction of the window (1 for a
        structure that already fits), and the centre of its box."""
        lo, hi = vol.box(value)
        fill = rng.uniform(*self.cfg.zoom_fill)
        zoom = float(np.clip((hi - lo + 1).max() / (fill * self.cfg.size), 1.0, self.cfg.zoom_max))
        return zoom, (lo + hi) / 2

    def _engine_cfg(self, synthetic: bool) -> EngineConfig:
        if not synthetic or self.engine_config.clip is None:
            return self.engine_config
        # a synthetic image is not in the modality's units: normalise it without the (e.g. HU) clip
        cfg = EngineConfig(**{**self.engine_config.__dict__})
        cfg.clip = None
        return cfg
