"""RefSAM3D's training step: the target's name as a text prompt first, then clicks that refine the text's answer.

Per sample (one target in one window, or the whole volume resampled into the window, see `ZoomOutDataset`):
the image is encoded once; the target's label names (from the case's names file, or a built-in table named in
the recipe) are rendered through a random template or synonym (`sam3d.text.random_prompt`) and embedded by the
frozen text tower; the text alone predicts the mask at full resolution (Dice+CE loss, plus the IoU head's MSE);
then `text.refine_rounds` rounds of the ordinary interactive loop (`sam3d.training.interactive`) with the text
bound to every decode train text + clicks + previous mask. A target with no known name trains on clicks alone.

Recipe section (its presence selects this step; see configs/train/refsam3d*.yaml):

    text:
      refine_rounds: 2        # click rounds after the text round (0: text only)
      zoom_out_prob: 0.25     # samples that are the whole volume resized into the window (the search's coarse pass)
      synonym_prob: 0.2       # prompts that use a synonym of the name
      names: {voxelmorph_aseg: freesurfer_aseg}   # cases without a names file: a built-in table or {value: name}
      model: null             # where the network's text model is here, e.g. {name: ViT-B-16, pretrained: /path}
"""

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .. import metrics
from ..data.clicks import derive_seed
from ..data.training import WindowDataset, thin_slab
from ..engine.text_search import TextBound, zoom_out, zoom_out_window
from ..text import name_to_words, random_prompt
from ..text.encoder import load_text_encoder_for, stack_embeddings
from .interactive import _sample_rounds, click_config
from .losses import loss_from_recipe
from .names import case_names
from .step import TrainingStep
from .validation import validate

logger = logging.getLogger("sam3d.training")


def trained_vocabulary(names: dict[str, dict[int, str]], recipe: dict) -> list[str]:
    """The names a recipe trains on: those of its cases (`data.cases`, else all), only the `sampling.targets` of a
    case that lists some. The engine answers texts close to one of these; others get an empty mask."""
    wanted = set((recipe.get("data") or {}).get("cases") or names)
    targets = {c: {int(v) for v in vs} for c, vs in ((recipe.get("sampling") or {}).get("targets") or {}).items()}
    return sorted(
        {
            name_to_words(n)
            for c, table in names.items()
            if c in wanted
            for v, n in table.items()
            if c not in targets or v in targets[c]
        }
    )


