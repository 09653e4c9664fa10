"""RefSAM3D (../shared/papers/refsam3d.txt, Section III): our 3D SAM segmenting from a text prompt.

- image encoder: our 3D ViT with a 3D adapter after every block (eq. 1), so the encoder itself can stay frozen;
  the adapted outputs of four blocks are the hierarchical stage features V'_1..V'_4 (eq. 4-5);
- text: token embeddings of a frozen text tower (`sam3d.text`, outside this module: no file I/O here), projected
  per token into the visual width (eq. 3), attended to by each stage (eq. 6-8); the fused result is a dense
  prompt added to the image embedding, and the projected sentence is one sparse prompt token;
- clicks, boxes and the previous mask use the ordinary prompt encoder, alone or with the text;
- the decoder reaches full resolution (four 2x steps, stages fused U-Net-like, image concatenated at the end).

Same interface as `Sam3D`: `encode_image` once per window, `decode` per prompt set. The "embedding" that
`encode_image` returns packs the neck output, the four stage features and the window itself into one flat
tensor per batch item, so that the engine's caches (bounded by tensor bytes) and the training loop (which slices
it per sample) keep working unchanged. `decode` returns logits at the window's full resolution; it accepts a
previous mask at any resolution.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Adapter3D
from .cross_modal import CrossModalProjector, HierarchicalCrossAttention, masked_mean
from .fullres_decoder import FullResMaskDecoder
from .image_encoder import ImageEncoderViT3D
from .prompt_encoder import PromptEncoder3D
from .sam3d import PRESETS, Sam3DConfig

NUM_STAGES = 4


@dataclass(frozen=True)
class RefSam3DConfig(Sam3DConfig):
    """Sam3DConfig's sizes plus the text parts. `stage_indexes` empty: four evenly spaced blocks, the last included."""

    adapter_dim: int = 32
    stage_indexes: tuple[int, ...] = ()
    decoder_channels: tuple[int, ...] = (96, 48, 24, 12)
    text_model: str = "minilm"  # sam3d.text.load_text_encoder's spec; `text_dim` must be its token width
    text_dim: int = 384
    projector_layers: int = 2  # 1: a linear projection (the "without projector" ablation)
    hierarchical: bool = True  # False: only the last stage meets the text (the "last stage only" ablation)
    vocabulary: tuple[str, ...] = ()  # the label names it was trained on (the engine's unknown-text gate)

    _TUPLES = ("stage_indexes", "decoder_channels", "vocabulary")  # YAML and JSON give lists

    @classmethod
    def from_dict(cls, values: dict) -> "RefSam3DConfig":
        return super().from_dict({k: tuple(v) if k in cls._TUPLES else v for k, v in values.items()})

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if self.patch_size != 16:
            problems.append("RefSAM3D's decoder upsamples 4 x 2x: patch_size must be 16")
        if len(self.decoder_channels) != 4:
            problems.append("decoder_channels needs 4 values (one per 2x step)")
        if self.stage_indexes and (
            len(self.stage_indexes) != NUM_STAGES or not all(0 <= i < self.encoder_depth for i in self.stage_indexes)
        ):
            problems.append(f"stage_indexes needs {NUM_STAGES} block indexes below encoder_depth")
        if self.feature_stages or self.semantic_prompts:
            problems.append("feature_stages/semantic_prompts belong to SegSAM-3D, not RefSAM3D")
        if self.projector_layers not in (1, 2):
            problems.append("projector_layers must be 1 or 2")
        if problems:
            raise ValueError("invalid RefSAM3D config: " + "; ".join(problems))

    @property
    def stages(self) -> tuple[int, ...]:
        if self.stage_indexes:
            return tuple(self.stage_indexes)
        d = self.encoder_depth
        return tuple(max((k + 1) * d // NUM_STAGES - 1, 0) for k in range(NUM_STAGES))

    def to_dict(self) -> dict:
        d = super().to_dict()
        for k in self._TUPLES:
            d[k] = list(d[k])
        return d


def _preset(base: str, **values) -> RefSam3DConfig:
    sizes = {k: v for k, v in asdict(PRESETS[base]).items() if k not in ("feature_stages", "semantic_prompts")}
    return RefSam3DConfig(**{**sizes, **values})


REFSAM3D_PRESETS: dict[str, RefSam3DConfig] = {
    # the compact network's sizes (its encoder weights load into it): CPU-sized
    "refsam3d_small": _preset("sam3d_small", adapter_dim=32, decoder_channels=(96, 48, 24, 12)),
    # SAM-Med3D-turbo's encoder and prompt encoder (its weights load with strict=False); for a GPU
    "refsam3d_turbo": _preset(
        "sam_med3d_turbo", adapter_dim=64, num_point_embeddings=4, decoder_channels=(128, 64, 32, 16)
    ),
    # a few thousand parameters around the text tower, for tests
    "refsam3d_tiny": _preset(
        "sam3d_small",
        img_size=32,
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(0, 1),
        prompt_embed_dim=48,
        decoder_num_heads=4,
        decoder_mlp_dim=64,
        iou_head_hidden_dim=16,
        mask_in_chans=8,
        adapter_dim=8,
        decoder_channels=(16, 8, 8, 4),
    ),
}


class RefSam3D(nn.Module):
    def __init__(self, config: RefSam3DConfig) -> None:
        super().__init__()
        c = self.config = config
        self.grid = c.img_size // c.patch_size
        self.image_encoder = ImageEncoderViT3D(
            img_size=c.img_size,
            patch_size=c.patch_size,
            in_chans=c.in_chans,
            embed_dim=c.encoder_embed_dim,
            depth=c.encoder_depth,
            num_heads=c.encoder_num_heads,
            mlp_ratio=c.mlp_ratio,
            out_chans=c.prompt_embed_dim,
            window_size=c.window_size,
            global_attn_indexes=c.encoder_global_attn_indexes,
        )
        self.adapters = nn.ModuleList(Adapter3D(c.encoder_embed_dim, c.adapter_dim) for _ in range(c.encoder_depth))
        self.prompt_encoder = PromptEncoder3D(
            embed_dim=c.prompt_embed_dim,
            image_embedding_size=self.grid,
            input_image_size=c.img_size,
            mask_in_chans=c.mask_in_chans,
            num_point_embeddings=c.num_point_embeddings,
            swap_dense_axes=c.swap_dense_pe_axes,
        )
        self.text_projector = CrossModalProjector(c.text_dim, c.encoder_embed_dim, c.projector_layers)
        attend = tuple(range(NUM_STAGES)) if c.hierarchical else (NUM_STAGES - 1,)
        self.cross_attention = HierarchicalCrossAttention(
            c.encoder_embed_dim, c.encoder_num_heads, NUM_STAGES, c.prompt_embed_dim, attend
        )
        self.text_token = nn.Linear(c.encoder_embed_dim, c.prompt_embed_dim)  # the sentence as a sparse prompt
        self.mask_decoder = FullResMaskDecoder(
            c.prompt_embed_dim,
            c.decoder_depth,
            c.decoder_num_heads,
            c.decoder_mlp_dim,
            c.encoder_embed_dim,
            c.decoder_channels,
            c.iou_head_hidden_dim,
            c.in_chans,
        )
        # the engine's interface (plain attributes: they never change); decode resizes any previous mask to
        # low_res_size, the size the prompt encoder reads
        self.img_size, self.low_res_size = c.img_size, self.prompt_encoder.mask_input_size
        self.supports_boxes, self.supports_text = self.prompt_encoder.supports_boxes, True

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S, S) -> (B, K) packed: neck output, the four adapted stage features, the window."""
        enc = self.image_encoder
        x = enc.patch_embed(image) + enc.pos_embed
        stages = []
        for i, (block, adapter) in enumerate(zip(enc.blocks, self.adapters)):
            x = adapter(block(x))
            stages += [x] * self.config.stages.count(i)
        neck = enc.neck(x.permute(0, 4, 1, 2, 3))
        b = image.shape[0]
        parts = [neck.reshape(b, -1), torch.stack(stages, 1).reshape(b, -1), image.reshape(b, -1)]
        return torch.cat([p.float() for p in parts], dim=1)

    def unpack(self, packed: torch.Tensor):
        """(neck (B, C, g, g, g), stages [(B, g, g, g, C_e)] * 4, window (B, in, S, S, S)) from `encode_image`."""
        c, g, b = self.config, self.grid, packed.shape[0]
        n_neck = c.prompt_embed_dim * g**3
        n_stages = NUM_STAGES * g**3 * c.encoder_embed_dim
        neck = packed[:, :n_neck].reshape(b, c.prompt_embed_dim, g, g, g)
        stages = packed[:, n_neck : n_neck + n_stages].reshape(b, NUM_STAGES, g, g, g, c.encoder_embed_dim).unbind(1)
        image = packed[:, n_neck + n_stages :].reshape(b, c.in_chans, c.img_size, c.img_size, c.img_size)
        return neck, list(stages), image

    def decode(
        self,
        image_embedding: torch.Tensor,
        points=None,
        boxes=None,
        mask_input=None,
        multimask_output: bool = False,
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """Prompts -> (logits at full resolution (B, 1, S, S, S), IoU prediction (B, 1)).

        text: (token embeddings (B, L, text_dim), mask (B, L) True for real tokens) from `sam3d.text`, or None
        (clicks only). Points and boxes are window voxel indices, as for `Sam3D.decode`.
        """
        if multimask_output:
            raise ValueError("RefSAM3D predicts one mask per prompt (multimask_output=False)")
        neck, stages, image = self.unpack(image_embedding)
        neck, stages = neck.to(self.dtype), [s.to(self.dtype) for s in stages]
        s = self.low_res_size
        if mask_input is not None and mask_input.shape[-1] != s:  # a full-resolution previous mask
            mask_input = F.interpolate(mask_input.float(), size=(s,) * 3, mode="trilinear", align_corners=False)
        if mask_input is not None:
            mask_input = mask_input.to(self.dtype)
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        skips = [st.permute(0, 4, 1, 2, 3) for st in stages]
        if text is not None:
            tokens, valid = text
            projected = self.text_projector(tokens.to(self.dtype))
            text_dense, skips = self.cross_attention(stages, projected, valid.bool())
            dense = dense + text_dense
            sentence = self.text_token(masked_mean(projected, valid))[:, None]
            sparse = torch.cat([sentence, sparse.expand(sentence.shape[0], -1, -1)], dim=1)
        return self.mask_decoder(neck, self.prompt_encoder.get_dense_pe(), sparse, dense, skips, image)

    @property
    def dtype(self) -> torch.dtype:
        return self.prompt_encoder.no_mask_embed.weight.dtype
