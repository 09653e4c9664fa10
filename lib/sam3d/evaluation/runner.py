"""The evaluation loop: for every case, target structure and method, simulated clicks and metrics per click.

Each target (one label value of one case) gets its own `ClickSimulator`, seeded from the run's seed, the case
and the label value (`derive_seed`), so its clicks do not depend on which targets or methods ran before it.
Every method sees the same protocol with the same seed: the first prompt is identical for all of them, and
each later click answers that method's own errors (the simulated annotator looks at the mask it was shown), as
in RITM and SegFM3D; that is what NoC measures. Protocol `text` (a model that reads text): iteration 1 gives
the structure's name alone (the method gets its label name and no click), later iterations `center` clicks on its
errors. Iteration i adds the simulator's points (one for most protocols, several for noisy1/noisy2, a box for
`box`), and the method gets every prompt so far.

With `prior: perturbed` a target starts from a previous mask, as when a user corrects an automatic result: the
reference, perturbed as training perturbs it but never left right (`sam3d.data.prior_masks`, seeded per target),
given to the method with every call; the first click already answers that mask's errors. The prior's own metrics
are in every row (`prior_dice`). Only a method that takes a mask (`segment(..., prior=)`) can run it.

When a prediction is already perfect the simulator has nothing to add: the remaining iterations repeat its
metrics with 0 s and no call. A failed call (an exception from the method) is recorded in the `error` column
with empty metrics, and the target continues from the last good mask.
"""

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.cases import Case, load_case
from ..data.clicks import ClickSimulator, Prompt, derive_seed
from ..data.prior_masks import perturbed_mask
from ..metrics import METRICS, segmentation_metrics

logger = logging.getLogger(__name__)

# the columns in its order after `method`, then the extras
COLUMNS = (
    "method",
    "case",
    "label",
    "label_name",
    "click",
    "dice",
    "iou",
    "hd95",
    "assd",
    "nsd",
    "seconds",
    "volume_error",
    "n_foreground",
    "n_background",
    "error",
    "prior_dice",
)


@dataclass
class EvalConfig:
    protocol: str = "center"
    clicks: int = 10
    seed: int = 0
    labels: list | None = None  # values or names; None: every non-zero value of each label map
    near_mm: float = 10.0  # noisy1/noisy2: "near the target"
    box_jitter_mm: float = 0.0  # box protocol
    save_masks: Path | None = None  # folder for the last mask of every (method, case, label)
    prior: str | None = None  # "perturbed": each target starts from the reference, perturbed


@dataclass
class Target:
    case: Case
    value: int
    name: str


@dataclass
class Trace:
    """One method on one target: the prompts and the rows of every iteration."""

    rows: list = field(default_factory=list)
    foreground: list = field(default_factory=list)
    background: list = field(default_factory=list)
    roi: list | None = None


def _targets(loaded, selection) -> list[int]:
    from ..data.cases import parse_label_selection

    present = loaded.values()
    wanted = parse_label_selection(selection, loaded.case.names)
    if wanted is None:
        return present
    missing = [v for v in wanted if v not in present]
    if missing:
        logger.warning(f"{loaded.case.name}: label values {missing} are absent from its label map; skipped")
    return [v for v in wanted if v in present]


def run_target(segmenter, loaded, value: int, config: EvalConfig, progress=None) -> Trace:
    """`config.clicks` iterations of one method on one target; one row per iteration."""
    case = loaded.case
    name = case.label_name(value)
    gt = loaded.label == value
    text = config.protocol == "text"  # iteration 1 is the structure's name alone, then `center` clicks
    sim = ClickSimulator(
        "center" if text else config.protocol,
        derive_seed(config.seed, case.name, value),
        spacing=loaded.spacing,
        near_mm=config.near_mm,
        box_jitter_mm=config.box_jitter_mm,
    )
    trace = Trace()
    pred, last_metrics, given, extra = None, None, {}, {}
    if config.prior == "perturbed":
        rng = np.random.default_rng(derive_seed(config.seed, case.name, value, "prior"))
        pred = perturbed_mask(gt, rng, may_keep=False)
        last_metrics = segmentation_metrics(pred, gt, loaded.spacing)
        given, extra = {"prior": pred.astype(np.uint8)}, {"prior_dice": last_metrics["dice"]}
    for it in range(1, config.clicks + 1):
        # with a prior, the first click already corrects a mask, as a second click does
        prompt = Prompt() if text and it == 1 else sim.next(gt, pred, it + bool(given))
        row = {
            "method": segmenter.name,
            "case": case.name,
            "label": value,
            "label_name": name,
            "click": it,
            "error": "",
            **extra,
        }
        if not prompt and pred is not None:  # perfect already: nothing to click on
            row.update(last_metrics, seconds=0.0)
        else:
            trace.foreground += [list(p) for p in prompt.foreground]
            trace.background += [list(p) for p in prompt.background]
            if prompt.box is not None:
                trace.roi = prompt.roi()
            t = time.perf_counter()
            try:
                mask = segmenter.segment(str(case.image), trace.foreground, trace.background, trace.roi, name, **given)
                seconds = time.perf_counter() - t
                mask = np.asarray(mask)
                if mask.shape != gt.shape:
                    raise ValueError(f"mask shape {mask.shape} differs from the label's {gt.shape}")
                pred = mask != 0
                last_metrics = segmentation_metrics(pred, gt, loaded.spacing)
                row.update(last_metrics, seconds=seconds)
            except Exception as e:  # noqa: BLE001 - one failed call must not lose the whole run
                logger.warning(f"{segmenter.name} on {case.name}/{name}, click {it}: {e}")
                row.update(
                    {m: math.nan for m in METRICS},
                    seconds=time.perf_counter() - t,
                    error=f"{type(e).__name__}: {e}"[:300],
                )
        row["n_foreground"], row["n_background"] = len(trace.foreground), len(trace.background)
        trace.rows.append(row)
        if progress is not None:
            progress.update(1)
    if config.save_masks is not None and pred is not None:
        _save_mask(
            pred,
            loaded,
            Path(config.save_masks) / _safe(segmenter.name) / _safe(case.name),
            f"{value}_{_safe(name)}.nii.gz",
        )
    return trace


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def _save_mask(mask: np.ndarray, loaded, folder: Path, filename: str) -> None:
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), loaded.affine), str(folder / filename))


def run_evaluation(cases: list[Case], segmenters: list, config: EvalConfig, progress: bool = True) -> list[dict]:
    """Rows (dicts with `COLUMNS`) for every case, selected label, method and iteration."""
    from tqdm import tqdm

    rows = []
    n_labels = len(config.labels) if config.labels else 0
    bar = tqdm(
        total=len(cases) * n_labels * len(segmenters) * config.clicks,
        unit="click",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for case in cases:
            bar.set_description(f"{case.name}: loading")
            loaded = load_case(case)
            values = _targets(loaded, config.labels)
            expected = n_labels * len(segmenters) * config.clicks
            actual = len(values) * len(segmenters) * config.clicks
            if actual != expected:
                bar.total += actual - expected
                bar.refresh()
            for seg in segmenters:
                if hasattr(seg, "prepare"):
                    seg.prepare(case)
            for value in values:
                for seg in segmenters:
                    bar.set_description(f"{case.name} {case.label_name(value)} {seg.name}")
                    rows += run_target(seg, loaded, value, config, bar).rows
    finally:
        bar.close()
    return rows
