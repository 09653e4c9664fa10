"""Whether an image's slices look like the slices an auto model was trained on (the model knows when it does not).

Each axial slice's encoder features, their mean and spread over the slice, are one point in 2C dimensions. The
model's training slices give the mean and the spread of those points per dimension; a slice's distance is the root
mean square of its standardised dimensions, sqrt(mean_c ((f_c - mean_c) / std_c)^2), and the slice is familiar
when that distance is at most `threshold`: the largest distance of a training slice times a margin. The auto engine
labels familiar slices only, and refuses an image with none (a brain MR for an abdominal model, an image with no
body in it) with a message that says so, instead of answering a confident organ in the wrong body part.

`scripts/fit_familiarity.py` measures the training slices and stores the result in the checkpoint's config
(`familiarity: {mean, std, threshold, slices, margin}`).
"""

from dataclasses import dataclass

import torch


def slice_points(features: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) encoder features -> (N, 2C) float32: each slice's mean and spread of every channel."""
    f = features.float()
    return torch.cat([f.mean(dim=(2, 3)), f.std(dim=(2, 3))], dim=1)


@dataclass
class Familiarity:
    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)
    threshold: float
    slices: int = 0  # training slices measured
    margin: float = 1.0

    @classmethod
    def fit(cls, points: torch.Tensor, margin: float = 1.3) -> "Familiarity":
        """From the (N, C) points of the training slices."""
        if points.ndim != 2 or len(points) < 2:
            raise ValueError(f"need the points of at least 2 training slices, got shape {tuple(points.shape)}")
        mean, std = points.mean(0), points.std(0).clamp_min(1e-6)
        fam = cls(mean, std, threshold=0.0, slices=len(points), margin=float(margin))
        fam.threshold = float(fam.distances(points).max()) * float(margin)
        return fam

    def distances(self, points: torch.Tensor) -> torch.Tensor:
        """(N,) distance of each slice's point to the training slices' mean, in training standard deviations."""
        z = (points.float() - self.mean) / self.std
        return z.pow(2).mean(1).sqrt()

    def familiar(self, points: torch.Tensor) -> torch.Tensor:
        return self.distances(points) <= self.threshold

    def to_dict(self) -> dict:
        return {
            "mean": [round(float(v), 6) for v in self.mean],
            "std": [round(float(v), 6) for v in self.std],
            "threshold": round(self.threshold, 6),
            "slices": self.slices,
            "margin": self.margin,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Familiarity":
        mean, std = torch.tensor(d["mean"], dtype=torch.float32), torch.tensor(d["std"], dtype=torch.float32)
        if mean.shape != std.shape or mean.ndim != 1:
            raise ValueError("familiarity: mean and std must be lists of the same length")
        return cls(mean, std, float(d["threshold"]), int(d.get("slices", 0)), float(d.get("margin", 1.0)))
