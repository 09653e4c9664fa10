"""`sam3d`: MONAI Label's train task, fine-tuning the served point model on the datastore's final labels.

How it runs: MONAI Label's own subprocess mode. `POST /train/sam3d` makes the server start
`python -m monailabel.interfaces.utils.app -m train`, which re-creates the app (the app builds no model at
start-up, so that costs imports and a datastore scan) and calls this task. Inference stays in the server
process, untouched: the training process uses one CPU thread on CPU (`train.threads`) and at most
`gpu_memory_fraction` of a GPU. `DELETE /train` kills that process (MONAI Label's stop); a killed run has only
written into its own run folder.

What one run does (the pipeline is `sam3d.training.train`, the recipe `configs/train/datastore_finetune.yaml`):

1. the labelled images are split by a hash of their id into training and validation images (`val_split`; an
   image keeps its side as the datastore grows). A label file holding several structures is several
   targets: the pipeline's sampler picks one label value per sample, with the interactive click simulation.
   `labels` (names the app declares in configs/app.yaml, whose values the saved label files use, as Slicer
   saves them) restricts the targets to those structures;
2. the served network (its checkpoint as init) trains for `steps`, or `epochs` x `windows_per_volume` windows
   per training image, in `<state>/train/<run>/` (metrics.csv, model.safetensors, run.json);
3. the new model and the served one are validated on the same held-out windows and clicks (the pipeline's
   `validate`; the score is the Dice averaged over the clicks). With `promote: better` (default) the new
   checkpoint replaces the served one only when its Dice is at least the served model's; `always` and
   `never` do what they say. The replaced checkpoint is kept as `<stem>.prev.*` (see `promotion`), and the
   infer task reloads the new file on its next request. A run promotes only while the server that started it
   still serves the datastore (`lifecycle`); the process exits when that server is gone.

`stats()` (the server's /info `train_stats`) and the lines the run prints (GET /train `details`) report the
step, epoch, loss and validation Dice from the run folder.
"""

import csv
import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from ..engine.checkpoint import file_sha256, saved_config
from . import lifecycle, promotion
from .app_config import TaskSpec
from .infer_point import resolve_device

logger = logging.getLogger(__name__)

TRAINABLE = {  # part -> the modules the recipe freezes
    "decoder": ["image_encoder", "prompt_encoder"],
    "prompt+decoder": ["image_encoder"],
    "lora": ["image_encoder"],  # + low-rank updates of the encoder's attention (LORA below), as SAMed tunes SAM
    "all": [],
}
LORA = {"modules": ["image_encoder"], "layers": ["qkv"]}  # rank and alpha: the task settings `lora_rank`/`lora_alpha`
DEFAULTS = {
    "task": "sam3d_point",  # the infer task whose model this fine-tunes
    "recipe": "configs/train/datastore_finetune.yaml",
    "epochs": 1,
    "steps": 0,  # > 0: wins over epochs
    "lr": 1.0e-4,
    "trainable": "prompt+decoder",
    "device": "auto",
    "val_split": 0.2,
    "promote": "better",
    "batch_size": 2,
    "labels": "all",  # or the names (configs/app.yaml `labels`) of the structures to train on
    "windows_per_volume": 8,  # an epoch: this many windows per training image
    "val_samples": 8,  # held-out windows (each with `val_clicks` simulated clicks)
    "val_clicks": 5,
    "threads": 1,  # CPU threads of the training process
    "gpu_memory_fraction": 0.5,  # of the GPU the training process may take (the server infers on the same GPU)
    "lora_rank": 4,  # trainable: lora
    "lora_alpha": 4.0,
}
PARAMS = ("epochs", "steps", "lr", "trainable", "device", "val_split", "promote", "batch_size", "labels")
ALIASES = {"learning_rate": "lr", "max_epochs": "epochs"}
MONAI_KEYS = {"model", "gpus", "local_rank", "bundle_path", "client_id", "name"}  # MONAI Label adds these


