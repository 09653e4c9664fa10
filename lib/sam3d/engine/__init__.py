"""Inference: an image plus prompts in, a label volume on the image's own grid out."""

from .checkpoint import LoadedModel, WeightsMissingError, load_model, read_state_dict, save_checkpoint
