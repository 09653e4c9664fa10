"""LoRA: a frozen linear layer plus a trainable low-rank update (Hu et al. 2021), as 3D-SAutoMed tunes SAM's encoder."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    """`nn.Linear` + (alpha / r) * B A x. The base keeps the names `weight`/`bias`, so SAM checkpoints load as they are.

    B starts at zero: before training the layer computes exactly the pretrained projection.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 0,
                 alpha: float = 1.0) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.rank = int(rank)
        if self.rank > 0:
            self.lora_a = nn.Parameter(torch.empty(self.rank, in_features))
            self.lora_b = nn.Parameter(torch.zeros(out_features, self.rank))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            self.scaling = float(alpha) / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.rank > 0:
            out = out + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling
        return out


def is_lora_parameter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")


def freeze_all_but_lora(module: nn.Module) -> None:
    """Only the low-rank updates of `module` train; its pretrained weights stay as loaded."""
    for name, p in module.named_parameters():
        p.requires_grad_(is_lora_parameter(name))
