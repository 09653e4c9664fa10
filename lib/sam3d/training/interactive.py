"""The click loop of interactive training, as SAM-Med3D trains: a first prompt, then corrective clicks on the errors.

Per sample (one target in one window): the image is encoded once; round 1 gives a first click (or, with
`box_prob` and a model with box embeddings, a jittered box) and a zero low-res mask, as the engine does on a
first click; each later round adds one click from the shared click simulator (`sam3d.data.clicks`) on the
errors of the previous prediction, which is fed back as the low-res mask (detached). `mask_only_rounds` random
rounds after the first give the previous mask alone (SAM-Med3D's `random_insert`). The loss is the mean over
rounds of the segmentation loss of the upsampled logits, plus `iou_loss_weight` times the MSE of the IoU head.
Clicks are float voxel indices of the window along tensor axes 2, 3, 4, exactly what the engine sends.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.clicks import ClickSimulator, Prompt, center_click
from ..data.prior_masks import perturbed_mask
from ..metrics import batch_dice


@dataclass
class InteractiveConfig:
    rounds: int = 5
    mask_only_rounds: int = 1
    protocols: tuple = ("random", "center")  # per sample, one of these with `protocol_probs`
    protocol_probs: tuple = (0.5, 0.5)
    box_prob: float = 0.15
    box_jitter_mm: float = 5.0
    spacing_mm: float = 1.5
    loss_resolution: str = "full"  # "full" (SAM-Med3D: logits upsampled to the window) or "low" (32^3)
    iou_loss_weight: float = 1.0
    # "all": every round has a loss (SAM-Med3D). "last": the batch runs 1..rounds rounds (drawn per step), only the
    # last with gradients and a loss, the earlier ones simulate the clicks so far (RITM's, nnInteractive's way):
    # for a network that runs again on every click, one backward pass per sample instead of one per round.
    grad_rounds: str = "all"
    # `grad_rounds: last` only: the share of samples that start from a near-correct previous mask
    # (`sam3d.data.prior_masks`) instead of none, half with a first click, half with a click on its errors
    prior_mask_prob: float = 0.0
    # `grad_rounds: last` only: how often each round (1..rounds) is the one with gradients; uniform when empty
    last_round_probs: tuple = ()

    @classmethod
    def from_dict(cls, d: dict | None) -> "InteractiveConfig":
        d = dict(d or {})
        bad = set(d) - set(cls.__dataclass_fields__)
        if bad:
            raise ValueError(f"unknown interactive settings {sorted(bad)}")
        for k in ("protocols", "protocol_probs", "last_round_probs"):
            if k in d:
                d[k] = tuple(d[k])
        out = cls(**d)
        if out.grad_rounds not in ("all", "last"):
            raise ValueError(f"interactive.grad_rounds must be 'all' or 'last', got {out.grad_rounds!r}")
        if out.prior_mask_prob and out.grad_rounds != "last":
            raise ValueError("interactive.prior_mask_prob needs grad_rounds: last (the rounds it starts from a mask)")
        if out.last_round_probs and (out.grad_rounds != "last" or len(out.last_round_probs) != out.rounds):
            raise ValueError("interactive.last_round_probs needs grad_rounds: last and one weight per round")
        return out


def click_config(recipe: dict, engine_cfg) -> InteractiveConfig:
    """The recipe's `interactive` section; clicks are simulated at the model's voxel spacing."""
    return InteractiveConfig.from_dict(
        {"spacing_mm": float(engine_cfg.spacing[0]), **(recipe.get("interactive") or {})}
    )


def _next_prompt(sim: ClickSimulator, gt: np.ndarray, pred, r: int, first_click=None) -> Prompt:
    """The simulator's prompt; for a sample that gives its first click (a click on air, whose answer is empty),
    that click, then a negative click inside the largest false positive."""
    if first_click is None:
        return sim.next(gt, pred, r)
    if r == 1:
        return Prompt(points=[(tuple(first_click), True)])
    click = center_click(gt, pred, sim.spacing)
    return Prompt(points=[] if click is None else [click])


def _sample_rounds(core, emb, gt, seed, cfg, loss_fn, autocast, size, on_round=None, first_click=None):
    """(mean loss over rounds, Dice per round) of one sample; `on_round(r, pred)` sees each binary prediction."""
    rng = np.random.default_rng(seed)
    protocol = str(rng.choice(list(cfg.protocols), p=np.asarray(cfg.protocol_probs) / np.sum(cfg.protocol_probs)))
    use_box = core.supports_boxes and rng.random() < cfg.box_prob and first_click is None
    sim = ClickSimulator(protocol, seed=rng, spacing=cfg.spacing_mm)
    mask_only = set()
    if cfg.rounds > 1 and cfg.mask_only_rounds > 0:
        k = min(cfg.mask_only_rounds, cfg.rounds - 1)
        mask_only = {int(r) for r in rng.choice(np.arange(2, cfg.rounds + 1), size=k, replace=False)}
    gt_np = gt[0, 0].detach().cpu().numpy() > 0.5
    s = core.low_res_size
    gt_low = F.interpolate(gt.float(), size=(s,) * 3, mode="trilinear", align_corners=False)
    low = torch.zeros((1, 1, s, s, s), device=emb.device, dtype=torch.float32)
    points, point_labels, box = [], [], None
    pred = None
    loss_total = emb.new_zeros((), dtype=torch.float32)
    dice = np.zeros(cfg.rounds)
    for r in range(1, cfg.rounds + 1):
        if r == 1 and use_box:
            boxes = ClickSimulator("box", seed=rng, spacing=cfg.spacing_mm, box_jitter_mm=cfg.box_jitter_mm)
            prompt = boxes.next(gt_np)
            lo, hi = prompt.box
            box = torch.tensor([lo, hi], dtype=torch.float32, device=emb.device)[None]
        elif r not in mask_only:
            prompt = _next_prompt(sim, gt_np, pred, r, first_click)
            for p, positive in prompt.points:
                points.append(p)
                point_labels.append(1 if positive else 0)
        pts = None
        if r not in mask_only and points:
            pts = (
                torch.tensor(points, dtype=torch.float32, device=emb.device)[None],
                torch.tensor(point_labels, dtype=torch.int64, device=emb.device)[None],
            )
        boxes = box if r not in mask_only else None
        if pts is None and boxes is None and r not in mask_only:
            boxes = box  # a perfect prediction before any click: keep what there is
        with autocast():
            logits, iou_pred = core.decode(emb, points=pts, boxes=boxes, mask_input=low)
        logits, iou_pred = logits.float(), iou_pred.float()
        if cfg.loss_resolution == "low":
            seg_loss = loss_fn(logits, (gt_low > 0.5).float())
            up = F.interpolate(logits.detach(), size=(size,) * 3, mode="trilinear", align_corners=False)
        else:
            up = F.interpolate(logits, size=(size,) * 3, mode="trilinear", align_corners=False)
            seg_loss = loss_fn(up, gt)
        with torch.no_grad():
            hard = up.detach() > 0
            inter = (hard & (gt > 0.5)).sum().float()
            union = (hard | (gt > 0.5)).sum().float()
            iou = inter / union.clamp_min(1)
            dice[r - 1] = float(batch_dice(hard, gt)[0])
        loss_total = loss_total + seg_loss + cfg.iou_loss_weight * F.mse_loss(iou_pred[:, 0], iou.reshape(1))
        pred = hard[0, 0].cpu().numpy()
        if on_round is not None:
            on_round(r, pred)
        low = logits.detach()
    return loss_total / cfg.rounds, dice


def _batch_last_round(core, emb, gt, seeds, cfg, loss_fn, autocast, first_clicks=None):
    """`grad_rounds: last`: the whole batch clicks round by round; only the last round (1..rounds, drawn from the
    first sample's seed) has gradients. `first_clicks`: per sample, a given first click or None (a batch with one
    starts from clicks, not a box). Returns (loss of that round, batch Dice per round; rounds after the last repeat
    its Dice)."""
    n, size, device = emb.shape[0], core.img_size, emb.device
    first_clicks = first_clicks or [None] * n
    rngs = [np.random.default_rng(int(s)) for s in seeds]
    if cfg.last_round_probs:  # (uniform keeps its own draw: the earlier legs' recipe samples as it did)
        weights = np.asarray(cfg.last_round_probs, dtype=np.float64)
        last = int(rngs[0].choice(np.arange(1, cfg.rounds + 1), p=weights / weights.sum()))
    else:
        last = int(rngs[0].integers(1, cfg.rounds + 1))
    probs = np.asarray(cfg.protocol_probs) / np.sum(cfg.protocol_probs)
    sims = [ClickSimulator(str(r.choice(list(cfg.protocols), p=probs)), seed=r, spacing=cfg.spacing_mm) for r in rngs]
    gt_np = gt[:, 0].detach().cpu().numpy() > 0.5
    boxes = None
    box_batch = core.supports_boxes and rngs[0].random() < cfg.box_prob
    if box_batch and all(c is None for c in first_clicks):  # the whole batch starts from a box
        corners = [
            ClickSimulator("box", seed=r, spacing=cfg.spacing_mm, box_jitter_mm=cfg.box_jitter_mm).next(g).box
            for r, g in zip(rngs, gt_np)
        ]
        boxes = torch.tensor(corners, dtype=torch.float32, device=device)
    clicks = [[] for _ in range(n)]
    preds = [None] * n
    low = torch.zeros((n, 1, size, size, size), device=device)
    offset = [0] * n  # 1: the sample's first click corrects its prior, as a second click would
    for b in range(n):
        if boxes is None and first_clicks[b] is None and rngs[b].random() < cfg.prior_mask_prob:
            preds[b] = perturbed_mask(gt_np[b], rngs[b])
            low[b, 0] = torch.from_numpy(preds[b]).float() * 2 - 1
            offset[b] = int(rngs[b].random() < 0.5)
    dice = np.zeros(cfg.rounds)
    for r in range(1, last + 1):
        for b in range(n):
            if r > 1 or boxes is None:
                clicks[b] += _next_prompt(sims[b], gt_np[b], preds[b], r + offset[b], first_clicks[b]).points
        most = max(1, max(len(c) for c in clicks))
        coords = torch.zeros((n, most, 3), device=device)
        labels = torch.full((n, most), -1, dtype=torch.int64, device=device)  # -1: padding
        for b, c in enumerate(clicks):
            if c:
                coords[b, : len(c)] = torch.tensor([p for p, _ in c], dtype=torch.float32)
                labels[b, : len(c)] = torch.tensor([int(pos) for _, pos in c])
        with torch.set_grad_enabled(r == last and torch.is_grad_enabled()), autocast():
            logits, _ = core.decode(emb, points=(coords, labels), boxes=boxes, mask_input=low)
        logits = logits.float()
        hard = logits.detach() > 0
        dice[r - 1] = float(batch_dice(hard, gt).mean())
        preds = list(hard[:, 0].cpu().numpy())
        low = logits.detach()
    dice[last:] = dice[last - 1]
    return loss_fn(logits, gt), torch.as_tensor(dice, dtype=torch.float32)
