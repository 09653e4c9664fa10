"""Test models with the engine's model interface and outputs a test can predict.

Use them through a model config's factory (tests/ on PYTHONPATH, for a server subprocess too)::

    {"factory": "fakes:build_ball_model", "ball_radius": 3, "spacing": [1.5, 1.5, 1.5], ...}
"""

import threading

import torch
from torch import nn


class BallModel(nn.Module):
    """A 'segmenter' whose mask is a ball around the first positive click.

    `img_size == low_res_size == 128`, so the engine's upsampling of the low-res logits is the identity and the
    logits a test reasons about are the ones decoded: `radius - distance(voxel, click)` in window voxel indices
    (coordinate d of a point indexes spatial axis d of the window). Without a positive click every logit is
    negative. `encode_calls` counts the image encoder's runs.
    """

    name = "ball"
    img_size = 128
    low_res_size = 128
    supports_boxes = False

    def __init__(self, radius: float = 3.0) -> None:
        super().__init__()
        self.radius = float(radius)
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # so .to(device) and .parameters() work
        self.encode_calls = 0
        self.decode_calls = 0
        self._count_lock = threading.Lock()
        s = self.img_size
        grid = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float32),) * 3, indexing="ij"), dim=-1)
        self.register_buffer("grid", grid, persistent=False)  # (s, s, s, 3) voxel indices

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or tuple(x.shape[2:]) != (self.img_size,) * 3:
            raise ValueError(f"BallModel expects (B, 1, {self.img_size}, ...) windows, got {tuple(x.shape)}")
        with self._count_lock:
            self.encode_calls += 1
        return x.new_zeros((x.shape[0], 1, 1, 1, 1))  # tiny: the cache should hold many

    def decode(self, image_embedding, points=None, boxes=None, mask_input=None, multimask_output=False):
        with self._count_lock:
            self.decode_calls += 1
        b = image_embedding.shape[0]
        s = self.low_res_size
        logits = torch.full((b, 1, s, s, s), -10.0, device=image_embedding.device)
        if points is not None:
            coords, labels = points
            for i in range(b):
                positive = coords[i][labels[i] == 1]
                if len(positive):
                    dist = (self.grid.to(coords.device) - positive[0].float()).norm(dim=-1)
                    logits[i, 0] = self.radius - dist
        if multimask_output:
            logits = logits.repeat(1, 3, 1, 1, 1)
        iou = torch.ones(logits.shape[:2], device=logits.device)
        return logits, iou


def build_ball_model(config: dict | None = None) -> BallModel:
    """The factory a model config names: `factory: "fakes:build_ball_model"`, radius from `ball_radius`."""
    config = config or {}
    return BallModel(radius=float(config.get("ball_radius", 3.0)))
