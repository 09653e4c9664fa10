"""Inference: an image plus prompts in, a label volume on the image's own grid out."""

from .checkpoint import LoadedModel, WeightsMissingError, load_model, read_state_dict, save_checkpoint
from .errors import Sam3DInputError
from .interactive import EngineConfig, InteractiveEngine, SegmentResult

__all__ = [
    "EngineConfig",
    "InteractiveEngine",
    "LoadedModel",
    "Sam3DInputError",
    "SegmentResult",
    "WeightsMissingError",
    "load_model",
    "read_state_dict",
    "save_checkpoint",
]
