"""Training: recipes, the interactive click loop, losses, and the (distributed) ignite run."""

from .config import load_recipe
from .interactive import InteractiveConfig, InteractiveLoss
from .losses import build_loss
from .trainer import build_model, lr_factor, train, validate

__all__ = ["InteractiveConfig", "InteractiveLoss", "build_loss", "build_model", "load_recipe", "lr_factor", "train",
           "validate"]
