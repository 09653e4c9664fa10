"""The training run: an ignite engine over the interactive step, on one process or many (torch.distributed).

One engine iteration is one optimizer step over the global batch `train.batch_size`, split over the processes
and over `train.accumulate` micro-batches per process. Sample `i` of the run is `WindowDataset[i]` (a function
of the seed and `i` alone) and step `t` uses samples `t * batch_size ... (t + 1) * batch_size - 1`, so a run on
one process and a run on several with the same global batch see the same samples, and a resumed run continues
with the samples the interrupted one would have used.

Output folder (`output`):

    model.safetensors + model.yaml   the served checkpoint (sam3d.engine.save_checkpoint: each file replaced
                                     atomically); written every `checkpoint.every` steps and at the end
    state.pt                         everything to resume (model, optimizer, schedule, step); weights_only
    metrics.csv, val.csv, tb/        training and validation logs (CSV; TensorBoard when enabled)
    recipe.yaml                      the resolved recipe
    summary.json                     written when the run ends (all steps done or `train.max_minutes` reached)
"""

import csv
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml
from ignite import distributed as idist
from ignite.engine import Engine, Events
from torch.utils.data import DataLoader, Sampler

from ..data.training import SamplingConfig, WindowDataset, load_volumes
from ..engine.checkpoint import atomic_write, read_state_dict, save_checkpoint
from ..engine.interactive import EngineConfig
from ..models import AutoSeg3D, build_network, model_kind
from ..models.lora import add_lora, is_lora_parameter
from .auto_step import AutoStep
from .auto_window_step import AutoWindowStep
from .point_step import PointStep
from .resume_state import restore_first_moments
from .step import TrainingStep
from .text_step import TextStep

logger = logging.getLogger("sam3d.training")

# the step of each kind of network (sam3d.models.model_kind); the recipe sections `text` and `auto` configure theirs
STEPS: dict[str, type[TrainingStep]] = {"point": PointStep, "text": TextStep, "auto": AutoStep}
# a network that trains unlike the rest of its kind: the 3D automatic model learns from windows, not slice chains
NETWORK_STEPS: dict[type, type[TrainingStep]] = {AutoSeg3D: AutoWindowStep}


class StepBatchSampler(Sampler):
    """For steps start..steps-1: this process's share of the global batch (contiguous indices)."""

    def __init__(self, start: int, steps: int, global_batch: int, rank: int, world: int) -> None:
        if global_batch % world:
            raise ValueError(f"batch_size {global_batch} is not divisible by {world} processes")
        self.start, self.steps, self.global_batch, self.rank, self.world = start, steps, global_batch, rank, world

    def __iter__(self):
        per = self.global_batch // self.world
        for t in range(self.start, self.steps):
            first = t * self.global_batch + self.rank * per
            yield list(range(first, first + per))

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)


