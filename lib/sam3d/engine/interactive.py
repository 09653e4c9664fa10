"""Clicks and boxes on an image -> a 3D mask on the image's own grid.

The image is loaded and resampled once per session; the image embedding of each window is cached; each
(image, label) keeps the previous low-res logits so the next click refines the last mask, as SAM-Med3D does.

AutoZoom (nnInteractive's): when the first answer of a click sequence reaches the edge of its window, the
structure is larger than the window, and the sequence moves to a grid `zoom_step` times coarser (a window that
covers more of the image), up to `max_zoom`; a box larger than the window starts on a grid that holds it. The
sequence's later clicks stay on the grid it settled on.
"""

import contextlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .cache import ByteLRU
from .checkpoint import LoadedModel, load_model
from .errors import Sam3DInputError
from .image_session import ImageKey, ImageSession
from .windows import (
    changed_faces,
    contains,
    crop,
    interior_point,
    neighbour_start,
    overlap,
    touched_faces,
    window_start,
)

_EMPTY_LOGIT = -20.0  # "certainly background" where no window has looked
_PRIOR_LOGIT = 10.0  # a given prior mask as logits: as confident as a previous answer, not as certain as "empty"


@dataclass
class EngineConfig:
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    clip: tuple[float, float] | None = None  # intensity window applied before normalisation (e.g. CT HU)
    ct_clip: tuple[float, float] | None = None  # the window for a CT in HU (`looks_like_hounsfield`)
    normalize: str = "zscore_foreground"  # SAM-Med3D's: z-score over the window's voxels > 0
    cache_mb: int = 2048  # image embeddings
    session_cache_mb: int = 4096  # resampled images
    max_windows: int = 8  # windows one request may use to follow a large structure
    max_voxels: int = 400_000_000  # larger images are refused rather than exhausting memory
    reuse_margin: int = 8  # keep the last window while every prompt is this many voxels inside it
    max_zoom: float = 1.0  # AutoZoom: coarsest grid, in multiples of `spacing` (1: off)
    zoom_step: float = 1.5
    precision: str = "fp32"  # "bf16": the network under bfloat16 autocast, where the device computes it natively

    @classmethod
    def from_dict(cls, cfg: dict) -> "EngineConfig":
        intensity = cfg.get("intensity") or {}
        unknown = set(intensity) - {"clip", "ct_clip", "normalize"}
        if unknown:
            raise ValueError(f"unknown intensity setting(s) {sorted(unknown)}: expected clip, ct_clip, normalize")
        out = cls()
        if cfg.get("spacing") is not None:
            sp = cfg["spacing"]
            out.spacing = tuple(float(v) for v in (sp if isinstance(sp, (list, tuple)) else [sp] * 3))
        for name in ("clip", "ct_clip"):
            if intensity.get(name) is not None:
                setattr(out, name, tuple(float(v) for v in intensity[name]))
        out.normalize = intensity.get("normalize", out.normalize)
        out.precision = cfg.get("precision") or out.precision
        if out.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {out.precision!r}")
        for name in ("cache_mb", "session_cache_mb", "max_windows", "max_voxels", "reuse_margin"):
            if cfg.get(name) is not None:
                setattr(out, name, int(cfg[name]))
        for name in ("max_zoom", "zoom_step"):
            if cfg.get(name) is not None:
                setattr(out, name, float(cfg[name]))
        if out.max_zoom < 1.0 or out.zoom_step <= 1.0:
            raise ValueError(f"max_zoom must be >= 1 and zoom_step > 1, got {out.max_zoom} and {out.zoom_step}")
        if out.normalize not in ("zscore_foreground", "zscore", "none"):
            raise ValueError(f"unknown intensity normalisation {out.normalize!r}")
        return out


@dataclass
class SegmentResult:
    mask: np.ndarray  # uint8 0/1, the image array's shape
    affine: np.ndarray  # 4x4, the image's affine as LoadImage reports it
    timings: dict[str, float]
    info: dict = field(default_factory=dict)


@dataclass
class _LabelState:
    prompts: list  # [(i, j, k, is_foreground)] and roi of the request that produced this state
    low_res: dict  # window start -> low-res logits (1, 1, s, s, s)
    canvas: torch.Tensor  # model-grid logits of the last answer (float16)
    box: tuple | None  # model-grid (lo, hi) that holds every positive voxel of `canvas`; None: there is none
    zoom: float = 1.0  # the grid of this sequence: `spacing` times zoom


