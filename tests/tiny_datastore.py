"""A MONAI Label datastore of small synthetic volumes and a tiny sam3d checkpoint, for the learning tests.

Each image holds two ellipsoids (label values 1 and 2) brighter than a noisy background, 2 mm voxels; the tiny
network is the smoke recipe's (32^3 windows), so training and validation take seconds on one CPU thread.
"""

from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(28, 26, 24), (24, 28, 26), (26, 26, 26), (26, 24, 28)]
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def tiny_network() -> dict:
    return yaml.safe_load((REPO / "configs" / "train" / "smoke.yaml").read_text())["model"]["network"]


def volume(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label int16) number n: two ellipsoids shifted by n voxels."""
    shape = SHAPES[n % len(SHAPES)]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    label = np.zeros(shape, np.int16)
    for value, (c, r) in enumerate([((8, 9, 10), (5, 4, 6)), ((17, 16, 13), (4, 6, 5))], 1):
        label[(((grid - np.add(c, n % 3)) / r) ** 2).sum(-1) <= 1] = value
    image = 100 + 200 * label + np.random.default_rng(n).normal(0, 10, shape)
    return image.astype(np.float32), label


def write_studies(folder: Path, n_images: int, labelled=()) -> list[str]:
    """Images `img<n>.nii.gz` in `folder`, final labels for the numbers in `labelled`; returns the image ids."""
    (folder / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for n in range(n_images):
        image, label = volume(n)
        nib.save(nib.Nifti1Image(image, AFFINE), str(folder / f"img{n}.nii.gz"))
        if n in labelled:
            write_label(label, folder / "labels" / "final" / f"img{n}.nii.gz")
    return [f"img{n}" for n in range(n_images)]


def write_label(label: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(label, AFFINE), str(path))
    return path


def write_tiny_model(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """(model config YAML, checkpoint): random tiny weights, the engine settings of the smoke recipe."""
    import torch

    from sam3d.engine.checkpoint import save_checkpoint
    from sam3d.models import build_sam3d

    folder.mkdir(parents=True, exist_ok=True)
    net = tiny_network()
    torch.manual_seed(seed)
    ckpt = folder / "tiny.safetensors"
    save_checkpoint(build_sam3d("sam3d_small", **net), ckpt, {"preset": "sam3d_small", "network": net})
    config = folder / "tiny_config.yaml"  # not tiny.yaml: that is the checkpoint's sidecar
    config.write_text(
        yaml.safe_dump(
            {
                "preset": "sam3d_small",
                "network": net,
                "checkpoint": str(ckpt),
                "spacing": [1.5, 1.5, 1.5],
                "intensity": {"clip": None, "normalize": "zscore_foreground"},
            }
        )
    )
    return config, ckpt
