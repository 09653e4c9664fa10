"""Learning while annotating, measured: labelled volumes added one at a time through a real server.

Per ordering (an active-learning strategy of the app: `random`, `uncertainty`, `first`), a fresh server starts
on a datastore holding the pool's images, unlabelled, and a copy of the starting checkpoint. Then, until the pool
is labelled: the strategy picks the next image (for `uncertainty`, the server's scoring job runs first, so the
choice uses fresh scores), the image's reference label is saved as its final label through the client, the
train task fine-tunes the served model on every label so far (`promote: always`: the curve measures training,
not the promotion rule), and the served checkpoint is measured on held-out volumes with the harness (library
engine on the same file: the server's own images would otherwise join the pool). Point 0 is the starting model.
"""

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.cases import Case
from ..engine.checkpoint import file_sha256
from ..engine.model_config import load_model_config
from .runner import EvalConfig, run_evaluation


@dataclass
class HeldOut:
    name: str
    cases: list[Case]
    labels: list | None = None


@dataclass
class CurveConfig:
    pool: list[Case]  # volumes with reference labels, added one at a time
    heldout: list[HeldOut]
    checkpoint: Path  # the starting model (.safetensors with its network config)
    configs_dir: Path
    model: str = "sam3d_small"
    clicks: int = 5
    train_params: dict = field(default_factory=dict)
    train_timeout_s: float = 6 * 3600
    device: str = "cpu"


def _train_and_wait(client, params: dict, timeout: float) -> dict:
    task = client.train_start("sam3d", params)
    deadline = time.monotonic() + timeout
    while True:
        task = next(t for t in client.json_request("GET", "/train/?all=true") if t["id"] == task["id"])
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"training still {task['status']} after {timeout:.0f} s")
        time.sleep(2)
    if task["status"] != "DONE":
        raise RuntimeError(f"training ended {task['status']}: {task.get('details', [])[-20:]}")
    return client.info().get("train_stats", {}).get("sam3d", {})


def _score_now(client, timeout: float = 3600) -> None:
    """Score every unlabelled image and wait: the scoring runs in its own process (run_sync is refused)."""
    client.json_request("POST", "/scoring/uncertainty")
    deadline = time.monotonic() + timeout
    while (job := client.json_request("GET", "/scoring/"))["status"] in ("SUBMITTED", "RUNNING"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"uncertainty scoring still {job['status']} after {timeout:.0f} s")
        time.sleep(1)
    if job["status"] != "DONE":
        raise RuntimeError(f"uncertainty scoring ended {job['status']}: {job.get('details', [])[-20:]}")


def measure(cfg: CurveConfig, checkpoint: Path) -> dict[str, float]:
    """Mean Dice after the first and the last click over the targets of the first held-out group (the domain
    the curve is about), and as `<name>.dice_<k>` over each other group's (what fine-tuning may make it forget)."""
    from .segmenters import PredictorSegmenter

    model_cfg = load_model_config(cfg.model, cfg.configs_dir, str(checkpoint))
    seg = PredictorSegmenter.from_config(model_cfg, device=cfg.device)
    out = {}
    for i, h in enumerate(cfg.heldout):
        rows = run_evaluation(
            h.cases,
            [seg],
            EvalConfig(protocol="center", clicks=cfg.clicks, labels=[str(v) for v in h.labels] if h.labels else None),
            progress=False,
        )

        def dice(k: int, rows=rows) -> float:  # a failed call counts as Dice 0, as in the harness's curves
            return float(np.mean([r["dice"] if not np.isnan(r["dice"]) else 0.0 for r in rows if r["click"] == k]))

        prefix = "" if i == 0 else f"{h.name}."
        out |= {f"{prefix}dice_1": dice(1), f"{prefix}dice_{cfg.clicks}": dice(cfg.clicks)}
        out[f"{prefix}targets"] = len(rows) // cfg.clicks
    return out


