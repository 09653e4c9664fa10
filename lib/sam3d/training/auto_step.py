"""3D-SAutoMed's training step: a short chain of slices ending at slice t, as the paper trains the history token.

Samples (`AutoSliceDataset`): nine neighbouring axial slices t-4..t+4 of a volume on the model grid, normalised
and padded/resized exactly as `sam3d.engine.auto` prepares slices, with their class-index maps (the recipe's
class names looked up in each case's label names; other structures are background). `SliceSampling` varies them
as scans vary: images synthesised from the label map (always for a label map alone), partial scans, the slice
order reversed, other fields of view, contrast and noise; a volume without any class gives negatives.

Step (`AutoStep`): per batch a chain length n (1-3, `auto.max_previous`) and per sample a direction (towards
t from below or from above) drawn from the sample's seed. The n previous slices run first, each reading its
spatial neighbours, the history of the one before and its boxes (at the chain's first slice: the initial
history and the default anchors, as at the middle slice of a volume); the previous boxes are the ground truth's
of the slice before, jittered, with probability `auto.teacher_boxes` (else the prediction's, as at inference).
Gradients flow through the whole chain, so the history filter and the initial history learn. Loss: Dice + CE
over background + K classes at slice t, plus the generator's box loss (L1 + GIoU, DETR's weights 5 and 2) on
every layer and every chain slice where the class is present.

Recipe section (its presence selects this step; configs/train/autosam3d*.yaml):

    auto:
      max_previous: 3          # chain length n is drawn from 1..max_previous
      teacher_boxes: 0.5       # share of steps whose previous boxes come from the ground truth (jittered)
      box_loss_weight: 1.0
      foreground_slices: 0.9   # share of samples whose slice t holds a class (else any slice)
      augment: 0.5             # share of samples moved in-plane (rotation, scale, shift; all nine slices alike)
      sam_checkpoint: null     # Meta's sam_vit_b_01ec64.pth: its encoder into a frozen ViT-B encoder
      synth_prob: 0.0          # and the other `SliceSampling` fields (configs/train/autosam3d_synth.yaml)
"""

import logging
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.transforms import Compose, RandAdjustContrastd, RandAffined, RandGaussianNoised, RandGaussianSmoothd
from torch import nn
from torch.utils.data import Dataset
from torchvision.ops import box_convert, generalized_box_iou_loss

from .. import metrics
from ..data.clicks import derive_seed
from ..data.synthesis import SynthesizeFromLabelsd, body_tissue_labels
from ..data.training import Volume, _case_weight, _plain
from ..engine.auto import SliceGeometry
from ..engine.checkpoint import read_state_dict
from ..engine.interactive import EngineConfig, normalize_window
from ..models.autosam3d.boxes import label_boxes
from ..models.autosam3d.slice_encoder import adapt_sam_state_dict
from ..models.lora import is_lora_parameter
from .names import case_names
from .step import TrainingStep

logger = logging.getLogger("sam3d.training")

HALF = 4  # a sample holds slices t-HALF..t+HALF: the longest chain (3) plus its outer neighbour


@dataclass
class SliceSampling:
    """How `AutoSliceDataset` varies its samples beyond the in-plane motion (`augment`); all off by default."""

    synth_prob: float = 0.0  # real images replaced by one synthesised from their label map (label maps: always)
    partial_prob: float = 0.0  # the scan cut to a z-extent of 1..all slices (log-uniform) around slice t
    flip_slices_prob: float = 0.0  # the slice order reversed (feet-first scans)
    fov_prob: float = 0.0  # an in-plane crop of 50-100 % of each side: another field of view and pixel size
    intensity_prob: float = 0.0  # contrast (gamma), blur and noise after normalisation
    case_weights: dict | None = None  # {name or glob: weight}, first match wins; else 1

    @classmethod
    def from_recipe(cls, auto: dict) -> "SliceSampling":
        return cls(**{f: auto[f] for f in cls.__dataclass_fields__ if f in auto})


@dataclass
class ClassVolume:
    """One training volume as the automatic models learn from it, whatever they sample from it (slices, windows)."""

    name: str
    image: torch.Tensor | None  # (X, Y, Z) normalised as the engine normalises the whole scan; None: a label map
    tissues: torch.Tensor  # (X, Y, Z) int32 label map with the body's tissues (`body_tissue_labels`): synthesis
    classes: torch.Tensor  # (X, Y, Z) class indices

    @cached_property
    def fg_slices(self) -> np.ndarray:
        """The axial slices that hold a class."""
        return np.flatnonzero(self.classes.flatten(0, 1).amax(0).numpy() > 0)


