"""torch.nn modules only: no file I/O, no MONAI Label."""

from .autosam3d.network import AUTOSAM3D_PRESETS, AutoSam3D, AutoSam3DConfig
from .autoseg3d import AUTOSEG3D_PRESETS, AutoSeg3D, AutoSeg3DConfig
from .clicknet import CLICKNET_PRESETS, ClickNet3D, ClickNetConfig
from .refsam3d import REFSAM3D_PRESETS, RefSam3D, RefSam3DConfig
from .sam3d import PRESETS, Sam3D, Sam3DConfig, build_sam3d

# each variant: its presets, its config class, its network class, and its kind: what a user gives it
# (point: clicks and boxes; text: a name, then clicks; auto: nothing, every class at once)
_VARIANTS = (
    (PRESETS, Sam3DConfig, Sam3D, "point"),
    (REFSAM3D_PRESETS, RefSam3DConfig, RefSam3D, "text"),
    (AUTOSAM3D_PRESETS, AutoSam3DConfig, AutoSam3D, "auto"),
    (AUTOSEG3D_PRESETS, AutoSeg3DConfig, AutoSeg3D, "auto"),
    (CLICKNET_PRESETS, ClickNetConfig, ClickNet3D, "point"),
)
KINDS = ("point", "text", "auto")


def model_kind(preset: str) -> str:
    """The kind of model a preset builds: point, text or auto."""
    for presets, _, _, kind in _VARIANTS:
        if preset in presets:
            return kind
    raise ValueError(f"unknown model preset {preset!r}; known: {sorted(p for v in _VARIANTS for p in v[0])}")


def build_network(preset: str, **overrides):
    """A network of any variant from its preset name (the name says the variant), with any size overridden."""
    for presets, config_class, network_class, _ in _VARIANTS:
        if preset in presets:
            return network_class(config_class.from_dict({**presets[preset].to_dict(), **overrides}))
    known = sorted(p for presets, *_ in _VARIANTS for p in presets)
    raise ValueError(f"unknown model preset {preset!r}; known: {known}")


__all__ = [
    "AUTOSAM3D_PRESETS",
    "AutoSam3D",
    "AutoSam3DConfig",
    "AUTOSEG3D_PRESETS",
    "AutoSeg3D",
    "AutoSeg3DConfig",
    "CLICKNET_PRESETS",
    "ClickNet3D",
    "ClickNetConfig",
    "PRESETS",
    "REFSAM3D_PRESETS",
    "RefSam3D",
    "RefSam3DConfig",
    "Sam3D",
    "Sam3DConfig",
    "KINDS",
    "build_network",
    "build_sam3d",
    "model_kind",
]
