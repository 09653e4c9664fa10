"""A whole volume in, every class the model knows out: 3D-SAutoMed's slice-by-slice inference.

The image goes to the model grid as for clicks (`ImageSession`: RAS, the model spacing), is normalised as one
window, and its axial slices (the last, S, axis) are padded to squares and resized to the network's slice size.
Every slice is encoded once; then the slices are segmented in order, each step reading slices t-1, t, t+1,
the history token and the boxes of the slice before. Order `middle` (the paper's best) starts at the middle
slice and runs to both ends, the two branches side by side as one batch, each carrying the middle slice's
state; `top_down` runs from the top (superior) slice to the bottom. The class logits of each slice are resized
back, the argmax (background first) makes one label per voxel, and the label volume is resampled (nearest) onto
the image's own grid: same shape and affine as the image, values 1..K in the order of the model's class names.

The 3D candidate (`sam3d.models.AutoSeg3D`, issue 19) labels the same normalised volume on its model grid by
sliding windows of its `img_size`^3 (overlap 0.25, Gaussian blending; beyond the scan, its minimum, as it trains),
then the softmax's argmax; everything else (the image grid, the confidence, the messages) is the slice model's.

A checkpoint that carries `familiarity` (`sam3d.engine.familiarity`) has only the slices that look like its
training slices labelled; an image with none is refused (Sam3DInputError, HTTP 422) with a message that says so.
Every answer reports, per class, its confidence: the mean probability of the class over the voxels given it, and
an answer without any class a `message` that says so (a model trained with negatives answers a brain that way).
"""

import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import SpatialResample

from ..models.autosam3d.boxes import label_boxes
from ..models.autoseg3d import AutoSeg3D
from .cache import ByteLRU
from .checkpoint import LoadedModel, load_model
from .errors import Sam3DInputError
from .familiarity import Familiarity, slice_points
from .image_session import ImageKey, ImageSession
from .interactive import EngineConfig, InteractiveEngine, SegmentResult, normalize_window, precision_context

ORDERS = ("middle", "top_down")
WINDOWS = "sliding_window"  # the 3D model's traversal, reported as its order: it has no slice order


def slice_schedule(n: int, order: str) -> list[list[tuple[int, int]]]:
    """Steps of (slice, branch) pairs. Branch 0 runs first; a branch that starts later inherits branch 0's state."""
    if order == "middle":
        m = n // 2
        steps = [[(m, 0)]]
        for i in range(1, max(m, n - 1 - m) + 1):
            steps.append([(t, b) for t, b in ((m + i, 0), (m - i, 1)) if 0 <= t < n])
        return steps
    if order == "top_down":
        return [[(t, 0)] for t in range(n - 1, -1, -1)]
    raise ValueError(f"unknown slice order {order!r}: use one of {', '.join(ORDERS)}")


