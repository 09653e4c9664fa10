"""The 3D automatic model's training step (`sam3d.models.AutoSeg3D`): windows of the volume, every class at once.

Samples (`AutoWindowDataset`): a window of `img_size`^3 voxels on the model grid with its class-index map, from
the volumes `sam3d.training.auto_step.class_volumes` prepares for the slice model too (the recipe's class names
looked up in each case's label names, the image normalised as the engine normalises the whole scan). The window is
centred on a random voxel of a random class of the volume (`foreground_windows`), else anywhere; where it leaves
the scan it holds the scan's minimum and background, as the engine pads the scan for its sliding windows. The
slice model's `SliceSampling` variations that mean something in 3D vary it: images synthesised from the tissue
labels (always for a label map alone), partial scans (the scan cut to a z-extent around the window's centre: the
rest of the window is padding), the z order reversed, contrast and noise, and an in-plane motion (`augment`).

Step (`AutoWindowStep`): Dice + CE over background + K classes on the whole window, as the slice step's
segmentation loss; the Dice it reports is the hard Dice over the classes present.

Recipe section (configs/train/autoseg3d_synth.yaml), the slice model's keys where they apply:

    auto:
      foreground_windows: 0.9   # share of windows centred on a class (else anywhere in the volume)
      augment: 0.5              # share of windows moved in-plane (rotation, scale, shift)
      synth_prob: 0.0           # and partial_prob, flip_slices_prob, intensity_prob, case_weights (`SliceSampling`)
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.transforms import RandAffined
from torch import nn
from torch.utils.data import Dataset

from ..data.clicks import derive_seed
from ..data.synthesis import SynthesizeFromLabelsd
from ..data.training import Volume, _plain
from ..engine.interactive import EngineConfig, normalize_window
from ..engine.windows import crop
from .auto_step import (
    SliceSampling,
    _dice,
    case_probabilities,
    class_volumes,
    intensity_transforms,
    partial_scan,
    vary_intensity,
)
from .names import case_names
from .step import TrainingStep

# the slice model's settings that have no meaning for windows: refused, not silently ignored
SLICE_ONLY = {"max_previous", "teacher_boxes", "box_loss_weight", "sam_checkpoint", "foreground_slices", "fov_prob"}


def _inside(start, size: int, shape) -> torch.Tensor:
    """(size, size, size) bool: the window's voxels that lie in a volume of `shape`."""
    axes = [(torch.arange(size) + a >= 0) & (torch.arange(size) + a < n) for a, n in zip(start, shape)]
    return axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]


