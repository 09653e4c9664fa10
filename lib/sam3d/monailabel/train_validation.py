"""Whether a finished run replaces the served model: both are validated on the same held-out windows and clicks
(the pipeline's `validate`; the score is the Dice averaged over the clicks), then the policy decides
(`promotion.should_promote`), and a run promotes only while the server that started it still serves the
datastore (`lifecycle`)."""

import logging
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from ..engine.checkpoint import file_sha256
from . import lifecycle, promotion

logger = logging.getLogger(__name__)


def holdout_dice(model, model_config: dict, recipe: dict, sources, samples: int, clicks: int) -> dict:
    """The pipeline's validation row of `model` on the held-out (id, image, label) `sources`: `samples` windows,
    `clicks` simulated clicks each, seeded by the recipe; `dice_mean` is the Dice averaged over the clicks."""
    import torch
    from ignite import distributed as idist

    from sam3d.data.training import SamplingConfig, WindowDataset, load_volume
    from sam3d.engine import EngineConfig
    from sam3d.training import InteractiveConfig, build_loss, validate

    engine_cfg = EngineConfig.from_dict(model_config)
    volumes = [load_volume(name, image, label, engine_cfg.spacing) for name, image, label in sources]
    sampling = replace(SamplingConfig.from_dict(recipe.get("sampling")), size=model.img_size)
    dataset = WindowDataset(volumes, engine_cfg, sampling, seed=int(recipe.get("seed", 0)) + 104729, augment=False)
    icfg = InteractiveConfig.from_dict(
        {"spacing_mm": float(engine_cfg.spacing[0]), **(recipe.get("interactive") or {})}
    )
    loss_cfg = dict(recipe.get("loss") or {})
    loss_fn = build_loss(loss_cfg.pop("name", "dice_ce"), **loss_cfg)
    device = idist.device()
    model.to(device)
    with torch.no_grad():
        row = validate(model, dataset, samples, clicks, icfg, loss_fn, nullcontext, device)
    per_click = [v for k, v in row.items() if k.startswith("dice_") and k[5:].isdigit()]
    row["dice_mean"] = float(sum(per_click) / len(per_click))
    return row


def validate_and_promote(
    policy: str,
    new_path: Path,
    served: Path,
    model_config: dict,
    recipe: dict,
    sources,
    samples: int,
    clicks: int,
    state_dir: Path,
) -> dict:
    """Held-out Dice of the new (`new_path`) and the served model on the same windows and clicks; the new file
    replaces `served` when `policy` says so and this run's server still serves the datastore in `state_dir`."""
    from sam3d.engine import load_model

    def score(config: dict) -> dict:
        return holdout_dice(load_model(config).model, model_config, recipe, sources, samples, clicks)

    scores = {"new": score({"checkpoint": str(new_path)}), "served": score(model_config) if served.is_file() else None}
    dice = {k: (v["dice_mean"] if v else None) for k, v in scores.items()}
    ok, why = promotion.should_promote(policy, dice["new"], dice["served"])
    if ok and (gone := lifecycle.why_not_serving(state_dir)):  # last, just before the served file changes
        ok, why = False, f"not promoted: {gone}"
    logger.info(f"sam3d train: validation Dice new={dice['new']} served={dice['served']}: {why}")
    out = {
        "validation": scores,
        "val_dice": dice["new"],
        "val_dice_served": dice["served"],
        "promoted": ok,
        "reason": why,
    }
    if ok:
        out["previous"] = str(promotion.promote(new_path, served) or "")
        out["checkpoint_sha256"] = file_sha256(served)
    return out
