"""Text on the CPU: a structure's name chooses one class of an automatic model; clicks refine its mask.

The text tower embeds the typed name. Every phrasing of every class the automatic model knows (`prompt_variants`:
its words and synonyms through the training templates) is embedded once; the phrasing closest to the name (cosine
similarity of the pooled embeddings) chooses the class, and the automatic model's answer for the image (cached per
image by `AutoEngine`) gives its mask. A name less similar than `min_similarity` to every phrasing is not a
structure the model knows: refused (`Sam3DInputError`, HTTP 422) with the closest class named. Clicks that follow
refine the class's mask with the click model, the mask being the prior of the first click (as a click refines a
`sam3d_auto` class), so the annotator's corrections land where the name pointed; background clicks alone take
part of it away.

The model config (configs/models/autosam3d_text.yaml) names the two models and the gate:

    classes_from: autosam3d    # the automatic model whose classes the names choose
    refine_with: clicknet      # the click model that refines
    checkpoint: models/autosam3d.safetensors   # the automatic model's weights (a new file reloads the task)
    text_min_similarity: 0.75
"""

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..text.encoder import load_text_encoder
from ..text.variants import prompt_variants
from .auto import AutoEngine, auto_engine_from_config
from .errors import Sam3DInputError
from .interactive import InteractiveEngine, SegmentResult, point_engine_from_config
from .model_config import load_model_config
from .text_search import parse_text_prompt


class NamedClassEngine:
    """Thread-safe as its two engines are. `segment_text(image, text, foreground, background)` -> `SegmentResult`."""

    def __init__(
        self, auto: AutoEngine, click: InteractiveEngine | None, text_encoder, min_similarity: float = 0.75
    ) -> None:
        self.auto, self.click, self.text_encoder = auto, click, text_encoder
        self.min_similarity = float(min_similarity)
        self.model_name, self.checkpoint, self.model_id = auto.model_name, auto.checkpoint, auto.model_id
        self.config, self.device = auto.config, auto.device
        self._phrases = [(p, name) for name in auto.class_names for p in prompt_variants(name)]
        pooled = torch.stack([e.pooled for e in text_encoder.embed([p for p, _ in self._phrases])])
        self._matrix = F.normalize(pooled, dim=1)

    # clicks without a name are the click model's (as a text model takes clicks alone); its click sequences are
    # the ones `Sam3DPredictor.reset` forgets
    def segment(self, image_path: str, *args, **kwargs) -> SegmentResult:
        if self.click is None:
            raise Sam3DInputError(f"{self.model_name}: no click model (refine_with) to answer clicks")
        return self.click.segment(image_path, *args, **kwargs)

    @property
    def _states(self):
        return None if self.click is None else self.click._states

    @property
    def _lock(self):
        return self.click._lock

    def closest_class(self, text: str) -> tuple[str, str, float]:
        """(class, its phrasing nearest to `text`, their cosine similarity)."""
        sims = self._matrix @ F.normalize(self.text_encoder(text).pooled, dim=0)
        best = int(sims.argmax())
        phrase, name = self._phrases[best]
        return name, phrase, float(sims[best])

    def segment_text(self, image_path: str, text: str, foreground=None, background=None) -> SegmentResult:
        """The class `text` names, as the automatic model segments it in the whole image; clicks (optional) refine."""
        t_start = time.perf_counter()
        text, fg, bg = parse_text_prompt(text, foreground, background)
        name, phrase, similarity = self.closest_class(text)
        info = {
            "model": self.model_name,
            "checkpoint": self.checkpoint,
            "text": text,
            "closest_name": name,
            "closest_phrase": phrase,
            "text_similarity": round(similarity, 4),
        }
        if similarity < self.min_similarity:
            raise Sam3DInputError(
                f"{text!r} is not a structure {self.model_name} knows (closest: {name!r}, similarity "
                f"{similarity:.2f} < {self.min_similarity}); it knows {', '.join(self.auto.class_names)}, and a click "
                "model segments anything"
            )
        found = self.auto.segment(image_path)
        mask = (found.mask == self.auto.label_names[name]).astype(np.uint8)
        confidence = found.info.get("confidence", {}).get(name)
        info.update(score=confidence if confidence is not None else 0.0, familiar_slices=found.info["familiar_slices"])
        timings = {f"auto_{k}": v for k, v in found.timings.items()}
        if len(fg) or len(bg):
            refined = self.segment(image_path, fg, bg, label=f"text:{name}", prior=mask)
            mask = refined.mask
            timings.update(refined.timings)
            info["windows"] = refined.info.get("windows", [])
        info["voxels"] = int(mask.sum())
        timings["total"] = time.perf_counter() - t_start
        return SegmentResult(mask, found.affine, timings, info)


def named_class_engine_from_config(model_config: dict, device: str = "cpu", text_encoder=None) -> NamedClassEngine:
    """The engines a `classes_from` model config names (see the module's docstring), found by name in its
    `configs_dir` (the app's), else in the project's configs."""
    project = Path(__file__).resolve().parents[3] / "configs"

    def config(ref: str) -> dict:
        try:
            return load_model_config(ref, model_config.get("configs_dir") or project)
        except FileNotFoundError:
            return load_model_config(ref, project)

    auto_cfg = config(str(model_config["classes_from"]))
    if model_config.get("checkpoint"):
        auto_cfg["checkpoint"] = str(model_config["checkpoint"])
    auto = auto_engine_from_config(auto_cfg, device)
    click = None
    if model_config.get("refine_with"):
        click = point_engine_from_config(config(str(model_config["refine_with"])), device)
    encoder = text_encoder or load_text_encoder(model_config.get("text_model"), device=device)
    return NamedClassEngine(auto, click, encoder, float(model_config.get("text_min_similarity", 0.75)))
