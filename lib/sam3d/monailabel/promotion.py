"""Putting a fine-tuned checkpoint in the served checkpoint's place, keeping the previous one for rollback.

The served file is replaced with one `os.replace` (`sam3d.engine.checkpoint.atomic_write`), so the infer task,
which reloads a checkpoint whose file changed (`Sam3DInferTask.engine`), sees the old weights or the new ones,
never half a file. Before that, the served file is copied to `<stem>.prev<suffix>` (and its `<stem>.yaml` to
`<stem>.prev.yaml`); rolling back is moving those back. A run killed at any point leaves the served file whole:
the copy to `.prev` happens first and the replace last.
"""

import logging
import shutil
from pathlib import Path

import torch

from ..engine.checkpoint import atomic_write, read_state_dict

logger = logging.getLogger(__name__)

POLICIES = ("better", "always", "never")


def previous_path(served: Path) -> Path:
    """`models/x.safetensors` -> `models/x.prev.safetensors`."""
    return served.with_name(f"{served.stem}.prev{served.suffix}")


def should_promote(policy: str, new_dice: float | None, served_dice: float | None) -> tuple[bool, str]:
    """(promote?, why): `better` keeps the new model when its validation Dice is at least the served one's."""
    if policy == "never":
        return False, "promotion disabled (promote=never)"
    if policy == "always":
        return True, "promote=always"
    if served_dice is None:
        return True, "no served model to compare with"
    if new_dice is None:
        return False, "the new model has no validation Dice"
    if new_dice >= served_dice:
        return True, f"validation Dice {new_dice:.4f} >= served {served_dice:.4f}"
    return False, f"validation Dice {new_dice:.4f} < served {served_dice:.4f}: the served model stays"


def _copy(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def promote(new: Path, served: Path) -> Path | None:
    """Replace `served` by `new` (our safetensors + yaml); returns the kept previous file, if there was one.

    A served `.pth` (SAM-Med3D's format) gets the new weights as a bare state_dict in the same file name, which
    `read_state_dict` loads with `weights_only=True`; its model config still describes the network.
    """
    served.parent.mkdir(parents=True, exist_ok=True)
    prev = None
    if served.is_file():
        prev = previous_path(served)
        _copy(served, prev)
        if served.with_suffix(".yaml").is_file():
            _copy(served.with_suffix(".yaml"), prev.with_suffix(".yaml"))
    if served.suffix == ".safetensors":
        _copy(new, served)  # the network config travels inside the file; the yaml below is for people
        if new.with_suffix(".yaml").is_file():
            _copy(new.with_suffix(".yaml"), served.with_suffix(".yaml"))
    else:
        state = read_state_dict(new)
        atomic_write(served, lambda tmp: torch.save(state, tmp))
    logger.info(f"promoted {new} -> {served} (previous kept at {prev})")
    return prev
