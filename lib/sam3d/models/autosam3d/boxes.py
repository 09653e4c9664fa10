"""Per-class boxes of a label slice, normalised (cx, cy, w, h) with x along the last axis: anchors and targets."""

import torch


def label_boxes(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W) class indices (0 background, 1..K) -> boxes (B, K, 4) in [0, 1] and present (B, K) bool.

    A box spans its pixels' edges (a one-pixel class has width 1/W); absent classes get a zero box.
    """
    b, h, w = labels.shape
    classes = torch.arange(1, num_classes + 1, device=labels.device)
    onehot = labels[:, None] == classes[None, :, None, None]  # (B, K, H, W)
    rows, cols = onehot.any(3), onehot.any(2)  # (B, K, H), (B, K, W)
    present = rows.any(2)

    def span(mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(n, device=mask.device, dtype=torch.float32)
        lo = torch.where(mask, idx, float(n)).amin(-1)
        hi = torch.where(mask, idx, -1.0).amax(-1) + 1
        return lo / n, hi / n

    y0, y1 = span(rows, h)
    x0, x1 = span(cols, w)
    boxes = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
    return torch.where(present[..., None], boxes, torch.zeros_like(boxes)), present
