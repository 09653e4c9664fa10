"""`sam3d`: MONAI Label's train task, fine-tuning the served point model on the datastore's final labels.

How it runs: MONAI Label's own subprocess mode. `POST /train/sam3d` makes the server start
`python -m monailabel.interfaces.utils.app -m train`, which re-creates the app (the app builds no model at
start-up, so that costs imports and a datastore scan) and calls this task. Inference stays in the server
process, untouched: the training process uses one CPU thread on CPU (`train.threads`) and at most
`gpu_memory_fraction` of a GPU. `DELETE /train` kills that process (MONAI Label's stop); a killed run has only
written into its own run folder.

What one run does (the pipeline is `sam3d.training.train`; the recipe is the served model config's
`finetune_recipe`, e.g. configs/train/datastore_finetune_clicknet.yaml, else configs/train/datastore_finetune.yaml):

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

This module is the MONAI Label task; the request's parameters are `train_params`, the run folder and its
process `train_runs`, the validation and the promotion decision `train_validation`.
"""

import logging
import math
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from ..engine.checkpoint import file_sha256, saved_config
from . import lifecycle, promotion
from .app_config import TaskSpec
from .devices import gpus_for
from .train_params import (
    DEFAULTS,
    LORA,
    TrainParams,
    TrainRequestError,
    frozen_modules,
    parse_train_params,
    resolve_auto,
    trainable_parts,
)
from .train_runs import (
    latest_run,
    link_datastore,
    mark_stopped_runs,
    new_run_dir,
    nifti_suffix,
    progress,
    progress_line,
    report,
    split_ids,
    write_json,
)
from .train_validation import validate_and_promote

logger = logging.getLogger(__name__)

GENERIC_RECIPE = "configs/train/datastore_finetune.yaml"  # `train.recipe: auto` for a model config naming none

__all__ = ["Sam3DTrainTask", "TrainRequestError"]