def run_order(order: str, cfg: CurveConfig, workdir: Path, log=print) -> list[dict]:
    from ..monailabel.api_client import Sam3DClient
    from ..monailabel.local_server import running_server

    workdir = Path(workdir).resolve()
    studies = workdir / "studies"
    studies.mkdir(parents=True)
    labels = {}
    for case in cfg.pool:
        shutil.copy(case.image, studies / f"{case.name}.nii.gz")
        labels[case.name] = case.label
    served = workdir / "model.safetensors"
    shutil.copy(cfg.checkpoint, served)
    sidecar = Path(cfg.checkpoint).with_suffix(".yaml")
    if sidecar.is_file():
        shutil.copy(sidecar, served.with_suffix(".yaml"))
    conf = [
        ("model", cfg.model),
        ("checkpoint", served),
        ("device", cfg.device),
        ("train.val_split", 0),
        ("train.promote", "always"),
    ]
    rows = [{"order": order, "labelled": 0, "added": "", **measure(cfg, served), "model_sha256": file_sha256(served)}]
    log(f"[{order}] 0 labelled: {rows[-1]}")
    with running_server(workdir, studies, conf) as (url, _proc, _log):
        client = Sam3DClient(url, client_id="learning_curve", tmpdir=str(workdir / "client"))
        for n in range(1, len(cfg.pool) + 1):
            scoring = {}
            if order == "uncertainty":  # every unlabelled image, with the model just trained (none is cached yet)
                t0 = time.monotonic()
                _score_now(client)
                scoring = {"score_seconds": round(time.monotonic() - t0, 1), "scored_images": len(cfg.pool) - n + 1}
            sample = client.next_sample(order, {})
            if "id" not in sample:
                raise RuntimeError(
                    f"/activelearning/{order} handed out no image with {len(cfg.pool) - n + 1} unlabelled: {sample}"
                )
            image_id = sample["id"]
            client.save_label(image_id, str(labels[image_id]), tag="final")
            t0 = time.monotonic()
            stats = _train_and_wait(client, dict(cfg.train_params), cfg.train_timeout_s)
            row = {
                "order": order,
                "labelled": n,
                "added": image_id,
                **measure(cfg, served),
                "model_sha256": file_sha256(served),
                "train_seconds": round(time.monotonic() - t0, 1),
                "promoted": stats.get("promoted"),
                **scoring,
            }
            rows.append(row)
            log(f"[{order}] {n} labelled (+{image_id}): {row}")
    return rows


def plot_curves(rows: list[dict], path: Path, clicks: int) -> None:
    """Dice after 1 and after `clicks` clicks against labelled volumes, a line per run; the other held-out groups
    (`<name>.dice_<k>`), dashed, beside the domain's Dice after the last click."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    last = f"dice_{clicks}"
    others = sorted({k.rsplit(".", 1)[0] for r in rows for k in r if k.endswith("." + last)})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120, sharey=True)
    for ax, key in zip(axes, ("dice_1", last)):
        for n, order in enumerate(dict.fromkeys(r["order"] for r in rows)):
            own = [r for r in rows if r["order"] == order]
            line = ax.plot([r["labelled"] for r in own], [r[key] for r in own], marker="o", label=order)[0]
            for group in others if key == last else []:
                ax.plot(
                    [r["labelled"] for r in own],
                    [r[f"{group}.{last}"] for r in own],
                    ls="--",
                    color=line.get_color(),
                    label=f"{order}: {group}" if n == 0 or len(others) > 1 else None,
                )
        ax.set_title(f"held-out Dice after {key.split('_')[1]} click(s)", fontsize=9)
        ax.set_xlabel("labelled volumes")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1)  # as the harness's plots: a small change should look small
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean Dice")
    axes[0].legend(fontsize=7)
    if others:
        axes[1].legend(fontsize=7, title="dashed: other held-out groups", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
