"""sam3d: 3D Segment-Anything models served to annotators through MONAI Label."""

__version__ = "0.1.0"

from .predictor import Sam3DPredictor  # noqa: E402

__all__ = ["Sam3DPredictor", "__version__"]
