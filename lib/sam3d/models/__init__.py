"""torch.nn modules only: no file I/O, no MONAI Label."""

from .autosam3d.network import AUTOSAM3D_PRESETS, AutoSam3D, AutoSam3DConfig
from .refsam3d import REFSAM3D_PRESETS, RefSam3D, RefSam3DConfig
from .sam3d import PRESETS, Sam3D, Sam3DConfig, build_sam3d

# each variant: its presets, its config class, its network class
_VARIANTS = ((PRESETS, Sam3DConfig, Sam3D), (REFSAM3D_PRESETS, RefSam3DConfig, RefSam3D),
             (AUTOSAM3D_PRESETS, AutoSam3DConfig, AutoSam3D))


def build_network(preset: str, **overrides):
    """A network of any variant from its preset name (the name says the variant), with any size overridden."""
    for presets, config_class, network_class in _VARIANTS:
        if preset in presets:
            return network_class(config_class.from_dict({**presets[preset].to_dict(), **overrides}))
    known = sorted(p for presets, _, _ in _VARIANTS for p in presets)
    raise ValueError(f"unknown model preset {preset!r}; known: {known}")


__all__ = ["AUTOSAM3D_PRESETS", "AutoSam3D", "AutoSam3DConfig", "PRESETS", "REFSAM3D_PRESETS", "RefSam3D",
           "RefSam3DConfig", "Sam3D", "Sam3DConfig", "build_network", "build_sam3d"]