def class_volumes(
    volumes: list[Volume], engine_config: EngineConfig, class_names: list[str], names: dict[str, dict[int, str]]
) -> list[ClassVolume]:
    """Each volume with its class-index map (the class names looked up in the case's label names; other structures
    are background), its image normalised as the engine normalises it and its tissue labels for synthesis."""
    items = []
    for v in volumes:
        table = {name: value for value, name in (names.get(v.name) or {}).items()}
        lut = np.zeros(int(v.label.max()) + 1, dtype=np.int64)
        found = [(k + 1, table[n]) for k, n in enumerate(class_names) if n in table and table[n] < len(lut)]
        for k, value in found:
            lut[value] = k
        if not found:  # kept: its samples teach that a scan without these organs gets an empty answer
            logger.info(f"{v.name}: none of the classes {class_names}; its samples are all background")
        classes = torch.from_numpy(lut)[v.label[0].long()]  # (X, Y, Z) class indices
        image = None if v.image is None else normalize_window(v.image[0], engine_config, v.hounsfield)
        raw = None if v.image is None else v.image[0].numpy()
        tissues = torch.from_numpy(body_tissue_labels(v.label[0].numpy(), raw, engine_config.spacing))
        items.append(ClassVolume(v.name, image, tissues, classes))
    if not any(bool(v.classes.any()) for v in items):
        raise ValueError(f"no training volume holds any of the classes {class_names}")
    return items


def case_probabilities(items: list[ClassVolume], case_weights: dict | None) -> np.ndarray:
    """How often each volume is drawn: its case weight (first matching name or glob, else 1), normalised."""
    weights = np.array([_case_weight(case_weights, v.name) for v in items])
    return weights / weights.sum()


def intensity_transforms(p: float) -> Compose:
    """Contrast (gamma), blur and noise after normalisation, each with probability about `p`."""
    return Compose(
        [
            RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=p),
            RandGaussianSmoothd("image", sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), prob=p / 3),
            RandGaussianNoised("image", std=0.1, prob=p),
        ]
    )


def vary_intensity(img: torch.Tensor, intensity: Compose, rng: np.random.Generator) -> torch.Tensor:
    """A scale and shift of the normalised values per sample, then `intensity_transforms`, seeded by `rng`."""
    img = img * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.1, 0.1))
    intensity.set_random_state(int(rng.integers(2**31 - 1)))
    return _plain(intensity({"image": img})["image"])


def partial_scan(n: int, t: int, prob: float, rng: np.random.Generator) -> tuple[int, int]:
    """The first and last slice of the scan a sample sees: with probability `prob` a run of 1..n slices
    (log-uniform) that holds slice t, else all n."""
    if rng.random() >= prob:
        return 0, n - 1
    length = int(np.clip(round(np.exp(rng.uniform(0, np.log(n)))), 1, n))
    lo = int(rng.integers(max(0, t - length + 1), min(t, n - length) + 1))
    return lo, lo + length - 1


