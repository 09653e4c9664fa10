"""What the trainer asks of a model family: one step object per kind of model (point, text, auto).

A step is an `nn.Module` (so that DistributedDataParallel sees one forward pass) that owns the network and
everything its loss needs, built from the recipe by `from_recipe`. The trainer's loop calls, in order: `dataset`
once, `forward` on every micro-batch (with the batch fields named in `batch_keys` after the seeds), and
`validate` every `validation.every` steps.
"""

from torch import nn
from torch.utils.data import Dataset


class TrainingStep(nn.Module):
    batch_keys: tuple[str, ...] = ()  # batch fields `forward` takes after the seeds

    @classmethod
    def from_recipe(cls, model: nn.Module, recipe: dict, root, sidecar: dict, engine_cfg, autocast) -> "TrainingStep":
        raise NotImplementedError

    def dataset(self, volumes, engine_cfg, sampling, seed: int) -> Dataset:
        """Sample `i` of the run, a function of the seed and `i` alone (so that a resumed run continues)."""
        raise NotImplementedError

    def forward(self, images, labels, seeds, *batch_values):
        """-> (loss to minimise, Dice per round of the micro-batch: a 1-D tensor, first round first)."""
        raise NotImplementedError

    def validate(self, dataset, samples: int, clicks: int, device) -> dict:
        raise ValueError(f"{type(self).__name__} has no validation: remove the recipe's `validation` section")