def _collate(items: list[dict]) -> dict:
    batch = {
        "image": torch.stack([i["image"] for i in items]),
        "label": torch.stack([i["label"] for i in items]),
        "seed": [i["seed"] for i in items],
        "index": [i["index"] for i in items],
        "case": [i["case"] for i in items],
        "target": [i["target"] for i in items],
        "synthetic": [i["synthetic"] for i in items],
    }
    if all("click" in i for i in items):  # the window datasets' given first clicks
        batch["click"] = torch.stack([i["click"] for i in items])
    return batch


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    t = min(1.0, (step - warmup) / max(total - warmup, 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _resolve(path, root: Path) -> Path:
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else root / p


def build_model(recipe: dict, root: Path) -> tuple[torch.nn.Module, dict, EngineConfig]:
    """The network (preset + network overrides from the model config, recipe wins), its sidecar, its engine config."""
    m = recipe.get("model", {})
    model_cfg = {}
    if m.get("config"):
        model_cfg = yaml.safe_load(_resolve(m["config"], root).read_text()) or {}
    preset = m.get("preset") or model_cfg.get("preset", "sam3d_small")
    network = {**(model_cfg.get("network") or {}), **(m.get("network") or {})}
    engine_cfg = EngineConfig.from_dict({**model_cfg, **{k: m[k] for k in ("spacing", "intensity") if k in m}})
    model = build_network(preset, **network)
    if m.get("init_required") and not m.get("init_checkpoint"):
        raise ValueError("this recipe fine-tunes published weights: set model.init_checkpoint=/path/to/weights")
    if m.get("init_checkpoint"):
        state = read_state_dict(_resolve(m["init_checkpoint"], root))
        missing, unexpected = model.load_state_dict(
            {k: v.float() for k, v in state.items()}, strict=bool(m.get("init_strict", True))
        )
        if missing or unexpected:
            logger.warning(f"init checkpoint: {len(missing)} missing, {len(unexpected)} unexpected keys")
    # the whole network config, not only the overrides: a later change of the preset cannot alter this checkpoint
    return model, {"preset": preset, "network": model.config.to_dict()}, engine_cfg


def _param_groups(model: torch.nn.Module, optim: dict) -> list[dict]:
    freeze = tuple(optim.get("freeze") or ())
    mults = optim.get("lr_mult") or {}
    groups: dict = {}
    for name, p in model.named_parameters():
        if freeze and name.startswith(freeze) and not is_lora_parameter(name):  # LoRA trains in a frozen part
            p.requires_grad_(False)
            continue
        mult = next((float(v) for k, v in mults.items() if name.startswith(k)), 1.0)
        decay = p.ndim >= 2 and "embed" not in name.split(".")[-2:][0]
        key = (mult, decay)
        g = groups.setdefault(
            key,
            {"params": [], "lr_mult": mult, "weight_decay": float(optim.get("weight_decay", 0.1)) if decay else 0.0},
        )
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def _resolve_data(data: dict, root: Path) -> dict:
    """A recipe's `data` section with its paths resolved against the project root."""
    out = {**data, **{k: str(_resolve(data[k], root)) for k in ("dir", "datastore") if data.get(k)}}
    if data.get("label_maps"):
        out["label_maps"] = {k: str(_resolve(v, root)) for k, v in data["label_maps"].items()}
    return out


def _autocast(amp, device: torch.device):
    if amp in (None, False, "none", "off") or (amp == "auto" and device.type != "cuda"):
        return nullcontext
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def train(local_rank, recipe: dict, root: str | os.PathLike = ".") -> dict:
    """Run (or resume) the recipe; meant to run under `ignite.distributed.Parallel`. Returns a summary.

    The outline: model, optimizer, resume, step, data, then an ignite engine with its handlers in this order:
    time budget, logging, validation, checkpoint (a run killed after a checkpoint has logged every step it saved).
    """
    root = Path(root)
    rank, world, device = idist.get_rank(), idist.get_world_size(), idist.device()
    tcfg = recipe.get("train", {})
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg["threads"]))
    seed = int(recipe.get("seed", 0))
    out = _resolve(recipe.get("output", f"runs/{recipe.get('name', 'run')}"), root)
    steps, global_batch = int(tcfg["steps"]), int(tcfg.get("batch_size", 1))
    accumulate = int(tcfg.get("accumulate", 1))
    if global_batch % (world * accumulate):
        raise ValueError(
            f"batch_size {global_batch} must be divisible by processes x accumulate = {world * accumulate}"
        )
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    torch.manual_seed(seed)
    model, sidecar, engine_cfg = build_model(recipe, root)
    sidecar = {**sidecar, "recipe": recipe.get("name")}
    optim = recipe.get("optim", {})
    _add_lora(model, optim, rank)
    model.to(device)
    optimizer, scheduler = _optimizer(model, optim, steps)
    start = _resume(out, recipe, root, model, optimizer, scheduler, rank)

    autocast = _autocast(tcfg.get("amp", "auto"), device)
    step_module = _training_step(model, recipe, root, sidecar, engine_cfg, autocast)
    ddp = world > 1
    net = idist.auto_model(step_module, find_unused_parameters=True) if ddp else step_module

    sampling = replace(SamplingConfig.from_dict(recipe.get("sampling")), size=model.img_size)
    volumes = load_volumes(_resolve_data(recipe.get("data", {}), root), engine_cfg.spacing, seed)
    loader = DataLoader(
        step_module.dataset(volumes, engine_cfg, sampling, seed),
        batch_sampler=StepBatchSampler(start, steps, global_batch, rank, world),
        num_workers=int(tcfg.get("num_workers", 0)),
        collate_fn=_collate,
        persistent_workers=False,
    )

    trainer = Engine(
        _optimizer_step(
            net,
            step_module,
            model,
            optimizer,
            scheduler,
            device,
            global_batch // world // accumulate,
            accumulate,
            optim.get("grad_clip", 1.0),
            ddp,
        )
    )
    if start:
        trainer.load_state_dict({"iteration": start, "epoch_length": steps, "max_epochs": 1})
    _attach_budget(trainer, tcfg.get("max_minutes"), rank, ddp, device)
    if tcfg.get("stop_at_step"):  # a leg of an exact length (equal-budget comparisons), the schedule unchanged
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=int(tcfg["stop_at_step"])), lambda e: e.terminate())
    exit_at = (recipe.get("debug") or {}).get("exit_at_step")
    if exit_at is not None:  # tests: die like a killed process right after a step
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e: os._exit(3) if e.state.iteration >= int(exit_at) else None
        )
    logs = _attach_logging(trainer, out, recipe, start) if rank == 0 else None
    val_rows = (
        _attach_validation(trainer, step_module, recipe, root, volumes, engine_cfg, sampling, seed, out, logs, device)
        if rank == 0
        else []
    )
    _attach_checkpoint(trainer, model, optimizer, scheduler, out, sidecar, recipe.get("checkpoint", {}), rank)

    if start >= steps:
        if rank == 0:
            logger.info(f"nothing to do: {out / 'state.pt'} is at step {start} of {steps}")
        return {"output": str(out), "step": start}
    t_start = time.time()
    trainer.run(loader, max_epochs=1, epoch_length=steps)
    summary = {
        "output": str(out),
        "step": trainer.state.iteration,
        "seconds": time.time() - t_start,
        "loss": trainer.state.output["loss"] if trainer.state.output else None,
        "validation": val_rows[-1] if val_rows else None,
    }
    if rank == 0:
        logs.close()
        # the run ended (its steps, or its time budget): a killed run never writes this for its last step
        atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, default=str, indent=1)))
    return summary


