"""Does a click model look at the image? One `center` click on fixed held-out windows, answered three times: with
the window, with the window replaced by zeros and by noise. A model that only draws a ball around the click gives
the same mask all three times (agreement 1) and the same Dice."""

import contextlib

import numpy as np
import torch

from ..data.clicks import center_click
from ..metrics import dice


@torch.no_grad()
def image_dependence(model, dataset, samples: int, spacing_mm: float, autocast=contextlib.nullcontext) -> dict:
    """Mean Dice against the reference with the real, zeroed and noise windows, and the mean Dice between the masks
    of the real and the zeroed window (`agreement`). `autocast`: the engine's precision context."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    scores = {"real": [], "zeros": [], "noise": [], "agreement": []}
    for i in range(samples):
        item = dataset[i]
        gt = item["label"][0].numpy() > 0.5
        point, _ = center_click(gt, None, (spacing_mm,) * 3)
        points = (torch.tensor([[point]], dtype=torch.float32), torch.tensor([[1]]))
        image = item["image"][None]
        masks = {}
        for name, window in (
            ("real", image),
            ("zeros", torch.zeros_like(image)),
            ("noise", torch.randn(image.shape, generator=g)),
        ):
            size = model.low_res_size
            with autocast():
                logits, _ = model.decode(
                    model.encode_image(window), points=points, mask_input=torch.zeros((1, 1, size, size, size))
                )
            masks[name] = logits[0, 0].float().numpy() > 0
            scores[name].append(dice(masks[name], gt))
        scores["agreement"].append(dice(masks["real"], masks["zeros"]))
    return {k: float(np.mean(v)) for k, v in scores.items()}