class AutoWindowDataset(Dataset):
    """`length` deterministic samples: {"image", "label": (1, S, S, S), "seed", ...}; see the module doc."""

    def __init__(
        self,
        volumes: list[Volume],
        engine_config: EngineConfig,
        class_names: list[str],
        names: dict[str, dict[int, str]],
        size: int,
        seed: int = 0,
        foreground_windows: float = 0.9,
        augment: float = 0.0,
        length: int = 10**9,
        sampling: SliceSampling | None = None,
    ) -> None:
        self.size, self.seed, self.length, self.fg = int(size), int(seed), int(length), float(foreground_windows)
        self.cfg = sampling or SliceSampling()
        if self.cfg.fov_prob:
            raise ValueError("fov_prob: a window on the model grid has a fixed field of view; remove it")
        s = self.size
        # in-plane only, as the slice model moves its slices (z is the scan's axis); no flips (left/right organs)
        self.affine = RandAffined(
            ["image", "label"],
            prob=float(augment),
            rotate_range=(0.0, 0.0, 0.26),
            scale_range=(0.15, 0.15, 0.0),
            translate_range=(0.08 * s, 0.08 * s, 0.0),
            mode=("bilinear", "nearest"),
            padding_mode="border",
        )
        self.synth = SynthesizeFromLabelsd(prob=1.0)
        # a synthesised image is not in HU: normalised without the CT window, as the engine normalises an MR
        self.synth_config = replace(engine_config, clip=None, ct_clip=None)
        self.intensity = intensity_transforms(self.cfg.intensity_prob)
        self.items = class_volumes(volumes, engine_config, class_names, names)
        self.weights = case_probabilities(self.items, self.cfg.case_weights)
        # per volume, class -> its voxels (flat indices): built once here, shared by forked loader workers
        self.voxels = []
        for v in self.items:
            flat = v.classes.reshape(-1).numpy()
            fg = np.flatnonzero(flat)
            values = flat[fg]
            self.voxels.append({int(k): fg[values == k] for k in np.unique(values)})

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        c, s = self.cfg, self.size
        rng = np.random.default_rng(derive_seed(self.seed, "auto_window", int(index)))
        i = int(rng.choice(len(self.items), p=self.weights))
        v, voxels = self.items[i], self.voxels[i]
        shape = tuple(v.classes.shape)
        target = "any"
        if voxels and rng.random() < self.fg:
            k = sorted(voxels)[int(rng.integers(len(voxels)))]
            centre = np.unravel_index(int(rng.choice(voxels[k])), shape)
            target = f"class {k}"
        else:
            centre = tuple(int(rng.integers(n)) for n in shape)
        n, z = shape[2], int(centre[2])
        lo, hi = partial_scan(n, z, c.partial_prob, rng)  # a scan of some slices that holds the window's centre
        # the window in the (possibly cut) scan: beyond it, padding
        scan = (slice(None), slice(None), slice(lo, hi + 1))
        start = [int(a) - s // 2 for a in centre]
        start[2] -= lo
        inside = _inside(start, s, (shape[0], shape[1], hi - lo + 1))
        lab = crop(v.classes[scan], start, s, 0).float()
        synthetic = v.image is None or rng.random() < c.synth_prob
        if synthetic:
            self.synth.set_random_state(int(rng.integers(2**31 - 1)))
            tissues = crop(v.tissues[scan], start, s, 0)
            raw = self.synth({"label": tissues[None]})["image"][0]
            # normalised over the scan's voxels alone, then padded with its minimum: as the engine treats a scan
            values = normalize_window(raw[inside], self.synth_config)
            img = raw.new_full(raw.shape, float(values.min()))
            img[inside] = values
        else:
            img = crop(v.image[scan], start, s, float(v.image.min()))
        if rng.random() < c.flip_slices_prob:  # a feet-first scan
            img, lab = img.flip(-1), lab.flip(-1)
        img = vary_intensity(img[None], self.intensity, rng)
        self.affine.set_random_state(int(rng.integers(2**31 - 1)))
        moved = self.affine({"image": img, "label": lab[None]})
        return {
            "image": _plain(moved["image"]).contiguous(),
            "label": _plain(moved["label"]).contiguous(),
            "index": int(index),
            "seed": derive_seed(self.seed, "window_step", int(index)),
            "case": v.name,
            "target": f"{target} at {tuple(int(a) for a in centre)}",
            "synthetic": bool(synthetic),
        }


def window_dataset(volumes, engine_config, model, recipe: dict, root, seed: int) -> AutoWindowDataset:
    a = recipe.get("auto") or {}
    return AutoWindowDataset(
        volumes,
        engine_config,
        model.class_names,
        case_names(recipe, Path(root)),
        model.img_size,
        seed=seed,
        foreground_windows=float(a.get("foreground_windows", 0.9)),
        augment=float(a.get("augment", 0.5)),
        sampling=SliceSampling.from_recipe(a),
    )


class AutoWindowStep(TrainingStep):
    """The network and its window loss. `forward(images, labels, seeds)` -> (loss, [Dice])."""

    def __init__(self, model: nn.Module, recipe: dict, autocast, root=".") -> None:
        super().__init__()
        a = recipe.get("auto") or {}
        refused = sorted(SLICE_ONLY & set(a))
        if refused:
            raise ValueError(
                f"auto.{', auto.'.join(refused)}: settings of the slice model; the window model "
                f"{type(model).__name__} has no use for them: remove them"
            )
        self.model, self.autocast, self.recipe, self.root = model, autocast, recipe, root
        self.seg_loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    @classmethod
    def from_recipe(cls, model, recipe, root, sidecar, engine_cfg, autocast) -> "AutoWindowStep":
        return cls(model, recipe, autocast, root)

    def dataset(self, volumes, engine_cfg, sampling, seed: int) -> AutoWindowDataset:
        return window_dataset(volumes, engine_cfg, self.model, self.recipe, self.root, seed)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            logits = self.model(images)
        logits = logits.float()
        loss = self.seg_loss(logits, labels)
        dice = _dice(logits.detach().argmax(1), labels[:, 0].long(), self.model.num_classes)
        return loss, torch.tensor([dice])
