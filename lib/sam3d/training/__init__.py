"""Training: recipes, one step per kind of model (point, text, auto), losses, and the (distributed) ignite run."""

from .config import load_recipe
from .interactive import InteractiveConfig
from .losses import build_loss
from .point_step import PointStep
from .step import TrainingStep
from .trainer import STEPS, build_model, lr_factor, train
from .validation import validate

__all__ = [
    "STEPS",
    "InteractiveConfig",
    "PointStep",
    "TrainingStep",
    "build_loss",
    "build_model",
    "load_recipe",
    "lr_factor",
    "train",
    "validate",
]