class SliceGeometry:
    """In-plane (X, Y) -> centred square of side max(X, Y) -> (size, size), and back."""

    def __init__(self, shape_xy: tuple[int, int], size: int) -> None:
        self.shape, self.size = shape_xy, size
        self.side = max(shape_xy)
        self.pad = [(self.side - s) // 2 for s in shape_xy]

    def to_model(self, slices: torch.Tensor, fill: float, mode: str = "bilinear") -> torch.Tensor:
        """(N, X, Y) -> (N, 1, size, size); label maps with mode="nearest" (training)."""
        (px, py), (x, y) = self.pad, self.shape
        sq = slices.new_full((slices.shape[0], 1, self.side, self.side), fill)
        sq[:, 0, px : px + x, py : py + y] = slices
        if mode == "nearest":
            return F.interpolate(sq, size=(self.size, self.size), mode="nearest-exact")
        return F.interpolate(sq, size=(self.size, self.size), mode=mode, align_corners=False)

    def to_slice(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) logits -> (N, C, X, Y), bilinear, padding cut off."""
        (px, py), (x, y) = self.pad, self.shape
        up = F.interpolate(logits.float(), size=(self.side, self.side), mode="bilinear", align_corners=False)
        return up[:, :, px : px + x, py : py + y]


class AutoEngine:
    """Thread-safe; one per served model. `segment(image)` -> a label volume of every class (a `SegmentResult`)."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        device: str = "cpu",
        order: str = "middle",
        encode_batch: int = 8,
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"unknown slice order {order!r}: use one of {', '.join(ORDERS)}")
        self.config = config or EngineConfig()
        self.device = torch.device(device)
        self.model = loaded.model.to(self.device).eval()
        self.checkpoint = loaded.checkpoint
        self.model_name, self.model_id = loaded.display_name, loaded.model_id
        self.windowed = isinstance(self.model, AutoSeg3D)  # a 3D network: sliding windows, no slice order
        self.order, self.encode_batch = WINDOWS if self.windowed else order, int(encode_batch)
        self.class_names = list(self.model.class_names)
        known = (loaded.saved or {}).get("familiarity")  # measured on the slice encoder's features
        self.familiarity = Familiarity.from_dict(known) if known and not self.windowed else None
        # answers per (image, weights, order): the same request again costs nothing (cache_mb of the model config)
        self._results = ByteLRU(self.config.cache_mb << 20, sizeof=lambda r: r.mask.nbytes)
        self._lock = threading.Lock()

    @property
    def label_names(self) -> dict[str, int]:
        return {name: i + 1 for i, name in enumerate(self.class_names)}

    def segment(self, image_path: str, order: str | None = None) -> SegmentResult:
        order = order or self.order
        if order not in (*ORDERS, self.order):
            raise Sam3DInputError(f"unknown slice order {order!r}: use one of {', '.join(ORDERS)}")
        if self.windowed:  # any slice order asked gives the one answer
            order = WINDOWS
        key = (ImageKey.of(image_path), self.model_id, order)
        with self._lock:  # one volume at a time: a second request for it waits and gets the cached answer
            cached = self._results.get(key)
            if cached is not None:
                return SegmentResult(cached.mask, cached.affine, {"cached": 0.0}, {**cached.info, "cached": True})
            result = self._segment(image_path, order)
            self._results.put(key, result)
            return result

    def load(self, image_path: str) -> tuple[ImageSession, torch.Tensor]:
        """The image on the model grid and its volume (X, Y, Z) normalised as one window."""
        sess = ImageSession(image_path, self.config.spacing, self.config.max_voxels)
        return sess, normalize_window(sess.volume, self.config, sess.hounsfield)

    def slices(self, vol: torch.Tensor) -> tuple[SliceGeometry, torch.Tensor]:
        """The slice geometry of a normalised volume and its axial slices as the slice network takes them."""
        geo = SliceGeometry(tuple(vol.shape[:2]), self.model.img_size)
        return geo, geo.to_model(vol.permute(2, 0, 1), fill=float(vol.min())).to(self.device)

    def prepare(self, image_path: str) -> tuple[ImageSession, SliceGeometry, torch.Tensor]:
        """The image on the model grid, its slice geometry and its axial slices as the network takes them."""
        sess, vol = self.load(image_path)
        return (sess, *self.slices(vol))

    @torch.no_grad()
    def encode(self, slices: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) slices -> (N, C, h, w) features, `encode_batch` slices at a time."""
        feats = torch.cat(
            [self.model.encode(slices[i : i + self.encode_batch]) for i in range(0, len(slices), self.encode_batch)]
        )
        self._synchronize()
        return feats

    @torch.no_grad()
    def _segment(self, image_path: str, order: str) -> SegmentResult:
        timings, t0 = {}, time.perf_counter()
        sess, vol = self.load(image_path)
        timings["load"] = time.perf_counter() - t0
        labels, confidence, details = self._label_volume(vol, order, timings)
        t = time.perf_counter()
        mask = self._to_image_grid(sess, labels)
        timings["resample"] = time.perf_counter() - t
        info = {
            "model": self.model_name,
            "checkpoint": self.checkpoint,
            "order": order,
            **details,
            "label_names": self.label_names,
            "cached": False,
            "voxels": {n: int((mask == v).sum()) for n, v in self.label_names.items()},
            "confidence": {n: round(c, 3) for n, c in zip(self.class_names, confidence) if c is not None},
        }
        if not any(info["voxels"].values()):
            info["message"] = (
                f"{self.model_name} found none of {', '.join(self.class_names)} in this image; a click model "
                "segments anything"
            )
        return SegmentResult(mask, sess.affine, timings, info)

    def _label_volume(self, vol: torch.Tensor, order: str, timings: dict) -> tuple[torch.Tensor, list, dict]:
        """The model-grid label volume of a normalised volume (X, Y, Z), the confidence per class (as
        `_run_slices`) and what the answer's info says about it; each network its own way."""
        if self.windowed:
            return self._label_windows(vol, timings)
        return self._label_slices(vol, order, timings)

    def _label_slices(self, vol: torch.Tensor, order: str, timings: dict) -> tuple[torch.Tensor, list, dict]:
        t = time.perf_counter()
        geo, slices = self.slices(vol)
        timings["load"] += time.perf_counter() - t
        t = time.perf_counter()
        feats = self.encode(slices)
        timings["encode"], t = time.perf_counter() - t, time.perf_counter()
        familiar = torch.ones(len(feats), dtype=torch.bool)
        if self.familiarity is not None:
            familiar = self.familiarity.familiar(slice_points(feats)).cpu()
            if not familiar.any():
                raise Sam3DInputError(
                    f"{self.model_name} answers nothing for this image: none of its {len(feats)} slices looks like "
                    f"the scans it was trained on ({', '.join(self.class_names)}); a click model segments anything"
                )
        labels, confidence = self._run_slices(feats, geo, order, familiar)
        timings["decode"] = time.perf_counter() - t
        return labels, confidence, {"slices": len(feats), "familiar_slices": int(familiar.sum())}

    def _label_windows(self, vol: torch.Tensor, timings: dict) -> tuple[torch.Tensor, list, dict]:
        """Sliding windows over the whole volume; every slice is labelled (no familiarity for this network)."""
        t = time.perf_counter()
        k, s = self.model.num_classes, self.model.img_size
        with precision_context(self.config.precision, self.device)():
            logits = sliding_window_inference(
                vol[None, None].to(self.device),
                (s, s, s),
                sw_batch_size=2,
                predictor=self.model,
                overlap=0.25,
                mode="gaussian",
                cval=float(vol.min()),  # beyond the scan: its minimum, as the training windows are padded
            )
        prob, label = logits.float().softmax(1).max(1)  # (1, X, Y, Z)
        self._synchronize()
        labels = label[0].to(torch.uint8 if k < 256 else torch.int16).cpu()
        prob_sum, voxels = self._tally(label, prob, k)
        timings["decode"] = time.perf_counter() - t
        n = int(vol.shape[2])
        return labels, self._confidence(prob_sum, voxels), {"slices": n, "familiar_slices": n}

    def _run_slices(
        self, feats: torch.Tensor, geo: SliceGeometry, order: str, familiar: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list]:
        """Model-grid label volume (X, Y, Z) uint8/int16 from the slices' features, stepping as `order` says, and
        per class the mean probability over its voxels (None for a class no voxel got). A slice that is not
        `familiar` still carries the history and boxes to the next one, but gets no label and no say in the
        confidence."""
        n, k = feats.shape[0], self.model.num_classes
        familiar = torch.ones(n, dtype=torch.bool) if familiar is None else familiar
        out = torch.zeros((*geo.shape, n), dtype=torch.uint8 if k < 256 else torch.int16)
        prob_sum, voxels = torch.zeros(k + 1, dtype=torch.float64), torch.zeros(k + 1, dtype=torch.float64)
        state: dict[int, tuple] = {}  # branch -> (history (1, K_his, C) | None, boxes (1, K, 4) | None, present)
        for step in slice_schedule(n, order):
            ts = [t for t, _ in step]
            prev = [state.get(b, state.get(0, (None, None, None))) for _, b in step]
            history = None if prev[0][0] is None else torch.cat([p[0] for p in prev])
            boxes = None if prev[0][1] is None else torch.cat([p[1] for p in prev])
            present = None if prev[0][2] is None else torch.cat([p[2] for p in prev])
            if history is None:
                history = self.model.initial_history(len(ts))
            res = self.model.step(
                feats[[max(t - 1, 0) for t in ts]],
                feats[ts],
                feats[[min(t + 1, n - 1) for t in ts]],
                history,
                boxes,
                present,
            )
            low = res["logits"].argmax(1)  # the prediction's own grid: the boxes the next slice starts from
            new_boxes, new_present = label_boxes(low, k)
            for i, (_, b) in enumerate(step):
                h = None if res["history"] is None else res["history"][i : i + 1]
                state[b] = (h, new_boxes[i : i + 1], new_present[i : i + 1])
            prob, label = geo.to_slice(res["logits"]).softmax(1).max(1)
            label = label * familiar[ts].to(label.device)[:, None, None]
            out[..., ts] = label.permute(1, 2, 0).to(out.dtype).cpu()
            p, c = self._tally(label, prob, k)
            prob_sum += p
            voxels += c
        return out, self._confidence(prob_sum, voxels)

    @staticmethod
    def _tally(label: torch.Tensor, prob: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per label value 0..k: the sum of the winning probability over its voxels, and their count."""
        label = label.flatten().cpu()
        return (
            torch.bincount(label, prob.flatten().double().cpu(), minlength=k + 1),
            torch.bincount(label, minlength=k + 1),
        )

    @staticmethod
    def _confidence(prob_sum: torch.Tensor, voxels: torch.Tensor) -> list:
        """Per class the mean probability over the voxels given it (None for a class no voxel got)."""
        return [float(p / v) if v else None for p, v in zip(prob_sum[1:], voxels[1:])]

    @staticmethod
    def _to_image_grid(sess: ImageSession, labels: torch.Tensor) -> np.ndarray:
        """Nearest-neighbour: labels stay labels (a class-wise bilinear pass would cost K resamplings)."""
        src = MetaTensor(labels[None].float(), affine=torch.as_tensor(sess.model_affine))
        out = SpatialResample(mode="nearest", padding_mode="zeros")(
            src, dst_affine=torch.as_tensor(sess.affine), spatial_size=sess.shape
        )
        dtype = np.uint8 if labels.dtype == torch.uint8 else np.int16
        return out.as_tensor()[0].round().numpy().astype(dtype)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    write_label = InteractiveEngine.write_label  # a label volume is written like a mask: NIfTI, atomically


def auto_engine_from_config(model_config: dict, device: str = "cpu") -> AutoEngine:
    """The model config's network and weights as an `AutoEngine` (keys `order`, `encode_batch`, the engine's)."""
    return AutoEngine(
        load_model(model_config),
        EngineConfig.from_dict(model_config),
        device=device,
        order=model_config.get("order", "middle"),
        encode_batch=int(model_config.get("encode_batch", 8)),
    )