def _training_step(model, recipe: dict, root: Path, sidecar: dict, engine_cfg, autocast) -> TrainingStep:
    """The step of the network's kind (or of the network itself, `NETWORK_STEPS`); a section that configures
    another kind's step is an error."""
    kind = model_kind(sidecar["preset"])
    for section in ("text", "auto"):
        if recipe.get(section) and section != kind:
            raise ValueError(
                f"the recipe's `{section}` section trains a {section} model, and {sidecar['preset']!r} is "
                f"a {kind} model: set model.preset to a {section} preset or remove the section"
            )
    step = NETWORK_STEPS.get(type(model), STEPS[kind])
    return step.from_recipe(model, recipe, root, sidecar, engine_cfg, autocast)


def _add_lora(model, optim: dict, rank: int) -> None:
    """Low-rank updates of frozen layers (`optim.lora`), folded into the weights at every checkpoint."""
    if not optim.get("lora"):
        return
    lo = optim["lora"]
    r = int(lo.get("rank", 4))
    added = add_lora(
        model, list(lo.get("modules", ["image_encoder"])), list(lo.get("layers", ["qkv"])), r, float(lo.get("alpha", r))
    )
    if rank == 0:
        logger.info(f"LoRA rank {r} on {len(added)} layers ({added[0]}, ...)")