class Sam3DTrainTask(TrainTask):
    """Fine-tunes the `task` infer task's model on the datastore's final labels (see the module docstring)."""

    def __init__(self, spec: TaskSpec, settings: dict, state_dir: Path, root: Path):
        super().__init__("Fine-tune the served point model on the datastore's final labels (clicks simulated)")
        self.spec = spec
        self.settings = resolve_auto({**DEFAULTS, **(settings or {})}, spec.model_config or {})
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
            "trainable": first(list(trainable_parts(*self.served_network())), s["trainable"]),
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
            raise TrainRequestError(
                f"task {spec.name} serves a factory model ({spec.model_config['factory']}); "
                "only sam3d networks can be fine-tuned",
                409,
            )
        if self.served is None:
            raise TrainRequestError(f"task {spec.name} has no checkpoint path: nowhere to put the trained weights", 409)
        if not self.recipe_path.is_file():
            raise TrainRequestError(f"train recipe not found: {self.recipe_path} (set train.recipe)", 409)

    @property
    def recipe_path(self) -> Path:
        """`train.recipe`; `auto`: the served model config's `finetune_recipe`, else the generic one."""
        recipe = str(self.settings["recipe"])
        if recipe == "auto":
            recipe = self.spec.model_config.get("finetune_recipe") or GENERIC_RECIPE
        path = Path(recipe).expanduser()
        return path if path.is_absolute() else self.root / path

    def sources(self, datastore) -> list[tuple[str, str, str]]:
        """(image id, image file, final label file) of the labelled NIfTI images; TrainRequestError when none."""
        out = []
        for image_id in sorted(datastore.get_labeled_images()):
            label_id = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL.value)
            image = datastore.get_image_uri(image_id)
            label = datastore.get_label_uri(label_id, DefaultLabelTag.FINAL.value) if label_id else None
            if not label or not nifti_suffix(image) or not nifti_suffix(label):
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
        frozen_modules(p.trainable, *self.served_network())
        return {"gpus": gpus_for(p.device)}

    # ---- the run (in MONAI Label's training process) ------------------------------------------------------------

    def served_network(self) -> tuple[str, dict]:
        """(preset, network overrides) of the served weights: what their file records, else the model config's."""
        mc, served = self.spec.model_config, self.served
        ours = served is not None and served.is_file() and served.suffix == ".safetensors"
        saved = saved_config(served) if ours else None
        preset = (saved or mc).get("preset", "sam_med3d_turbo")  # load_model's default, for .pth configs
        return preset, (saved or {}).get("network") or mc.get("network") or {}

    def recipe(self, p: TrainParams, run: Path, data: Path, steps: int) -> dict:
        from sam3d.training import load_recipe

        s = self.settings
        recipe = load_recipe(self.recipe_path)
        mc, served = self.spec.model_config, self.served
        preset, network = self.served_network()
        recipe["model"] = {
            "preset": preset,
            "network": network,
            "spacing": mc.get("spacing"),
            "intensity": mc.get("intensity"),
            "init_checkpoint": str(served) if served.is_file() else None,
            "init_strict": True,
        }
        recipe["data"] = {"datastore": str(data)}
        recipe["output"] = str(run)
        recipe["resume"] = False
        recipe["train"] = {
            **recipe.get("train", {}),
            "steps": steps,
            "batch_size": p.batch_size,
            "accumulate": 1,
            "threads": int(s["threads"]),
        }
        frozen = frozen_modules(p.trainable, preset, network)
        recipe["optim"] = {**recipe.get("optim", {}), "lr": p.lr, "freeze": frozen, "lr_mult": {}}
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
        run = new_run_dir(self.runs_dir)
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
        info = {
            "run": str(run),
            "status": "running",
            "params": asdict(p),
            "steps": steps,
            "steps_per_epoch": per_epoch,
            "epochs": math.ceil(steps / per_epoch),
            "train_images": train_ids,
            "val_images": val_ids,
            "served": str(self.served),
            "started": time.time(),
            "pid": os.getpid(),
            "server": asdict(server) if (server := lifecycle.starting_server()) else None,
        }
        write_json(run / "run.json", info)
        logger.info(f"sam3d train: run {run}: {steps} steps on {len(train_ids)} images, {len(val_ids)} held out")

        stop = threading.Event()
        threading.Thread(target=report, args=(run, stop), daemon=True).start()
        try:
            summary = train(0, recipe, self.root)
            held_out = val_sources or link_datastore([by_id[i] for i in train_ids], run / "val", keep)
            info.update(
                validate_and_promote(
                    p.promote,
                    run / "model.safetensors",
                    self.served,
                    self.spec.model_config,
                    recipe,
                    held_out,
                    int(self.settings["val_samples"]),
                    int(self.settings["val_clicks"]),
                    self.state_dir,
                )
            )
            info.update(status="done", holdout=bool(val_ids), loss=summary.get("loss"), finished=time.time())
        except BaseException as e:
            info.update(status="failed", error=f"{type(e).__name__}: {e}")
            raise
        finally:
            stop.set()
            write_json(run / "run.json", info)
        print(f"sam3d train: {progress_line(progress(run))}", flush=True)
        return info

    # ---- what the server shows -----------------------------------------------------------------------------------

    def latest_run(self) -> Path | None:
        return latest_run(self.runs_dir)

    def stats(self) -> dict[str, Any]:
        """/info `train_stats`: the latest run's progress and validation, and the served checkpoint's hash."""
        out: dict[str, Any] = {
            "served_checkpoint": str(self.served) if self.served else None,
            "served_sha256": self._served_sha(),
        }
        mark_stopped_runs(self.runs_dir)
        run = self.latest_run()
        if run is None:
            return out
        info = progress(run)
        out.update(
            {
                k: info.get(k)
                for k in (
                    "run",
                    "status",
                    "step",
                    "steps",
                    "epoch",
                    "epochs",
                    "loss",
                    "train_dice",
                    "val_dice",
                    "val_dice_served",
                    "promoted",
                    "reason",
                    "train_images",
                    "val_images",
                    "error",
                )
            }
        )
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
