"""LoRA: a frozen linear layer plus a trainable low-rank update (Hu et al. 2021).

Two uses: 3D-SAutoMed's slice encoder has LoRA in its architecture (`lora_rank`; the low-rank weights are part of
its checkpoints), and fine-tuning any network with `add_lora` (the train task's `trainable: lora`), whose updates
are folded into the base weights when the checkpoint is written (`merged_state_dict`), so the served network keeps
its architecture and its checkpoint keys.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    """`nn.Linear` + (alpha / r) * B A x. The base keeps the names `weight`/`bias`, so SAM checkpoints load as they are.

    B starts at zero: before training the layer computes exactly the pretrained projection.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        rank: int = 0,
        alpha: float = 1.0,
        merge_on_export: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.rank = int(rank)
        self.merge_on_export = merge_on_export  # added for fine-tuning: not part of the network's checkpoints
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

    def merged_weight(self) -> torch.Tensor:
        return self.weight + (self.lora_b @ self.lora_a) * self.scaling if self.rank > 0 else self.weight


def is_lora_parameter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")


def freeze_all_but_lora(module: nn.Module) -> None:
    """Only the low-rank updates of `module` train; its pretrained weights stay as loaded."""
    for name, p in module.named_parameters():
        p.requires_grad_(is_lora_parameter(name))


def add_lora(model: nn.Module, modules: list[str], layers: list[str], rank: int, alpha: float) -> list[str]:
    """Replace the `nn.Linear` layers named `layers` (last name part, e.g. "qkv") under the `modules` prefixes by
    LoRA layers with the same weights; returns their names. Freezing is the caller's (the recipe's `freeze`)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear
        and name.rsplit(".", 1)[-1] in layers
        and any(name == p or name.startswith(p + ".") for p in modules)
    ]
    if not targets:
        raise ValueError(f"no linear layer named {list(layers)} under {list(modules)}: nothing to add LoRA to")
    for name, old in targets:
        new = LoRALinear(
            old.in_features, old.out_features, bias=old.bias is not None, rank=rank, alpha=alpha, merge_on_export=True
        ).to(old.weight.device)
        new.load_state_dict(old.state_dict(), strict=False)  # weight and bias; the low-rank pair starts as init
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return [name for name, _ in targets]


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with fine-tuning LoRA folded into the base weights and its low-rank keys dropped."""
    state = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and m.merge_on_export and m.rank > 0:
            prefix = f"{name}." if name else ""
            state[prefix + "weight"] = m.merged_weight().detach()
            del state[prefix + "lora_a"], state[prefix + "lora_b"]
    return state
