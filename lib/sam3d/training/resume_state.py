"""A run's resume state made small enough to commit (a recipe's `resume_from`), and its restoration.

`state.pt` holds the float32 weights and Adam's two moments: three times the weights. The compact state keeps the
weights in float16, Adam's second moments in bfloat16 and drops the first moments, which rebuild within tens of
steps (beta1 0.9) where the second moments would take thousands (beta2 0.999); the step and the schedule are kept.
"""

import torch


def compact_state(state: dict) -> dict:
    """A copy of a trainer state (`step`, `model`, `optimizer`, `scheduler`) as described above."""
    optimizer = state["optimizer"]
    moments = {
        k: {n: (v.to(torch.bfloat16) if n == "exp_avg_sq" else v) for n, v in s.items() if n != "exp_avg"}
        for k, s in optimizer["state"].items()
    }
    return {
        **state,
        "model": {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()},
        "optimizer": {**optimizer, "state": moments},
    }


def restore_first_moments(optimizer: torch.optim.Optimizer) -> None:
    """After loading a compact state: zero first moments where they were dropped (Adam needs both)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st and "exp_avg_sq" in st and "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(p)
