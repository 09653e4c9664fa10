"""sam3d: 3D Segment-Anything models served to annotators through MONAI Label."""

__version__ = "0.1.0"
