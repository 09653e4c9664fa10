"""Text prompts over a whole image: find the named structure without a click, then refine it with clicks.

The search is SegVol's zoom-out-zoom-in: the whole model-grid volume resampled into one window (zoom-out; one
scale for all axes, so a scan of a few slices stays a thin slab instead of being stretched) gives a coarse mask;
windows at the model spacing that cover the coarse mask's bounding box (zoom-in, as many as `max_windows`
allows, each fed the coarse result as its previous mask) give the fine one, averaged where they overlap. Clicks
that follow (the client resends every click with the same text) refine the last answer in one window, with the
text, the clicks and the last mask as prompts, as the point engine refines its masks.

A text far from every name the model was trained on (cosine similarity of the sentence embeddings below
`min_similarity`; the names are the checkpoint's `vocabulary`) gets an empty mask and a low score rather than a
guess; an empty text is an input error.
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..text import name_to_words, normalize_prompt
from ..text.encoder import load_text_encoder_for, stack_embeddings
from ..text.variants import SYNONYMS
from .checkpoint import LoadedModel, load_model
from .errors import Sam3DInputError
from .interactive import EngineConfig, InteractiveEngine, SegmentResult, _extends, _parse_points, normalize_window
from .windows import contains, crop, overlap, window_start

_EMPTY_LOGIT = -20.0
_ZOOM_OUT = ("zoom-out",)  # the embedding cache's key for the whole-volume window


@dataclass
class _TextState:
    prompts: list  # the clicks of the request that produced it (the text is part of the state's key)
    canvas: torch.Tensor  # model-grid logits of the last answer (float16)
    window: tuple | None  # the window the last click refinement used
    score: float


def _vocabulary_words(names) -> list[str]:
    words = [name_to_words(n) for n in names]
    words += [alt for w in words for base, alts in SYNONYMS.items() if base in w for alt in alts]
    return list(dict.fromkeys(words))


def parse_text_prompt(text, foreground, background) -> tuple[str, np.ndarray, np.ndarray]:
    """A request's text (normalised; an empty one is an input error) and clicks (N, 3), as text engines read them."""
    if not isinstance(text, str) or not normalize_prompt(text):
        raise Sam3DInputError("empty text: name the structure to segment, e.g. 'liver' or 'left kidney'")
    return normalize_prompt(text), _parse_points(foreground, "foreground"), _parse_points(background, "background")


