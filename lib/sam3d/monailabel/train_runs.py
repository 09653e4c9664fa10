"""A training run's folder and process: which images train and which validate, the datastore laid out for the
pipeline, the run's progress read back from its files, and runs whose process is gone marked stopped.

A run lives in `<state>/train/<run>/`: `run.json` (parameters, split, status, validation, promotion),
`metrics.csv` (the pipeline's step rows), `model.safetensors`, `data/` and `val/` (links to the datastore's
images and final labels). Run names sort in start order.
"""

import csv
import hashlib
import json
import math
import threading
import time
import uuid
from pathlib import Path

from ..engine.checkpoint import atomic_write


def _fraction(image_id: str) -> float:
    return int(hashlib.sha256(image_id.encode()).hexdigest()[:12], 16) / 16**12


def split_ids(ids: list[str], val_split: float) -> tuple[list[str], list[str]]:
    """(train, validation): an image validates when the hash of its id falls below `val_split`, so it keeps its
    side as images are added; at least one image trains, and one validates when there are two or more."""
    if len(ids) < 2 or val_split <= 0:
        return sorted(ids), []
    ranked = sorted(ids, key=_fraction)
    n_val = sum(_fraction(i) < val_split for i in ids)
    n_val = min(len(ids) - 1, max(1, n_val))
    return sorted(ranked[n_val:]), sorted(ranked[:n_val])


def nifti_suffix(path: str) -> str | None:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else ".nii" if name.endswith(".nii") else None


def link_datastore(sources: list[tuple[str, str, str]], folder: Path, keep: list[int] | None = None) -> list:
    """A local-datastore layout (`<id>.nii.gz`, `labels/final/<id>.nii.gz`) for the pipeline's `data.datastore`:
    links, except a label restricted to the values `keep` (an image holding none of them is left out) or stored
    with another NIfTI suffix than its image, which is rewritten. Returns the (id, image, label) it laid out."""
    import nibabel as nib
    import numpy as np

    (folder / "labels" / "final").mkdir(parents=True, exist_ok=True)
    out = []
    for i, (image_id, image, label) in enumerate(sources):
        suffix = nifti_suffix(image)
        name = f"{i:05d}_{''.join(c if c.isalnum() else '_' for c in image_id)}{suffix}"
        dst = folder / "labels" / "final" / name
        if keep:
            lab = nib.load(label)
            arr = np.asanyarray(lab.dataobj)
            arr = np.where(np.isin(arr, keep), arr, 0).astype(arr.dtype)
            if not arr.any():
                continue
            nib.save(nib.Nifti1Image(arr, lab.affine, lab.header), str(dst))
        elif nifti_suffix(label) == suffix:
            dst.symlink_to(Path(label).resolve())
        else:
            nib.save(nib.load(label), str(dst))
        (folder / name).symlink_to(Path(image).resolve())
        out.append((image_id, str(folder / name), str(dst)))
    return out


def read_metrics(run: Path) -> dict | None:
    """The last row of the pipeline's metrics.csv (step, loss, dice_first, dice_last, lr, ...), or None."""
    try:
        with open(run / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return None
    return rows[-1] if rows else None


def progress(run: Path) -> dict:
    """What a run reports: run.json (params, split, validation, promotion) with the latest training step."""
    try:
        info = json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    last = read_metrics(run)
    if last:
        step = int(last["step"])
        info.update(
            step=step,
            loss=float(last["loss"]),
            train_dice=float(last["dice_last"]),
            lr=float(last["lr"]),
            epoch=math.ceil(step / max(info.get("steps_per_epoch", 1), 1)),
        )
    return info


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, default=str)))


def new_run_dir(runs_dir: Path) -> Path:
    """A fresh run folder name; names sort in start order, also for runs started within the same second."""
    now = time.time_ns()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now // 10**9))
    return runs_dir / f"{stamp}-{now % 10**9:09d}-{uuid.uuid4().hex[:6]}"


def latest_run(runs_dir: Path) -> Path | None:
    runs = sorted(p for p in runs_dir.glob("*/run.json")) if runs_dir.is_dir() else []
    return runs[-1].parent if runs else None


def mark_stopped_runs(runs_dir: Path) -> None:
    """A run still `running` that is none of this server's training processes was stopped (DELETE /train, which
    does not wait for the process to end), crashed, or died with an earlier server: say so in its folder."""
    from monailabel.utils.async_tasks.utils import processes

    running = {p.pid for p in processes("train").values()}
    for path in runs_dir.glob("*/run.json") if runs_dir.is_dir() else []:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if info.get("status") == "running" and info.get("pid") not in running:
            write_json(path, {**info, "status": "stopped", "finished": time.time()})


def report(run: Path, stop: threading.Event, every_s: float = 5.0) -> None:
    """Progress lines on stdout until `stop`: MONAI Label keeps a training process's last lines in GET /train
    `details`."""
    last = None
    while not stop.wait(every_s):
        line = progress_line(progress(run))
        if line != last:
            print(f"sam3d train: {line}", flush=True)
            last = line


def progress_line(info: dict) -> str:
    """One line of a run's progress (the training process prints them; GET /train shows the last ones)."""
    if not info:
        return "no progress yet"
    parts = [
        f"status={info.get('status')}",
        f"step={info.get('step', 0)}/{info.get('steps')}",
        f"epoch={info.get('epoch', 0)}/{info.get('epochs')}",
    ]
    for key in ("loss", "train_dice", "val_dice", "val_dice_served"):
        if info.get(key) is not None:
            parts.append(f"{key}={info[key]:.4f}")
    if "promoted" in info:
        parts.append(f"promoted={info['promoted']} ({info.get('reason')})")
    return " ".join(parts)