def normalize_window(x: torch.Tensor, cfg: EngineConfig, hounsfield: bool = False) -> torch.Tensor:
    """A window's intensities as the model sees them (clip, then z-score); training uses it too. `hounsfield`: the
    window is from a CT in HU, clipped to `cfg.ct_clip` when the model has one."""
    clip = cfg.ct_clip if hounsfield and cfg.ct_clip is not None else cfg.clip
    if clip is not None:
        x = x.clamp(*clip)
    if cfg.normalize == "none":
        return x
    values = x[x > 0] if cfg.normalize == "zscore_foreground" else x
    if values.numel() < 2:
        values = x
    return (x - values.mean()) / values.std().clamp_min(1e-8)


def precision_context(precision: str, device: torch.device):
    """bfloat16 autocast where the device has it natively (a CUDA GPU, a CPU with AVX-512 BF16 or AMX); elsewhere
    it would be emulated and slower than float32. On a CPU, PyTorch's float32 3D convolutions fall back to a slow
    path below 20,480 input voxels x channels (the coarse levels of a small-window UNet); in bfloat16 they run
    through oneDNN."""
    native = device.type == "cuda" or (device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if precision == "bf16" and native:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _parse_points(points, name: str) -> np.ndarray:
    if points is None:
        return np.zeros((0, 3))
    try:
        arr = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise Sam3DInputError(f"{name} must be a list of [i, j, k] voxel indices, got {points!r}") from None
    if arr.size == 0:
        return np.zeros((0, 3))
    if arr.ndim != 2 or arr.shape[1] != 3 or not np.isfinite(arr).all():
        raise Sam3DInputError(f"{name} must be a list of [i, j, k] voxel indices, got {points!r}")
    return arr


class InteractiveEngine:
    """Thread-safe; one per served model."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None, device: str = "cpu") -> None:
        self.config = config or EngineConfig()
        self.device = torch.device(device)
        self.model = loaded.model.to(self.device).eval()
        self.checkpoint = loaded.checkpoint
        self.model_name, self.model_id = loaded.display_name, loaded.model_id
        self._sessions = ByteLRU(self.config.session_cache_mb << 20, sizeof=lambda s: s.nbytes)
        self._embeddings = ByteLRU(self.config.cache_mb << 20, sizeof=lambda t: t.element_size() * t.nelement())
        self._states: OrderedDict = OrderedDict()
        self._autocast = precision_context(self.config.precision, self.device)
        self._max_states = 32
        self._lock = threading.RLock()

    # ---- sessions and caches -------------------------------------------------------------------------------

    def _session(self, path: str, zoom: float = 1.0) -> tuple[ImageSession, ImageKey, bool]:
        key = ImageKey.of(path)
        sess = self._sessions.get((key, zoom))
        if sess is not None:
            return sess, key, True
        sess = ImageSession(path, tuple(s * zoom for s in self.config.spacing), self.config.max_voxels)
        self._sessions.put((key, zoom), sess)
        # a changed file makes the caches of its old version useless
        self._sessions.discard(lambda k: k[0].path == key.path and k[0] != key)
        self._embeddings.discard(lambda k: k[0].path == key.path and k[0] != key)
        for old in [k for k in self._states if k[0].path == key.path and k[0] != key]:
            del self._states[old]
        return sess, key, False

    def _embedding(self, sess: ImageSession, key: ImageKey, zoom: float, start: tuple) -> tuple[torch.Tensor, float]:
        cache_key = (key, self.model_id, zoom, start)
        emb = self._embeddings.get(cache_key)
        if emb is not None:
            return emb, 0.0
        t = time.perf_counter()
        window = normalize_window(sess.crop(start, self.model.img_size), self.config, sess.hounsfield)
        with self._autocast():
            emb = self.model.encode_image(window[None, None].to(self.device))
        self._synchronize()
        self._embeddings.put(cache_key, emb)
        return emb, time.perf_counter() - t

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- one request ---------------------------------------------------------------------------------------

    def segment(
        self,
        image_path: str,
        foreground=None,
        background=None,
        roi=None,
        label: str = "structure",
        prior: np.ndarray | None = None,
    ):
        """`prior`: a 0/1 mask on the image's grid (e.g. one class of an automatic result) that the first click of a
        new click sequence on (image, label) refines, as if it were the previous answer; later requests that
        extend the sequence continue from their own previous answer."""
        t_start = time.perf_counter()
        fg = _parse_points(foreground, "foreground")
        bg = _parse_points(background, "background")
        if len(fg) == 0 and len(bg) == 0 and roi is None:
            raise Sam3DInputError("no prompt: give at least one foreground click or a box (roi)")
        with self._lock, torch.inference_mode():
            sess, key, cached_session = self._session(str(image_path))
            t_loaded = time.perf_counter()
            self._check_inside(fg, sess.shape, "foreground")
            self._check_inside(bg, sess.shape, "background")
            box_image = self._parse_roi(roi, sess.shape)
            result = self._segment(str(image_path), key, fg, bg, box_image, label, prior)
        result.timings["load"] = 0.0 if cached_session else t_loaded - t_start
        result.timings["total"] = time.perf_counter() - t_start
        return result

    @staticmethod
    def _check_inside(points: np.ndarray, shape: tuple, name: str) -> None:
        for p in points:
            if np.any(p < 0) or np.any(p > np.asarray(shape) - 1):
                raise Sam3DInputError(
                    f"{name} point {p.astype(int).tolist()} is outside the image of shape {list(shape)}"
                )

    @staticmethod
    def _parse_roi(roi, shape: tuple) -> np.ndarray | None:
        """[i0, j0, i1, j1, k0, k1] -> (2, 3) corners in image indices."""
        if roi is None or (hasattr(roi, "__len__") and len(roi) == 0):
            return None
        try:
            i0, j0, i1, j1, k0, k1 = (float(v) for v in roi)
        except (TypeError, ValueError):
            raise Sam3DInputError(f"roi must be [i0, j0, i1, j1, k0, k1], got {roi!r}") from None
        box = np.array([[i0, j0, k0], [i1, j1, k1]])
        if np.any(box[0] > box[1]):
            raise Sam3DInputError(f"roi {roi} is empty: each start must not exceed its end")
        InteractiveEngine._check_inside(box, shape, "roi corner")
        return box

    def _segment(self, path, key, fg, bg, box_image, label, prior=None) -> SegmentResult:
        prompts = [(*p, True) for p in fg.tolist()] + [(*p, False) for p in bg.tolist()]
        prompts.append(("roi", None if box_image is None else box_image.tolist()))
        state = self._states.get((key, label))
        # the client resends every click so far: a request that extends the last one continues it
        if state is not None and not _extends(prompts, state.prompts):
            state = None
        if len(fg) == 0 and box_image is None and state is None and prior is None:  # nothing to take away from
            raise Sam3DInputError("only background clicks: add a foreground click or a box (roi) on the structure")
        zoom = state.zoom if state is not None else self._zoom_to_fit(path, box_image)
        while True:
            sess, _, _ = self._session(path, zoom)
            may_zoom = state is None and zoom * self.config.zoom_step <= self.config.max_zoom + 1e-6
            result = self._answer(sess, key, zoom, state, prompts, fg, bg, box_image, label, prior, may_zoom)
            if result is not None:
                return result
            zoom *= self.config.zoom_step  # the first answer reached its window's edge: look again, coarser

    def _zoom_to_fit(self, path, box_image) -> float:
        """The finest grid of AutoZoom on which a box fills at most 90 % of the window (1 without a box)."""
        if box_image is None or self.config.max_zoom <= 1.0:
            return 1.0
        sess, _, _ = self._session(path, 1.0)
        lo, hi = _box_to_model(sess, box_image)
        extent, zoom = float((hi - lo).max()), 1.0
        while extent / zoom > 0.9 * self.model.img_size and zoom * self.config.zoom_step <= self.config.max_zoom + 1e-6:
            zoom *= self.config.zoom_step
        return zoom

    def _answer(self, sess, key, zoom, state, prompts, fg, bg, box_image, label, prior, may_zoom):
        """The answer on the grid of `zoom`, or None when `may_zoom` and the first window's mask reaches its edge."""
        cfg, size = self.config, self.model.img_size
        if state is None and prior is not None:  # a new sequence starts from the prior, as from a previous answer
            logits = (sess.mask_to_model(prior) * 2 - 1) * _PRIOR_LOGIT
            idx = (logits > 0).nonzero()
            box = (idx.min(0).values.numpy(), idx.max(0).values.numpy() + 1) if len(idx) else None
            state = _LabelState([prompts[-1]], OrderedDict(), logits.to(torch.float16), box, zoom)

        fg_m, bg_m = sess.image_to_model(fg), sess.image_to_model(bg)
        box_m = None
        if box_image is not None:
            box_m = np.stack(_box_to_model(sess, box_image))
            if not self.model.supports_boxes and len(fg_m) == 0:  # a click-only model gets the box's centre
                fg_m = box_m.mean(0, keepdims=True)
        # the structure's clicks or box; a correction with background clicks alone looks where the last one is
        anchor = fg_m.mean(0) if len(fg_m) else (box_m.mean(0) if box_m is not None else bg_m[-1])
        every_point = np.concatenate([fg_m, bg_m] + ([box_m] if box_m is not None else []))
        primary = None
        if state is not None and state.low_res:
            last = next(iter(state.low_res))
            if contains(last, size, every_point, cfg.reuse_margin):
                primary = last
        if primary is None:
            primary = window_start(anchor, size, sess.volume.shape)
            if len(fg_m) and not contains(primary, size, fg_m, 0):  # clicks spread wider than a window
                primary = window_start(fg_m[-1], size, sess.volume.shape)

        # where no window of this request looks, the previous answer (or the prior) stays as it was
        canvas = (
            state.canvas.clone()
            if state is not None
            else torch.full(sess.volume.shape, _EMPTY_LOGIT, dtype=torch.float16)
        )
        covered = torch.zeros(sess.volume.shape, dtype=torch.bool)  # what this request's windows have answered
        timings = {"encode": 0.0, "decode": 0.0}
        windows, low_res_out, scores = [], OrderedDict(), []
        queue, seen = [(primary, None)], {primary}
        while queue:
            start, seed = queue.pop(0)
            emb, t_enc = self._embedding(sess, key, zoom, start)
            t = time.perf_counter()
            mask_input = self._mask_input(state, start, canvas if seed is not None else None)
            low, score = self._decode(emb, start, fg_m, bg_m, box_m, seed, mask_input)
            scores.append(score)
            logits = F.interpolate(low, size=(size,) * 3, mode="trilinear", align_corners=False)[0, 0]
            self._paste(canvas, covered, logits.float().cpu(), start)
            self._synchronize()
            timings["encode"] += t_enc
            timings["decode"] += time.perf_counter() - t
            low_res_out[start] = low
            windows.append({"start": list(start), "size": size, "embedding_cached": t_enc == 0.0})
            faces = touched_faces(logits > 0, start, sess.volume.shape)
            if faces and may_zoom:
                return None
            if state is not None:  # a correction looks further only where it moved the mask's edge (nnInteractive)
                before = crop(state.canvas, start, size, _EMPTY_LOGIT) > 0
                faces = changed_faces(before, logits > 0, start, sess.volume.shape)
            for face in faces:
                nxt = neighbour_start(start, face, size, sess.volume.shape)
                if nxt not in seen and len(seen) < cfg.max_windows:
                    seen.add(nxt)
                    queue.append((nxt, start))

        if box_m is not None and not self.model.supports_boxes:  # the box is a hard limit for click-only models
            keep = torch.zeros_like(canvas, dtype=torch.bool)
            lo = np.clip(np.floor(box_m[0]).astype(int), 0, None)
            hi = np.ceil(box_m[1]).astype(int) + 1
            keep[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
            canvas[~keep] = _EMPTY_LOGIT

        t = time.perf_counter()
        lo = np.clip(np.min([w["start"] for w in windows], 0), 0, None)
        hi = np.minimum(np.max([w["start"] for w in windows], 0) + size, sess.volume.shape)
        if state is not None and state.box is not None:  # the box must also hold what stays of the previous answer
            lo, hi = np.minimum(lo, state.box[0]), np.maximum(hi, state.box[1])  # (no scan of the whole canvas)
        box_lo, box_hi = sess.model_box_to_image_box(lo, hi)
        mask = sess.to_image_grid(canvas[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], lo, box_lo, box_hi)
        timings["resample"] = time.perf_counter() - t

        self._states[(key, label)] = _LabelState(prompts, low_res_out, canvas, (lo, hi), zoom)
        self._states.move_to_end((key, label))
        while len(self._states) > self._max_states:
            self._states.popitem(last=False)
        info = {
            "model": self.model_name,
            "checkpoint": self.checkpoint,
            "windows": windows,
            "embedding_cached": windows[0]["embedding_cached"],
            "spacing": [s * zoom for s in cfg.spacing],
            "zoom": zoom,
            "voxels": int(mask.sum()),
            "score": float(np.mean(scores)),  # the network's own confidence (IoU head or mean foreground probability)
        }
        return SegmentResult(mask, sess.affine.copy(), timings, info)

    def _mask_input(self, state, start, canvas) -> torch.Tensor:
        s = self.model.low_res_size
        if state is not None and start in state.low_res and canvas is None:
            return state.low_res[start]
        source = canvas if canvas is not None else (state.canvas if state is not None else None)
        if source is None:
            return torch.zeros((1, 1, s, s, s), device=self.device)  # what SAM-Med3D feeds on a first click
        window = crop(source, start, self.model.img_size, _EMPTY_LOGIT).float()
        return F.interpolate(window[None, None], size=(s,) * 3, mode="trilinear", align_corners=False).to(self.device)

    def _decode(self, emb, start, fg_m, bg_m, box_m, seed, mask_input) -> tuple[torch.Tensor, float]:
        size = self.model.img_size
        origin = np.asarray(start, dtype=np.float64)
        pts = [(p - origin, 1) for p in fg_m] + [(p - origin, 0) for p in bg_m]
        pts = [(p, lab) for p, lab in pts if np.all(p >= 0) and np.all(p <= size - 1)]
        if seed is not None:  # a neighbour window: a click deep inside the part of the mask it already holds
            inner = interior_point((mask_input[0, 0] > 0).cpu().numpy())  # on the low-res grid: 64x cheaper
            if inner is not None:
                scale = size / mask_input.shape[-1]
                pts.append(((inner + 0.5) * scale - 0.5, 1))
        points = None
        if pts:
            coords = torch.tensor(np.array([p for p, _ in pts]), dtype=torch.float32, device=self.device)[None]
            labels = torch.tensor([lab for _, lab in pts], dtype=torch.int64, device=self.device)[None]
            points = (coords, labels)
        boxes = None
        if box_m is not None and self.model.supports_boxes:
            boxes = torch.tensor(box_m - origin, dtype=torch.float32, device=self.device)[None]
        with self._autocast():
            low, score = self.model.decode(emb, points=points, boxes=boxes, mask_input=mask_input)
        return low.float(), float(score.reshape(-1)[0])

    @staticmethod
    def _paste(canvas: torch.Tensor, covered: torch.Tensor, logits: torch.Tensor, start: tuple) -> None:
        """A window's answer replaces what an earlier request left; where this request's windows overlap, the
        union (max) of their answers."""
        src, dst = overlap(start, logits.shape[0], canvas.shape)
        new = logits[src].to(canvas.dtype)
        canvas[dst] = torch.where(covered[dst], torch.maximum(canvas[dst], new), new)
        covered[dst] = True

    def write_label(self, result: SegmentResult, path: str) -> None:
        """The mask as NIfTI with the image's affine; written to a temporary file, then moved into place."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{path.suffix if path.suffix != '.gz' else '.nii.gz'}")
        try:
            nib.save(nib.Nifti1Image(result.mask, result.affine), str(tmp))
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)


def point_engine_from_config(model_config: dict, device: str = "cpu") -> InteractiveEngine:
    """The model config's network and weights as an `InteractiveEngine` (what the point task serves)."""
    return InteractiveEngine(load_model(model_config), EngineConfig.from_dict(model_config), device=device)


def _box_to_model(sess: ImageSession, box_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model-grid (lo, hi) corners of the box that holds an image-grid box (2, 3)."""
    corners = sess.image_to_model(np.array(np.meshgrid(*box_image.T, indexing="ij")).reshape(3, -1).T)
    return corners.min(0), corners.max(0)


def _extends(prompts: list, previous: list) -> bool:
    """True when `prompts` keeps every foreground and every background click of `previous` (each list in its order)
    and the same roi: clients send the two lists apart, so a new foreground click follows the old background ones."""
    if prompts[-1] != previous[-1]:
        return False
    for positive in (True, False):
        new = [p for p in prompts[:-1] if p[3] is positive]
        old = [p for p in previous[:-1] if p[3] is positive]
        if new[: len(old)] != old:
            return False
    return True
