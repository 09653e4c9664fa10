"""Text prompts: a frozen open_clip text tower (offline), cached label-name embeddings, and name variants."""

from .encoder import (
    DEFAULT_TEXT_MODEL,
    TextEmbedding,
    TextEncoder,
    TextModelMissingError,
    load_text_encoder,
    load_text_encoder_for,
)
from .variants import name_to_words, normalize_prompt, prompt_variants, random_prompt

__all__ = [
    "DEFAULT_TEXT_MODEL",
    "TextEmbedding",
    "TextEncoder",
    "TextModelMissingError",
    "load_text_encoder",
    "load_text_encoder_for",
    "name_to_words",
    "normalize_prompt",
    "prompt_variants",
    "random_prompt",
]