class AutoSliceDataset(Dataset):
    """`length` deterministic samples: {"image", "label": (2 HALF + 1, S, S), "seed", ...}; see the module doc."""

    def __init__(
        self,
        volumes: list[Volume],
        engine_config: EngineConfig,
        class_names: list[str],
        names: dict[str, dict[int, str]],
        size: int,
        seed: int = 0,
        foreground_slices: float = 0.9,
        augment: float = 0.0,
        length: int = 10**9,
        sampling: SliceSampling | None = None,
    ) -> None:
        self.size, self.seed, self.length, self.fg = int(size), int(seed), int(length), float(foreground_slices)
        self.cfg = sampling or SliceSampling()
        # the slices are the channels of one 2D image: one in-plane motion for all; no flips (left/right organs)
        self.affine = RandAffined(
            ["image", "label"],
            prob=float(augment),
            rotate_range=0.26,
            scale_range=0.15,
            translate_range=0.08 * size,
            mode=("bilinear", "nearest"),
            padding_mode="border",
        )
        self.synth = SynthesizeFromLabelsd(prob=1.0)
        # a synthesised image is not in HU: normalised without the CT window, as the engine normalises an MR
        self.synth_config = replace(engine_config, clip=None, ct_clip=None)
        self.intensity = intensity_transforms(self.cfg.intensity_prob)
        self.items = class_volumes(volumes, engine_config, class_names, names)
        self.weights = case_probabilities(self.items, self.cfg.case_weights)

    def keep_only(self, names: list[str]) -> None:
        """Draw from these volumes alone (their weights renormalised)."""
        keep = [i for i, v in enumerate(self.items) if v.name in names]
        self.items = [self.items[i] for i in keep]
        self.weights = self.weights[keep] / self.weights[keep].sum()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        c = self.cfg
        rng = np.random.default_rng(derive_seed(self.seed, "auto", int(index)))
        v = self.items[int(rng.choice(len(self.items), p=self.weights))]
        x, y, n = v.classes.shape
        t = int(rng.choice(v.fg_slices)) if len(v.fg_slices) and rng.random() < self.fg else int(rng.integers(n))
        lo, hi = partial_scan(n, t, c.partial_prob, rng)
        idx = np.clip(np.arange(t - HALF, t + HALF + 1), lo, hi)  # beyond the scan: its edge slice again
        if rng.random() < c.flip_slices_prob:
            idx = idx[::-1].copy()
        xs, ys = slice(0, x), slice(0, y)
        if rng.random() < c.fov_prob:
            xs, ys = (_crop(side, rng) for side in (x, y))
        synthetic = v.image is None or rng.random() < c.synth_prob
        if synthetic:
            self.synth.set_random_state(int(rng.integers(2**31 - 1)))
            img = self.synth({"label": v.tissues[xs, ys][None, ..., idx]})["image"][0]
            img = normalize_window(img, self.synth_config)
        else:
            img = v.image[xs, ys][..., idx]
        geo = SliceGeometry((img.shape[0], img.shape[1]), self.size)
        img = geo.to_model(img.permute(2, 0, 1), fill=float(img.min()))[:, 0]
        img = vary_intensity(img, self.intensity, rng)
        lab = geo.to_model(v.classes[xs, ys][..., idx].permute(2, 0, 1).float(), fill=0.0, mode="nearest")[:, 0]
        self.affine.set_random_state(int(rng.integers(2**31 - 1)))
        moved = self.affine({"image": img, "label": lab})
        img, lab = _plain(moved["image"]), _plain(moved["label"])
        return {
            "image": img.contiguous(),
            "label": lab.contiguous(),
            "index": int(index),
            "seed": derive_seed(self.seed, "chain", int(index)),
            "case": v.name,
            "target": f"slice {t}",
            "synthetic": bool(synthetic),
        }


def _crop(side: int, rng: np.random.Generator) -> slice:
    """A random 50-100 % of an axis."""
    keep = max(1, int(round(side * rng.uniform(0.5, 1.0))))
    start = int(rng.integers(0, side - keep + 1))
    return slice(start, start + keep)


def auto_dataset(volumes, engine_config, model, recipe: dict, root, seed: int) -> AutoSliceDataset:
    a = recipe.get("auto") or {}
    return AutoSliceDataset(
        volumes,
        engine_config,
        model.class_names,
        case_names(recipe, Path(root)),
        model.img_size,
        seed=seed,
        foreground_slices=float(a.get("foreground_slices", 0.9)),
        augment=float(a.get("augment", 0.5)),
        sampling=SliceSampling.from_recipe(a),
    )


def load_sam_encoder(model: nn.Module, path) -> None:
    """Meta's SAM checkpoint (weights_only) into the frozen slice encoder; only LoRA tensors may be missing."""
    if not model.config.freeze_encoder:
        raise ValueError("auto.sam_checkpoint needs freeze_encoder: true (a resumed run would lose its tuned encoder)")
    state = adapt_sam_state_dict(read_state_dict(path), model.encoder)
    missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    if unexpected or not all(is_lora_parameter(k) for k in missing):
        raise ValueError(
            f"{path}: not a SAM ViT checkpoint of this size ({len(unexpected)} unexpected keys, "
            f"missing {[k for k in missing if not is_lora_parameter(k)][:5]})"
        )
    logger.info(f"SAM encoder weights from {path}")


