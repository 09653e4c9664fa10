"""The 3D-SAutoMed network for one slice step, its config and presets.

One step segments slice t: the slice encoder's features of t-1, t, t+1 (computed once per slice and reused) go
through the inter/intra-slice attention (local 3D awareness); the box-prompt generator turns the previous slice's
boxes into one prompt per class; the multi-class decoder reads the prompts and the history token (global 3D
awareness) and returns class logits and the next history. `sam3d.engine.auto` runs the steps over a volume.

Ablations switch one idea off in the config: `local_attention: false` (the features of t alone),
`history_tokens: 0` (no history), `box_prompts: false` (no prompt tokens).
"""

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ..lora import freeze_all_but_lora
from .box_generator import BoxPromptGenerator
from .decoder import MultiClassMaskDecoder
from .local_attention import InterIntraSliceAttention
from .positional import PositionEmbeddingRandom2D
from .slice_encoder import SliceEncoderViT

# BTCV's eight organs as TotalSegmentator names them (the paper's Table 1)
ABDOMEN = ("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas", "aorta")


@dataclass(frozen=True)
class AutoSam3DConfig:
    class_names: tuple[str, ...] = ABDOMEN
    img_size: int = 256  # slices are resized to this square
    patch_size: int = 16
    in_chans: int = 3  # a grey slice is repeated, as SAM wants RGB
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    embed_dim: int = 256  # the neck's output: width of everything after the encoder
    lora_rank: int = 4
    lora_alpha: float = 4.0
    freeze_encoder: bool = True  # only LoRA trains in the encoder
    local_attention: bool = True
    local_heads: int = 8
    history_tokens: int = 8
    box_prompts: bool = True
    box_depth: int = 2
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048

    @classmethod
    def from_dict(cls, values: dict) -> "AutoSam3DConfig":
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}; known: {sorted(f.name for f in fields(cls))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})  # YAML/JSON give lists

    def __post_init__(self) -> None:
        problems = []
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            problems.append("class_names must be distinct names, at least one")
        if self.img_size % self.patch_size:
            problems.append("img_size must be a multiple of patch_size")
        if self.encoder_embed_dim % self.encoder_num_heads:
            problems.append("encoder_num_heads must divide encoder_embed_dim")
        if self.embed_dim % 8 or self.embed_dim % self.local_heads or (self.embed_dim // 2) % self.decoder_num_heads:
            problems.append("embed_dim must be a multiple of 8, of local_heads and of 2 x decoder_num_heads")
        if self.history_tokens < 0:
            problems.append("history_tokens must be >= 0")
        if problems:
            raise ValueError("invalid network config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


AUTOSAM3D_PRESETS: dict[str, AutoSam3DConfig] = {
    # SAM ViT-B (Meta's sam_vit_b_01ec64.pth loads into `encoder`) on 256-pixel slices, as the paper's SAM-b
    "autosam3d_vit_b": AutoSam3DConfig(),
    # the CPU-sized network we train and ship: the same design, smaller numbers; no SAM weights exist at this
    # size, so its encoder trains from scratch with the rest (and needs no LoRA)
    "autosam3d_small": AutoSam3DConfig(
        img_size=128,
        patch_size=8,
        encoder_embed_dim=192,
        encoder_depth=4,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(1, 3),
        window_size=8,
        embed_dim=128,
        local_heads=4,
        history_tokens=4,
        decoder_num_heads=4,
        decoder_mlp_dim=512,
        freeze_encoder=False,
        lora_rank=0,
    ),
    # tests
    "autosam3d_tiny": AutoSam3DConfig(
        class_names=("liver", "spleen", "kidney_right"),
        img_size=32,
        patch_size=8,
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        window_size=2,
        embed_dim=32,
        lora_rank=2,
        local_heads=2,
        history_tokens=2,
        box_depth=1,
        decoder_depth=1,
        decoder_num_heads=2,
        decoder_mlp_dim=64,
    ),
}


class AutoSam3D(nn.Module):
    def __init__(self, config: AutoSam3DConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or AutoSam3DConfig()
        self.img_size = c.img_size
        self.class_names = list(c.class_names)
        k, d = len(c.class_names), c.embed_dim
        self.encoder = SliceEncoderViT(
            c.img_size,
            c.patch_size,
            c.in_chans,
            c.encoder_embed_dim,
            c.encoder_depth,
            c.encoder_num_heads,
            c.mlp_ratio,
            d,
            c.window_size,
            c.encoder_global_attn_indexes,
            c.lora_rank,
            c.lora_alpha,
        )
        if c.freeze_encoder:
            freeze_all_but_lora(self.encoder)
        self.pe_layer = PositionEmbeddingRandom2D(d // 2)
        self.local = InterIntraSliceAttention(d, c.local_heads) if c.local_attention else None
        self.box_generator = BoxPromptGenerator(k, d, c.decoder_num_heads, c.box_depth) if c.box_prompts else None
        self.decoder = MultiClassMaskDecoder(
            k, d, c.decoder_depth, c.decoder_num_heads, c.decoder_mlp_dim, c.history_tokens
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def encode(self, slices: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) normalised slices -> (N, C, S / patch, S / patch) features."""
        return self.encoder(slices.expand(-1, self.config.in_chans, -1, -1))

    def initial_history(self, batch: int) -> torch.Tensor | None:
        return self.decoder.initial_history(batch)

    def step(
        self,
        prev: torch.Tensor,
        cur: torch.Tensor,
        nxt: torch.Tensor,
        history: torch.Tensor | None = None,
        prev_boxes: torch.Tensor | None = None,
        prev_present: torch.Tensor | None = None,
    ) -> dict:
        """One slice: features (B, C, h, w) of t-1, t, t+1, the history so far, the previous slice's boxes.

        Returns {"logits": (B, 1 + K, 4h, 4w), "history": (B, K_his, C) | None, "boxes": [(B, K, 4)] per
        generator layer (empty without the generator), "anchors": (B, K, 4) | None}.
        """
        pos = self.pe_layer(*cur.shape[-2:])
        z = self.local(prev, cur, nxt, pos) if self.local is not None else cur
        prompts, boxes, anchors = None, [], None
        if self.box_generator is not None:
            prompts, boxes, anchors = self.box_generator(z, pos, prev_boxes, prev_present)
        logits, new_history = self.decoder(z, pos, prompts, history)
        return {"logits": logits, "history": new_history, "boxes": boxes, "anchors": anchors}