class TextStep(TrainingStep):
    """The network, the frozen text tower and the text-then-clicks loop.

    `forward(images, labels, seeds, cases, targets)` -> (mean loss, Dice per round: [text, click 1, ...]).
    Records the names it trains on in the network config (`vocabulary`, the engine's unknown-text gate), in
    `model.config` and in the checkpoint `sidecar`.
    """

    batch_keys = ("case", "target")  # what the trainer passes after the seeds

    def __init__(self, sam: nn.Module, cfg, loss_fn: nn.Module, autocast, recipe: dict, root, sidecar: dict) -> None:
        super().__init__()
        if not getattr(sam, "supports_text", False):
            raise ValueError("the text step needs a text model: set model.preset to a refsam3d preset")
        t = recipe.get("text") or {}
        self.sam, self.loss_fn, self.autocast = sam, loss_fn, autocast
        self.refine_rounds = int(t.get("refine_rounds", 2))
        self.click_cfg = replace(cfg, rounds=max(self.refine_rounds, 1), loss_resolution="full")  # full-res logits
        self.iou_loss_weight = cfg.iou_loss_weight
        self.synonym_prob = float(t.get("synonym_prob", 0.2))
        self.names = case_names(recipe, Path(root))
        self.vocabulary = trained_vocabulary(self.names, recipe)
        sam.config = replace(sam.config, vocabulary=tuple(self.vocabulary))
        sidecar["network"] = {**sidecar.get("network", {}), "vocabulary": list(self.vocabulary)}
        device = next(sam.parameters()).device
        self.encoder = load_text_encoder_for(sam.config, t.get("model"), device=str(device))
        self.cfg = cfg  # the click validation's
        self.zoom_out_prob = float(t.get("zoom_out_prob", 0.25))

    @classmethod
    def from_recipe(cls, model, recipe, root, sidecar, engine_cfg, autocast) -> "TextStep":
        return cls(model, click_config(recipe, engine_cfg), loss_from_recipe(recipe), autocast, recipe, root, sidecar)

    def dataset(self, volumes, engine_cfg, sampling, seed: int):
        """Windows around structures, and with `text.zoom_out_prob` whole volumes (the search's coarse pass)."""
        windows = WindowDataset(volumes, engine_cfg, sampling, seed=seed)
        return ZoomOutDataset(windows, self.zoom_out_prob) if self.zoom_out_prob else windows

    def target_names(self, case: str, target: str) -> list[str] | None:
        table = self.names.get(case) or {}
        names = [table.get(int(v)) for v in str(target).split("+") if v]
        return names if names and all(names) else None

    def forward(self, images, labels, seeds, cases, targets):
        core = self.sam
        with self.autocast():
            emb = core.encode_image(images)
        total = images.new_zeros((), dtype=torch.float32)
        dice = np.zeros(1 + self.refine_rounds)
        for b in range(images.shape[0]):
            loss_b, dice_b = self._sample(emb[b : b + 1], labels[b : b + 1], int(seeds[b]), cases[b], targets[b])
            total, dice = total + loss_b, dice + dice_b
        n = images.shape[0]
        return total / n, torch.as_tensor(dice / n, dtype=torch.float32)

    def _sample(self, emb, gt, seed, case, target):
        core, size = self.sam, self.sam.img_size
        names = self.target_names(case, target)
        if names is None:  # no name to say: clicks alone, reported in every round's column
            cfg = replace(self.click_cfg, rounds=1 + self.refine_rounds)
            return _sample_rounds(core, emb, gt, seed, cfg, self.loss_fn, self.autocast, size)
        rng = np.random.default_rng(derive_seed(seed, "text"))
        prompt = stack_embeddings([self.encoder(random_prompt(names, rng, self.synonym_prob))], device=emb.device)
        with self.autocast():
            logits, iou_pred = core.decode(emb, text=prompt)
        logits, iou_pred = logits.float(), iou_pred.float()
        with torch.no_grad():
            hard, ref = logits > 0, gt > 0.5
            inter, union = (hard & ref).sum().float(), (hard | ref).sum().float()
            dice_text = metrics.dice(hard, ref)
        iou = (inter / union.clamp_min(1)).reshape(1)
        loss = self.loss_fn(logits, gt) + self.iou_loss_weight * F.mse_loss(iou_pred[:, 0], iou)
        if not self.refine_rounds:
            return loss, np.array([dice_text])
        refine_loss, refine_dice = _sample_rounds(
            TextBound(core, prompt), emb, gt, seed, self.click_cfg, self.loss_fn, self.autocast, size
        )
        r = self.refine_rounds
        return (loss + r * refine_loss) / (1 + r), np.concatenate([[dice_text], refine_dice])

    @torch.no_grad()
    def validate(self, dataset, samples: int, clicks: int, device) -> dict:
        """The click validation plus `dice_text`: the text alone ("the <name>") on the same fixed windows (targets
        without a name are left out of it)."""
        model, autocast = self.sam, self.autocast
        was_training = model.training
        model.eval()
        scores = []
        for i in range(samples):
            item = dataset[i]
            names = self.target_names(item["case"], item["target"])
            if names is None:
                continue
            prompt = stack_embeddings(
                [self.encoder("the " + " and ".join(name_to_words(n) for n in names))], device=device
            )
            with autocast():
                logits, _ = model.decode(model.encode_image(item["image"][None].to(device)), text=prompt)
            scores.append(metrics.dice(logits.float()[0, 0] > 0, item["label"][0].to(device) > 0.5))
        model.train(was_training)
        row = {"dice_text": float(np.mean(scores)) if scores else float("nan")}
        return {**row, **validate(model, dataset, samples, clicks, self.cfg, self.loss_fn, autocast, device)}


class ZoomOutDataset(Dataset):
    """A `WindowDataset` in which a share of the samples (`prob`, decided by the index) is a whole volume in the
    window with one of its labels: what the text search's coarse pass (zoom-out) sees. With the windows'
    `thin_prob`, the "whole volume" is a slab of a few slices through the target (a scan of a few slices).
    Same keys as a window."""

    def __init__(self, windows, prob: float) -> None:
        self.windows, self.prob = windows, float(prob)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        w = self.windows
        rng = np.random.default_rng(derive_seed(w.seed, "zoom-out", int(index)))
        if rng.random() >= self.prob:
            return w[index]
        vol = w.volumes[int(rng.choice(len(w.volumes), p=w.weights))]
        if not len(vol.values):
            return w[index]
        value = int(rng.choice(vol.values))
        image, target = vol.image[0], (vol.label[0] == value)
        if w.augment and rng.random() < w.cfg.thin_prob:
            z = thin_slab(target.numpy(), w.cfg.thin_slices, rng)
            image, target = image[..., z], target[..., z]
        label = (zoom_out(target.float(), w.cfg.size, 0.0) > 0.5).float()[None]
        if label.sum() < min(w.cfg.min_voxels, target.sum()):  # too small to survive the resize: a window instead
            return w[index]
        return {
            "image": zoom_out_window(image, w.cfg.size, w.engine_config, vol.hounsfield)[None].contiguous(),
            "label": label.contiguous(),
            "seed": derive_seed(w.seed, "clicks", int(index)),
            "index": int(index),
            "case": vol.name,
            "start": (0, 0, 0),
            "target": str(value),
            "synthetic": False,
        }