def zoom_out_layout(shape: tuple[int, ...], size: int) -> tuple[tuple[slice, ...], tuple[int, ...]]:
    """Where a whole volume of `shape` goes in the zoom-out window: one scale for every axis (shapes keep their
    proportions; a scan of a few slices stays a slab), centred, the rest padding as for any short axis.
    Returns the window's slices that hold it and its resized shape."""
    scale = size / max(shape)
    inner = tuple(max(1, min(size, int(round(n * scale)))) for n in shape)
    return tuple(slice((size - n) // 2, (size - n) // 2 + n) for n in inner), inner


def zoom_out(volume: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    """(X, Y, Z) -> the (size,)^3 zoom-out window (trilinear), `fill` around it."""
    where, inner = zoom_out_layout(tuple(volume.shape), size)
    out = torch.full((size,) * 3, float(fill))
    out[where] = F.interpolate(volume[None, None].float(), size=inner, mode="trilinear", align_corners=False)[0, 0]
    return out


def zoom_out_window(volume: torch.Tensor, size: int, config: EngineConfig, hounsfield: bool) -> torch.Tensor:
    """The whole model-grid volume in one window (`zoom_out`, padded with its minimum) and normalised, as the
    search's coarse pass sees it (training uses it too); `hounsfield`: the volume is a CT (its session says)."""
    return normalize_window(zoom_out(volume, size, float(volume.min())), config, hounsfield)


def zoom_out_logits_to_volume(logits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The coarse pass's (size,)^3 logits back on the volume's (X, Y, Z) grid."""
    where, _ = zoom_out_layout(shape, logits.shape[-1])
    return F.interpolate(
        logits[..., where[0], where[1], where[2]].float(), size=tuple(shape), mode="trilinear", align_corners=False
    )[0, 0]


class TextBound:
    """A network whose `decode` always gets one text prompt; everything else is the network's."""

    def __init__(self, model, prompt) -> None:
        self._model, self._prompt = model, prompt

    def decode(self, *args, **kwargs):
        return self._model.decode(*args, text=self._prompt, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


class TextEngine(InteractiveEngine):
    """The point engine plus `segment_text`; the network must take text (`RefSam3D`)."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        device: str = "cpu",
        text_encoder=None,
        min_similarity: float = 0.4,
        text_model=None,
    ) -> None:
        super().__init__(loaded, config, device)
        if not getattr(self.model, "supports_text", False):
            raise ValueError(f"{self.model_name} does not take text prompts (use a RefSAM3D checkpoint)")
        net = self.model.config
        self.text_encoder = text_encoder or load_text_encoder_for(net, text_model, device=str(self.device))
        self.min_similarity = float(min_similarity)
        self._vocabulary = _vocabulary_words(net.vocabulary)
        self._vocabulary_matrix = None

    # ---- text ----------------------------------------------------------------------------------------------------

    def _closest_name(self, text: str) -> tuple[str | None, float]:
        """The training name nearest to `text` and its cosine similarity (None, 1.0 without a vocabulary)."""
        if not self._vocabulary:
            return None, 1.0
        if self._vocabulary_matrix is None:
            pooled = torch.stack([e.pooled for e in self.text_encoder.embed(self._vocabulary)])
            self._vocabulary_matrix = F.normalize(pooled, dim=1)
        sims = self._vocabulary_matrix @ F.normalize(self.text_encoder(text).pooled, dim=0)
        best = int(sims.argmax())
        return self._vocabulary[best], float(sims[best])

    def _text_prompt(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (1, L, C), mask (1, L)) on the model's device, from the encoder's cache when seen before."""
        return stack_embeddings([self.text_encoder(text)], device=self.device)

    # ---- one request ---------------------------------------------------------------------------------------------

    def segment_text(self, image_path: str, text: str, foreground=None, background=None) -> SegmentResult:
        """The structure `text` names, found in the whole image; clicks (optional) refine the last answer."""
        t_start = time.perf_counter()
        text, fg, bg = parse_text_prompt(text, foreground, background)
        with self._lock, torch.inference_mode():
            sess, key, cached_session = self._session(str(image_path))
            t_loaded = time.perf_counter()
            self._check_inside(fg, sess.shape, "foreground")
            self._check_inside(bg, sess.shape, "background")
            closest, similarity = self._closest_name(text)
            timings = {"encode": 0.0, "decode": 0.0}
            info = {
                "model": self.model_name,
                "checkpoint": self.checkpoint,
                "text": text,
                "closest_name": closest,
                "text_similarity": similarity,
                "spacing": list(self.config.spacing),
                "windows": [],
            }
            if similarity < self.min_similarity:
                mask = np.zeros(sess.shape, dtype=np.uint8)
                info.update(
                    score=similarity,
                    voxels=0,
                    message=f"{text!r} is not a structure this model knows (closest: {closest!r})",
                )
                return self._result(mask, sess, info, timings, t_start, t_loaded, cached_session)
            prompt = self._text_prompt(text)
            state_key = (key, ("text", text))
            clicks = [(*p, True) for p in fg.tolist()] + [(*p, False) for p in bg.tolist()]
            state = self._states.get(state_key)
            extends = isinstance(state, _TextState) and _extends(clicks + [None], state.prompts + [None])
            if not extends:
                canvas, windows, score = self._search(sess, key, prompt, timings)
                state = _TextState([], canvas, None, score)
                info["windows"] = windows
            if clicks:
                state = self._refine(sess, key, prompt, fg, bg, clicks, state, timings)
                info["windows"] = [{"start": list(state.window), "size": self.model.img_size}]
            self._states[state_key] = state
            self._states.move_to_end(state_key)
            while len(self._states) > self._max_states:
                self._states.popitem(last=False)
            t = time.perf_counter()
            mask = self._to_image(sess, state.canvas)
            timings["resample"] = time.perf_counter() - t
            info.update(score=state.score, voxels=int(mask.sum()))
            return self._result(mask, sess, info, timings, t_start, t_loaded, cached_session)

    @staticmethod
    def _result(mask, sess, info, timings, t_start, t_loaded, cached_session) -> SegmentResult:
        timings["load"] = 0.0 if cached_session else t_loaded - t_start
        timings["total"] = time.perf_counter() - t_start
        return SegmentResult(mask, sess.affine.copy(), timings, info)

    # ---- zoom-out, zoom-in ---------------------------------------------------------------------------------------

    def _zoom_out_embedding(self, sess, key) -> tuple[torch.Tensor, float]:
        cache_key = (key, self.model_id, _ZOOM_OUT)
        emb = self._embeddings.get(cache_key)
        if emb is not None:
            return emb, 0.0
        t = time.perf_counter()
        window = zoom_out_window(sess.volume, self.model.img_size, self.config, sess.hounsfield)
        emb = self.model.encode_image(window[None, None].to(self.device))
        self._synchronize()
        self._embeddings.put(cache_key, emb)
        return emb, time.perf_counter() - t

    def _search(self, sess, key, prompt, timings) -> tuple[torch.Tensor, list, float]:
        """(model-grid logits, the windows used, score) of the text alone."""
        shape = sess.volume.shape
        emb, t_enc = self._zoom_out_embedding(sess, key)
        t = time.perf_counter()
        low, iou = self.model.decode(emb, text=prompt)
        coarse = zoom_out_logits_to_volume(low, tuple(shape)).cpu()
        timings["encode"] += t_enc
        timings["decode"] += time.perf_counter() - t
        windows = [{"start": "zoom-out", "size": list(shape), "embedding_cached": t_enc == 0.0}]
        positive = coarse > 0
        if not positive.any():
            return torch.full(shape, _EMPTY_LOGIT, dtype=torch.float16), windows, float(iou.reshape(-1)[0])
        starts = self._zoom_in_windows(positive)
        size = self.model.img_size
        lo = np.clip(np.min(starts, 0), 0, None)  # the windows' part of the volume: sums over it alone
        hi = np.minimum(np.max(starts, 0) + size, shape)
        total = torch.zeros(tuple(hi - lo))
        count = torch.zeros(tuple(hi - lo))
        scores = []
        for start in starts:
            emb, t_enc = self._embedding(sess, key, 1.0, start)
            t = time.perf_counter()
            prior = crop(coarse, start, size, _EMPTY_LOGIT)[None, None].to(self.device)
            logits, iou = self.model.decode(emb, mask_input=prior, text=prompt)
            src, dst = overlap(tuple(int(v) for v in np.asarray(start) - lo), size, total.shape)
            total[dst] += logits[0, 0].float().cpu()[src]
            count[dst] += 1
            scores.append(float(iou.reshape(-1)[0]))
            timings["encode"] += t_enc
            timings["decode"] += time.perf_counter() - t
            windows.append({"start": list(start), "size": size, "embedding_cached": t_enc == 0.0})
        fine = coarse.clone()
        region = fine[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        region[count > 0] = total[count > 0] / count[count > 0]
        return fine.to(torch.float16), windows, float(np.mean(scores))

    def _zoom_in_windows(self, positive: torch.Tensor) -> list[tuple]:
        """Windows at the model spacing over the coarse mask's bounding box: half-overlapping, `max_windows` at most
        (the ones nearest the mask's centre of mass first)."""
        size, shape = self.model.img_size, tuple(positive.shape)
        idx = positive.nonzero().numpy()
        lo, hi = idx.min(0), idx.max(0) + 1
        axes = []
        for a in range(3):
            n = max(1, int(np.ceil((hi[a] - lo[a] - size) / (size / 2))) + 1) if hi[a] - lo[a] > size else 1
            centres = np.linspace(lo[a] + size / 2, hi[a] - size / 2, n) if n > 1 else [(lo[a] + hi[a]) / 2]
            axes.append(centres)
        centres = np.array(np.meshgrid(*axes, indexing="ij")).reshape(3, -1).T
        mass = idx.mean(0)
        centres = centres[np.argsort(np.linalg.norm(centres - mass, axis=1), kind="stable")][: self.config.max_windows]
        return list(dict.fromkeys(window_start(c, size, shape) for c in centres))

    # ---- clicks --------------------------------------------------------------------------------------------------

    def _refine(self, sess, key, prompt, fg, bg, clicks, state, timings) -> _TextState:
        """Text + every click + the last mask, in one window around the clicks."""
        size = self.model.img_size
        fg_m, bg_m = sess.image_to_model(fg), sess.image_to_model(bg)
        every = np.concatenate([fg_m, bg_m])
        start = state.window
        if start is None or not contains(start, size, every, self.config.reuse_margin):
            start = window_start(every.mean(0), size, sess.volume.shape)
            if not contains(start, size, every, 0):  # clicks spread wider than a window: follow the newest
                start = window_start(every[-1], size, sess.volume.shape)
        emb, t_enc = self._embedding(sess, key, 1.0, start)
        t = time.perf_counter()
        prior = crop(state.canvas, start, size, _EMPTY_LOGIT).float()[None, None].to(self.device)
        with self._text_bound(prompt):  # the point engine's click handling, with the text as one more prompt
            logits, _ = self._decode(emb, start, fg_m, bg_m, None, None, prior)
        canvas = state.canvas.clone()
        src, dst = overlap(start, size, canvas.shape)
        canvas[dst] = logits[0, 0].float().cpu()[src].to(canvas.dtype)
        timings["encode"] += t_enc
        timings["decode"] += time.perf_counter() - t
        return _TextState(clicks, canvas, start, state.score)

    @contextmanager
    def _text_bound(self, prompt):
        """`self.model` answers every decode with `prompt` as text, for the duration (under the engine's lock)."""
        model = self.model
        self.model = TextBound(model, prompt)
        try:
            yield
        finally:
            self.model = model

    @staticmethod
    def _to_image(sess, canvas: torch.Tensor) -> np.ndarray:
        positive = canvas > 0
        if not positive.any():
            return np.zeros(sess.shape, dtype=np.uint8)
        idx = positive.nonzero()
        lo = np.clip(idx.min(0).values.numpy() - 2, 0, None)
        hi = np.minimum(idx.max(0).values.numpy() + 3, canvas.shape)
        box_lo, box_hi = sess.model_box_to_image_box(lo, hi)
        return sess.to_image_grid(canvas[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], lo, box_lo, box_hi)


def text_engine_from_config(model_config: dict, device: str = "cpu", text_encoder=None) -> TextEngine:
    """The model config's network and weights as a `TextEngine`. Keys: `text_min_similarity` (the unknown-text
    gate), `text_model` (where the network's text model is on this machine, see `sam3d.text.encoder`)."""
    loaded = load_model(model_config)
    return TextEngine(
        loaded,
        EngineConfig.from_dict(model_config),
        device=device,
        text_encoder=text_encoder,
        min_similarity=float(model_config.get("text_min_similarity", 0.4)),
        text_model=model_config.get("text_model"),
    )