class TrainRequestError(ValueError):
    """A train request that cannot run; `status` is the HTTP code the server answers with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class TrainParams:
    epochs: int
    steps: int
    lr: float
    trainable: str
    device: str
    val_split: float
    promote: str
    batch_size: int
    labels: list[str] | None  # structure names to train on; None: every label value of the files


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value  # Slicer sends a choice list's pick


def _number(kind, key: str, value, low: float, low_ok: bool = True):
    try:
        v = kind(value)
        if isinstance(value, bool) or (kind is int and float(value) != v) or not math.isfinite(v):
            raise ValueError
    except (TypeError, ValueError):
        raise TrainRequestError(f"{key} must be a{'n integer' if kind is int else ' number'}, got {value!r}") from None
    if v < low or (v == low and not low_ok):
        raise TrainRequestError(f"{key} must be {'>=' if low_ok else '>'} {low}, got {value!r}")
    return v


def _label_names(value, known: dict[str, int]) -> list[str] | None:
    """`all` (None), or names the app declares: a list or a comma-separated string."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "all")):
        return None
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if str(n).strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise TrainRequestError(f"unknown label names {unknown or value!r}; declared: {', '.join(known)} (or all)")
    return names


def parse_train_params(request: dict, defaults: dict, known_labels: dict[str, int] | None = None) -> TrainParams:
    """The run's parameters: the request's over the app's `train` defaults; TrainRequestError when unusable."""
    given = {ALIASES.get(k, k): (v if k == "labels" else _first(v)) for k, v in (request or {}).items()}
    unknown = set(given) - set(PARAMS) - MONAI_KEYS - set(DEFAULTS)
    if unknown:
        logger.warning(f"sam3d train: ignoring unknown parameters {sorted(unknown)} (known: {', '.join(PARAMS)})")
    p = {k: given.get(k, defaults.get(k, DEFAULTS[k])) for k in PARAMS}
    epochs = _number(int, "epochs", p["epochs"], 0)
    steps = _number(int, "steps", p["steps"] or 0, 0)
    if not epochs and not steps:
        raise TrainRequestError("nothing to train: give epochs > 0 or steps > 0")
    trainable = str(p["trainable"]).strip().lower()
    if trainable not in TRAINABLE:
        raise TrainRequestError(f"unknown trainable part {p['trainable']!r}; use one of {', '.join(TRAINABLE)}")
    promote = str(p["promote"]).strip().lower()
    if promote not in promotion.POLICIES:
        raise TrainRequestError(f"unknown promote policy {p['promote']!r}; use one of {', '.join(promotion.POLICIES)}")
    val_split = _number(float, "val_split", p["val_split"], 0.0)
    if val_split >= 1:
        raise TrainRequestError(f"val_split must be in [0, 1), got {p['val_split']!r}")
    device, error = resolve_device(str(p["device"]))
    if error:
        raise TrainRequestError(error)
    return TrainParams(epochs=epochs, steps=steps, lr=_number(float, "lr", p["lr"], 0.0, low_ok=False),
                       trainable=trainable, device=device, val_split=val_split, promote=promote,
                       batch_size=_number(int, "batch_size", p["batch_size"], 1),
                       labels=_label_names(p["labels"], known_labels or {}))


def gpus_for(device: str) -> str:
    """MONAI Label's `gpus` request value (CUDA_VISIBLE_DEVICES of the training process) for a device."""
    if device == "cpu":
        return "-1"  # no GPU visible: the pipeline (ignite's device()) trains on the CPU
    if device.startswith("cuda:"):
        return device.split(":", 1)[1]
    return "all"


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


def _nifti_suffix(path: str) -> str | None:
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
        suffix = _nifti_suffix(image)
        name = f"{i:05d}_{''.join(c if c.isalnum() else '_' for c in image_id)}{suffix}"
        dst = folder / "labels" / "final" / name
        if keep:
            lab = nib.load(label)
            arr = np.asanyarray(lab.dataobj)
            arr = np.where(np.isin(arr, keep), arr, 0).astype(arr.dtype)
            if not arr.any():
                continue
            nib.save(nib.Nifti1Image(arr, lab.affine, lab.header), str(dst))
        elif _nifti_suffix(label) == suffix:
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
        info.update(step=step, loss=float(last["loss"]), train_dice=float(last["dice_last"]), lr=float(last["lr"]),
                    epoch=math.ceil(step / max(info.get("steps_per_epoch", 1), 1)))
    return info


def _write_json(path: Path, data: dict) -> None:
    from ..engine.checkpoint import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, default=str)))