def box_loss(pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """DETR's 5 L1 + 2 GIoU on (cx, cy, w, h) boxes of the classes present; zero when none is."""
    if not bool(present.any()):
        return pred.sum() * 0.0
    p, t = pred[present], target[present]
    giou = generalized_box_iou_loss(
        box_convert(p, "cxcywh", "xyxy"), box_convert(t, "cxcywh", "xyxy"), reduction="mean"
    )
    return 5.0 * F.l1_loss(p, t) + 2.0 * giou


def _dice(pred: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Mean hard Dice over the classes present in the target or the prediction (1 when neither has any)."""
    present = [c for c in range(1, k + 1) if bool((pred == c).any() or (target == c).any())]
    return float(np.mean([metrics.dice(pred == c, target == c) for c in present])) if present else 1.0


class AutoStep(TrainingStep):
    """The network and the chain step. `forward(images, labels, seeds)` -> (loss, [Dice first, Dice t])."""

    def __init__(self, model: nn.Module, recipe: dict, autocast, root=".") -> None:
        super().__init__()
        a = recipe.get("auto") or {}
        if "foreground_windows" in a:  # the window model's; refused rather than silently ignored
            raise ValueError(
                "auto.foreground_windows: a setting of the window model; the slice model reads auto.foreground_slices"
            )
        self.model, self.autocast, self.recipe, self.root = model, autocast, recipe, root
        self.max_previous = int(a.get("max_previous", 3))
        if not 1 <= self.max_previous <= HALF - 1:
            raise ValueError(f"auto.max_previous must be 1..{HALF - 1}")
        self.teacher_boxes = float(a.get("teacher_boxes", 0.5))
        self.box_weight = float(a.get("box_loss_weight", 1.0))
        self.seg_loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        if a.get("sam_checkpoint"):
            p = Path(str(a["sam_checkpoint"])).expanduser()
            load_sam_encoder(model, p if p.is_absolute() else Path(root) / p)

    @classmethod
    def from_recipe(cls, model, recipe, root, sidecar, engine_cfg, autocast) -> "AutoStep":
        return cls(model, recipe, autocast, root)

    def dataset(self, volumes, engine_cfg, sampling, seed: int) -> "AutoSliceDataset":
        return auto_dataset(volumes, engine_cfg, self.model, self.recipe, self.root, seed)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        m, k = self.model, self.model.num_classes
        b, _, s, _ = images.shape
        rngs = [np.random.default_rng(int(x)) for x in seeds]
        n = int(rngs[0].integers(1, self.max_previous + 1))
        d = torch.tensor([1 if r.random() < 0.5 else -1 for r in rngs], device=images.device)
        # chain order: the slice before the first, the n + 1 chain slices (t last), the slice after t
        pos = HALF + d[:, None] * (torch.arange(n + 3, device=images.device)[None] - n - 1)  # (B, n + 3)
        rows = torch.arange(b, device=images.device)[:, None]
        with self.autocast():
            feats = m.encode(images[rows, pos].reshape(-1, 1, s, s))
        feats = feats.reshape(b, n + 3, *feats.shape[1:])
        lab = labels[rows, pos].long()  # (B, n + 3, S, S)
        up = (d > 0).reshape(b, 1, 1, 1)
        history, boxes, present = m.initial_history(b), None, None
        box_total = images.new_zeros(())
        first_dice = None
        for j in range(n + 1):
            i = j + 1  # the chain slice in `feats`; its spatial neighbours are i - d and i + d
            below, above = feats[:, i - 1], feats[:, i + 1]
            with self.autocast():
                out = m.step(
                    torch.where(up, below, above), feats[:, i], torch.where(up, above, below), history, boxes, present
                )
            logits = out["logits"].float()
            gt_boxes, gt_present = label_boxes(lab[:, i], k)
            for layer_boxes in out["boxes"]:
                box_total = box_total + box_loss(layer_boxes.float(), gt_boxes, gt_present) / max(len(out["boxes"]), 1)
            if j == 0:  # the chain's first slice, from the default anchors: at the logits' own resolution
                small = F.interpolate(lab[:, i, None].float(), size=logits.shape[-2:], mode="nearest-exact")
                first_dice = _dice(logits.detach().argmax(1), small[:, 0].long(), k)
            history = out["history"]
            if rngs[0].random() < self.teacher_boxes:  # the ground truth's boxes, moved a little
                jitter = torch.from_numpy(rngs[0].normal(0, 0.02, gt_boxes.shape)).to(gt_boxes)
                boxes, present = (gt_boxes + jitter).clamp(0, 1), gt_present
            else:
                boxes, present = label_boxes(logits.detach().argmax(1), k)
        full = F.interpolate(logits, size=(s, s), mode="bilinear", align_corners=False)
        target = lab[:, n + 1, None]
        loss = self.seg_loss(full, target) + self.box_weight * box_total / (n + 1)
        dice_t = _dice(full.detach().argmax(1), target[:, 0], k)
        return loss, torch.tensor([first_dice, dice_t])