def _optimizer(model, optim: dict, steps: int):
    """AdamW over the parameter groups, and the warm-up + cosine schedule over the run's `steps`."""
    groups = _param_groups(model, optim)
    base_lr = float(optim.get("lr", 3e-4))
    for g in groups:
        g["lr"] = base_lr * g["lr_mult"]
    optimizer = torch.optim.AdamW(
        groups, lr=base_lr, betas=tuple(optim.get("betas", (0.9, 0.999))), eps=float(optim.get("eps", 1e-8))
    )
    warmup, min_ratio = int(optim.get("warmup_steps", 0)), float(optim.get("min_lr_ratio", 0.05))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, steps, min_ratio))
    return optimizer, scheduler


def _resume(out: Path, recipe: dict, root: Path, model, optimizer, scheduler, rank: int) -> int:
    """The step to start from: the output's state.pt, or for a new output folder `resume_from` (the committed
    state of a run trained in legs), or 0."""
    state_path = out / "state.pt"
    if rank == 0:  # temporary files of writes that a killed run left behind (the real files are whole)
        for stale in out.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    source = (
        state_path
        if state_path.is_file()
        else (_resolve(recipe["resume_from"], root) if recipe.get("resume_from") else None)
    )
    if source is None or not source.is_file():
        return 0
    if not recipe.get("resume", True):
        raise FileExistsError(f"{source} exists and resume is off: choose another output folder")
    state = torch.load(source, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])  # float moments take the parameters' dtype
    restore_first_moments(optimizer)  # a committed compact state (`sam3d.training.resume_state`) has none
    scheduler.load_state_dict(state["scheduler"])
    if rank == 0:
        logger.info(f"resuming from {source} at step {int(state['step'])}")
    return int(state["step"])


def _optimizer_step(
    net, step_module, model, optimizer, scheduler, device, micro: int, accumulate: int, grad_clip, ddp: bool
):
    """The engine's process function: one optimizer step over the global batch, in `accumulate` micro-batches."""

    def step(engine, batch):
        net.train()
        optimizer.zero_grad(set_to_none=True)
        losses, dices = [], []
        for i in range(accumulate):
            sl = slice(i * micro, (i + 1) * micro)
            images, labels = batch["image"][sl].to(device), batch["label"][sl].to(device)
            sync = nullcontext() if (not ddp or i == accumulate - 1) else net.no_sync()
            with sync:
                loss, dice = net(images, labels, batch["seed"][sl], *(batch[k][sl] for k in step_module.batch_keys))
                (loss / accumulate).backward()
            losses.append(loss.detach())
            dices.append(dice)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip))
        optimizer.step()
        scheduler.step()
        stats = torch.cat(
            [
                torch.stack(losses).mean().reshape(1).cpu(),
                torch.stack(dices).mean(0),
                torch.tensor([float(np.mean(batch["synthetic"]))]),
            ]
        )
        if ddp:
            stats = idist.all_reduce(stats.to(device)).cpu() / idist.get_world_size()
        return {
            "loss": float(stats[0]),
            "dice_first": float(stats[1]),
            "dice_last": float(stats[-2]),
            "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_mult"],
            "synthetic": float(stats[-1]),
        }

    return step


def _attach_budget(trainer: Engine, max_minutes, rank: int, ddp: bool, device) -> None:
    """`train.max_minutes`: a wall-clock budget; the run stops cleanly (the COMPLETED handlers checkpoint and
    validate), every process at the same step."""
    if not max_minutes:
        return
    t_budget = time.time()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _budget(engine):
        flag = torch.tensor([float(time.time() - t_budget > 60 * float(max_minutes))])
        if ddp:
            flag = idist.all_reduce(flag.to(device)).cpu()
        if flag.item() > 0:
            if rank == 0:
                logger.warning(f"train.max_minutes={max_minutes} reached at step {engine.state.iteration}")
            engine.terminate()