class Sam3DTrainTask(TrainTask):
    """Fine-tunes the `task` infer task's model on the datastore's final labels (see the module docstring)."""

    def __init__(self, spec: TaskSpec, settings: dict, state_dir: Path, root: Path):
        super().__init__("Fine-tune the served point model on the datastore's final labels (clicks simulated)")
        self.spec = spec
        self.settings = {**DEFAULTS, **(settings or {})}
        self.state_dir = Path(state_dir)
        self.root = Path(root)  # relative recipe paths resolve against the project root
        self._sha_cache: tuple | None = None

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "train"

    @property
    def served(self) -> Path | None:
        ckpt = self.spec.model_config.get("checkpoint")
        return Path(ckpt) if ckpt else None

    def config(self) -> dict[str, Any]:
        """Train options offered to clients (Slicer shows a list as a choice; the first item is the default)."""
        s = self.settings

        def first(options: list, default) -> list:
            return [default] + [o for o in options if o != default]

        return {
            "epochs": s["epochs"],
            "steps": s["steps"],
            "lr": s["lr"],
            "trainable": first(list(TRAINABLE), s["trainable"]),
            "device": first(["auto", "cpu", "cuda"], s["device"]),
            "val_split": s["val_split"],
            "promote": first(list(promotion.POLICIES), s["promote"]),
            "batch_size": s["batch_size"],
            "labels": s["labels"],
        }

    # ---- checks the server runs before it starts a process ------------------------------------------------------

    def check_model(self) -> None:
        """The served model can be fine-tuned here; TrainRequestError (409) otherwise."""
        spec = self.spec
        if spec.error:
            raise TrainRequestError(f"task {spec.name} is misconfigured: {spec.error}", 409)
        if spec.model_config.get("factory"):
            raise TrainRequestError(f"task {spec.name} serves a factory model ({spec.model_config['factory']}); "
                                    "only sam3d networks can be fine-tuned", 409)
        if self.served is None:
            raise TrainRequestError(f"task {spec.name} has no checkpoint path: nowhere to put the trained weights", 409)
        if not self.recipe_path.is_file():
            raise TrainRequestError(f"train recipe not found: {self.recipe_path} (set train.recipe)", 409)

    @property
    def recipe_path(self) -> Path:
        path = Path(self.settings["recipe"]).expanduser()
        return path if path.is_absolute() else self.root / path

    def sources(self, datastore) -> list[tuple[str, str, str]]:
        """(image id, image file, final label file) of the labelled NIfTI images; TrainRequestError when none."""
        out = []
        for image_id in sorted(datastore.get_labeled_images()):
            label_id = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL.value)
            image = datastore.get_image_uri(image_id)
            label = datastore.get_label_uri(label_id, DefaultLabelTag.FINAL.value) if label_id else None
            if not label or not _nifti_suffix(image) or not _nifti_suffix(label):
                logger.warning(f"sam3d train: skipping {image_id}: only NIfTI images and labels are used")
                continue
            out.append((image_id, image, label))
        if not out:
            raise TrainRequestError("no final labels in the datastore: save a label (Submit Label) first", 409)
        return out

    def check_request(self, params: dict, datastore) -> dict:
        """Everything checkable before a process starts; returns what to add to the request (`gpus`)."""
        p = parse_train_params(params, self.settings, self.spec.labels)
        self.check_model()
        self.sources(datastore)
        return {"gpus": gpus_for(p.device)}

    # ---- the run (in MONAI Label's training process) ------------------------------------------------------------

    def recipe(self, p: TrainParams, run: Path, data: Path, steps: int) -> dict:
        from sam3d.training import load_recipe

        s = self.settings
        recipe = load_recipe(self.recipe_path)
        mc, served = self.spec.model_config, self.served
        saved = saved_config(served) if served.is_file() and served.suffix == ".safetensors" else None
        recipe["model"] = {
            "preset": (saved or mc).get("preset", "sam_med3d_turbo"),  # load_model's default, for .pth configs
            "network": (saved or {}).get("network") or mc.get("network") or {},
            "spacing": mc.get("spacing"),
            "intensity": mc.get("intensity"),
            "init_checkpoint": str(served) if served.is_file() else None,
            "init_strict": True,
        }
        recipe["data"] = {"datastore": str(data)}
        recipe["output"] = str(run)
        recipe["resume"] = False
        recipe["train"] = {**recipe.get("train", {}), "steps": steps, "batch_size": p.batch_size, "accumulate": 1,
                           "threads": int(s["threads"])}
        recipe["optim"] = {**recipe.get("optim", {}), "lr": p.lr, "freeze": TRAINABLE[p.trainable], "lr_mult": {}}
        if p.trainable == "lora":
            recipe["optim"]["lora"] = {**LORA, "rank": int(s["lora_rank"]), "alpha": float(s["lora_alpha"])}
        return recipe

    def __call__(self, request, datastore):
        import torch
        from filelock import FileLock, Timeout

        p = parse_train_params(request, self.settings, self.spec.labels)
        self.check_model()
        sources = self.sources(datastore)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = FileLock(str(self.runs_dir / "train.lock"))
            lock.acquire(timeout=0)  # one training at a time, whoever started it
        except Timeout:
            raise TrainRequestError("another training run holds the lock", 409) from None
        try:
            if torch.device(p.device).type == "cpu":
                torch.set_num_threads(int(self.settings["threads"]))
            elif torch.cuda.is_available():
                torch.cuda.set_per_process_memory_fraction(float(self.settings["gpu_memory_fraction"]))
            return self._run(p, sources)
        finally:
            lock.release()

    def _run(self, p: TrainParams, sources) -> dict:
        from sam3d.training import train

        by_id = {s[0]: s for s in sources}
        train_ids, val_ids = split_ids(list(by_id), p.val_split)
        # names sort in start order, also for runs started within the same second (latest_run relies on it)
        now = time.time_ns()
        run = self.runs_dir / f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now // 10**9))}-{now % 10**9:09d}-{uuid.uuid4().hex[:6]}"
        data = run / "data"
        keep = [self.spec.labels[n] for n in p.labels] if p.labels else None
        train_ids = [s[0] for s in link_datastore([by_id[i] for i in train_ids], data, keep)]
        val_sources = link_datastore([by_id[i] for i in val_ids], run / "val", keep)
        val_ids = [s[0] for s in val_sources]
        if not train_ids:
            raise TrainRequestError(f"no training image holds a structure of {p.labels}", 409)
        per_epoch = max(1, math.ceil(len(train_ids) * int(self.settings["windows_per_volume"]) / p.batch_size))
        steps = p.steps or p.epochs * per_epoch
        recipe = self.recipe(p, run, data, steps)
        info = {"run": str(run), "status": "running", "params": asdict(p), "steps": steps,
                "steps_per_epoch": per_epoch, "epochs": math.ceil(steps / per_epoch), "train_images": train_ids,
                "val_images": val_ids, "served": str(self.served), "started": time.time(), "pid": os.getpid(),
                "server": asdict(server) if (server := lifecycle.starting_server()) else None}
        _write_json(run / "run.json", info)
        logger.info(f"sam3d train: run {run}: {steps} steps on {len(train_ids)} images, {len(val_ids)} held out")

        stop = threading.Event()
        threading.Thread(target=self._report, args=(run, stop), daemon=True).start()
        try:
            summary = train(0, recipe, self.root)
            held_out = val_sources or link_datastore([by_id[i] for i in train_ids], run / "val", keep)
            info.update(self._validate_and_promote(p, recipe, run, held_out))
            info.update(status="done", holdout=bool(val_ids), loss=summary.get("loss"), finished=time.time())
        except BaseException as e:
            info.update(status="failed", error=f"{type(e).__name__}: {e}")
            raise
        finally:
            stop.set()
            _write_json(run / "run.json", info)
        print(f"sam3d train: {_line(progress(run))}", flush=True)
        return info

    def _validate_and_promote(self, p: TrainParams, recipe: dict, run: Path, val_sources) -> dict:
        """Held-out Dice of the served and the new model on the same windows and clicks; promotion by policy."""
        from sam3d.engine import load_model

        new_path = run / "model.safetensors"
        served = self.served
        scores = {"new": self._holdout(load_model({"checkpoint": str(new_path)}).model, recipe, val_sources)}
        scores["served"] = (self._holdout(load_model(self.spec.model_config).model, recipe, val_sources)
                            if served.is_file() else None)
        dice = {k: (v["dice_mean"] if v else None) for k, v in scores.items()}
        ok, why = promotion.should_promote(p.promote, dice["new"], dice["served"])
        if ok and (gone := lifecycle.why_not_serving(self.state_dir)):  # last, just before the served file changes
            ok, why = False, f"not promoted: {gone}"
        logger.info(f"sam3d train: validation Dice new={dice['new']} served={dice['served']}: {why}")
        out = {"validation": scores, "val_dice": dice["new"], "val_dice_served": dice["served"], "promoted": ok,
               "reason": why}
        if ok:
            out["previous"] = str(promotion.promote(new_path, served) or "")
            out["checkpoint_sha256"] = file_sha256(served)
        return out

    def _holdout(self, model, recipe: dict, sources) -> dict:
        import torch
        from ignite import distributed as idist
        from sam3d.data.training import SamplingConfig, WindowDataset, load_volume
        from sam3d.engine import EngineConfig
        from sam3d.training import InteractiveConfig, build_loss, validate

        mc = self.spec.model_config
        engine_cfg = EngineConfig.from_dict(mc)
        volumes = [load_volume(name, image, label, engine_cfg.spacing) for name, image, label in sources]
        sampling = replace(SamplingConfig.from_dict(recipe.get("sampling")), size=model.img_size)
        dataset = WindowDataset(volumes, engine_cfg, sampling, seed=int(recipe.get("seed", 0)) + 104729, augment=False)
        icfg = InteractiveConfig.from_dict({"spacing_mm": float(engine_cfg.spacing[0]),
                                            **(recipe.get("interactive") or {})})
        loss_cfg = dict(recipe.get("loss") or {})
        loss_fn = build_loss(loss_cfg.pop("name", "dice_ce"), **loss_cfg)
        device = idist.device()
        model.to(device)
        with torch.no_grad():
            row = validate(model, dataset, int(self.settings["val_samples"]), int(self.settings["val_clicks"]), icfg,
                           loss_fn, nullcontext, device)
        clicks = [v for k, v in row.items() if k.startswith("dice_") and k[5:].isdigit()]
        row["dice_mean"] = float(sum(clicks) / len(clicks))
        return row

    @staticmethod
    def _report(run: Path, stop: threading.Event, every_s: float = 5.0) -> None:
        """Progress lines on stdout: MONAI Label keeps a training process's last lines in GET /train `details`."""
        last = None
        while not stop.wait(every_s):
            line = _line(progress(run))
            if line != last:
                print(f"sam3d train: {line}", flush=True)
                last = line

    # ---- what the server shows -----------------------------------------------------------------------------------

    def latest_run(self) -> Path | None:
        runs = sorted(p for p in self.runs_dir.glob("*/run.json")) if self.runs_dir.is_dir() else []
        return runs[-1].parent if runs else None

    def mark_stopped_runs(self) -> None:
        """A run still `running` that is none of this server's training processes was stopped (DELETE /train, which
        does not wait for the process to end), crashed, or died with an earlier server: say so in its folder."""
        from monailabel.utils.async_tasks.utils import processes

        running = {p.pid for p in processes("train").values()}
        for path in self.runs_dir.glob("*/run.json") if self.runs_dir.is_dir() else []:
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if info.get("status") == "running" and info.get("pid") not in running:
                _write_json(path, {**info, "status": "stopped", "finished": time.time()})

    def stats(self) -> dict[str, Any]:
        """/info `train_stats`: the latest run's progress and validation, and the served checkpoint's hash."""
        out: dict[str, Any] = {"served_checkpoint": str(self.served) if self.served else None,
                               "served_sha256": self._served_sha()}
        self.mark_stopped_runs()
        run = self.latest_run()
        if run is None:
            return out
        info = progress(run)
        out.update({k: info.get(k) for k in ("run", "status", "step", "steps", "epoch", "epochs", "loss",
                                              "train_dice", "val_dice", "val_dice_served", "promoted", "reason",
                                              "train_images", "val_images", "error")})
        return out

    def _served_sha(self) -> str | None:
        served = self.served
        try:
            st = served.stat() if served else None
        except OSError:
            return None
        if st is None:
            return None
        key = (str(served), st.st_mtime_ns, st.st_size)
        if self._sha_cache is None or self._sha_cache[0] != key:
            self._sha_cache = (key, file_sha256(served))
        return self._sha_cache[1]


def _line(info: dict) -> str:
    if not info:
        return "no progress yet"
    parts = [f"status={info.get('status')}", f"step={info.get('step', 0)}/{info.get('steps')}",
             f"epoch={info.get('epoch', 0)}/{info.get('epochs')}"]
    for key in ("loss", "train_dice", "val_dice", "val_dice_served"):
        if info.get(key) is not None:
            parts.append(f"{key}={info[key]:.4f}")
    if "promoted" in info:
        parts.append(f"promoted={info['promoted']} ({info.get('reason')})")
    return " ".join(parts)

