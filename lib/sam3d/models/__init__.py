"""torch.nn modules only: no file I/O, no MONAI Label."""

from .sam3d import PRESETS, Sam3D, Sam3DConfig, build_sam3d

__all__ = ["PRESETS", "Sam3D", "Sam3DConfig", "build_sam3d"]