class _Logs:
    """metrics.csv (appended across legs), TensorBoard when enabled, and the resolved recipe.yaml."""

    def __init__(self, out: Path, recipe: dict, start: int) -> None:
        log_cfg = recipe.get("log", {})
        path = out / "metrics.csv"
        fresh = not path.exists()
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file)
        if fresh:
            self.writer.writerow(["step", "loss", "dice_first", "dice_last", "lr", "synthetic", "seconds"])
        self.tb = None
        if log_cfg.get("tensorboard", True):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"), purge_step=start or None)
            except Exception as e:  # tensorboard missing: CSV only
                logger.warning(f"no TensorBoard logs: {e}")
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        self.t0 = time.time()

    def step(self, iteration: int, o: dict) -> None:
        self.writer.writerow(
            [
                iteration,
                f"{o['loss']:.5f}",
                f"{o['dice_first']:.4f}",
                f"{o['dice_last']:.4f}",
                f"{o['lr']:.3e}",
                o["synthetic"],
                f"{time.time() - self.t0:.1f}",
            ]
        )
        self.file.flush()
        self.scalars("train", o, iteration)

    def scalars(self, group: str, values: dict, iteration: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{group}/{k}", v, iteration)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _attach_logging(trainer: Engine, out: Path, recipe: dict, start: int) -> _Logs:
    log_cfg = recipe.get("log", {})
    logs = _Logs(out, recipe, start)
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(every=int(log_cfg.get("every", 1))),
        lambda e: logs.step(e.state.iteration, e.state.output),
    )
    if log_cfg.get("progress", True):
        from ignite.contrib.handlers import ProgressBar

        ProgressBar(persist=True).attach(
            trainer, output_transform=lambda o: {"loss": o["loss"], "dice": o["dice_last"]}
        )
    return logs


def _attach_validation(
    trainer: Engine,
    step_module: TrainingStep,
    recipe: dict,
    root: Path,
    volumes,
    engine_cfg,
    sampling,
    seed: int,
    out: Path,
    logs: _Logs,
    device,
) -> list[dict]:
    """Every `validation.every` steps and at the end: `step_module.validate` on fixed windows of the held-out
    volumes the recipe names (`validation.data`, as `data`), else of the training ones; rows in val.csv."""
    val_cfg = recipe.get("validation") or {}
    rows: list[dict] = []
    if not val_cfg.get("every"):
        return rows
    held_out = val_cfg.get("data")
    if held_out:
        volumes = load_volumes(_resolve_data(held_out, root), engine_cfg.spacing, seed)
    # the same fixed windows whatever the recipe's target weighting, so that validations of different legs compare
    val_sampling = replace(sampling, case_weights=None if held_out else sampling.case_weights, size_power=0.0)
    val_set = WindowDataset(volumes, engine_cfg, val_sampling, seed=seed + 7919, augment=False)
    every = int(val_cfg["every"])

    def run(engine):
        row = step_module.validate(val_set, int(val_cfg.get("samples", 8)), int(val_cfg.get("clicks", 5)), device)
        row = {"step": engine.state.iteration, **row}
        rows.append(row)
        path = out / "val.csv"
        fresh = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if fresh:
                w.writeheader()
            w.writerow(row)
        logs.scalars("val", {k: v for k, v in row.items() if k != "step"}, engine.state.iteration)
        scores = ", ".join(f"{k}={v:.3f}" for k, v in row.items() if k != "step")
        logger.info(f"validation at step {row['step']}: {scores}")

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=every), run)
    trainer.add_event_handler(Events.COMPLETED, lambda e: run(e) if e.state.iteration % every else None)
    return rows


def _attach_checkpoint(
    trainer: Engine, model, optimizer, scheduler, out: Path, sidecar: dict, ck: dict, rank: int
) -> None:
    """Every `checkpoint.every` steps and at the end: state.pt (to resume), then the served checkpoint."""
    every = int(ck.get("every", 100))

    def save(engine=None):
        s = trainer.state.iteration
        if rank == 0:
            state = {
                "step": s,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            }
            atomic_write(out / "state.pt", lambda tmp: torch.save(state, tmp))  # resume state first, then the model
            save_checkpoint(model, out / "model.safetensors", {**sidecar, "step": s}, half=bool(ck.get("half", False)))
            logger.info(f"step {s}: checkpoint {out / 'model.safetensors'}")
        idist.barrier()

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=every), save)
    trainer.add_event_handler(Events.COMPLETED, lambda e: save() if e.state.iteration % every else None)
