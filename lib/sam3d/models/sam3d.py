"""The promptable 3D segmenter: image encoder + prompt encoder + mask decoder, and its size presets."""

from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D
from .segsam3d import SemanticPointPrompt


@dataclass(frozen=True)
class Sam3DConfig:
    """Every size of the network. The defaults are SAM-Med3D-turbo's (`vit_b_ori`)."""

    img_size: int = 128
    patch_size: int = 16
    in_chans: int = 1
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 384
    mask_in_chans: int = 16
    num_point_embeddings: int = 2
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    # SAM-Med3D's dense positional grid has its first two axes swapped against the clicks' codes; its weights need
    # the swap, our own from-scratch presets train without it (sam3d.models.prompt_encoder).
    swap_dense_pe_axes: bool = True
    # SegSAM-3D (sam3d.models.segsam3d): encoder blocks whose outputs are aggregated (empty: the last block only,
    # as SAM), and semantic point prompts
    feature_stages: tuple[int, ...] = ()
    semantic_prompts: bool = False

    @classmethod
    def from_dict(cls, values: dict) -> "Sam3DConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}; known: {sorted(known)}")
        values = dict(values)
        for key in ("encoder_global_attn_indexes", "feature_stages"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def __post_init__(self) -> None:
        problems = []
        if self.img_size % self.patch_size:
            problems.append("img_size must be a multiple of patch_size")
        if self.encoder_embed_dim % self.encoder_num_heads:
            problems.append("encoder_num_heads must divide encoder_embed_dim")
        if self.prompt_embed_dim % 3:
            problems.append("prompt_embed_dim must be a multiple of 3 (sin, cos, sin Fourier features)")
        if self.prompt_embed_dim % 8:
            problems.append("prompt_embed_dim must be a multiple of 8 (the decoder upscales to dim/8 channels)")
        if (self.prompt_embed_dim // 2) % self.decoder_num_heads or self.prompt_embed_dim % self.decoder_num_heads:
            problems.append("decoder_num_heads must divide prompt_embed_dim and prompt_embed_dim / 2")
        if self.mask_in_chans % 4:
            problems.append("mask_in_chans must be a multiple of 4")
        if self.num_point_embeddings not in (2, 4):
            problems.append("num_point_embeddings must be 2 (clicks) or 4 (clicks and boxes)")
        if self.feature_stages and (
            sorted(set(self.feature_stages)) != list(self.feature_stages)
            or self.feature_stages[-1] != self.encoder_depth - 1
            or self.feature_stages[0] < 0
            or len(self.feature_stages) < 2
        ):
            problems.append("feature_stages must be 2+ increasing block indexes ending with the last block")
        if problems:
            raise ValueError("invalid network config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        d["feature_stages"] = list(self.feature_stages)
        return d


PRESETS: dict[str, Sam3DConfig] = {
    # The published SAM-Med3D-turbo network: loads sam_med3d_turbo.pth with strict=True.
    "sam_med3d_turbo": Sam3DConfig(),
    # A compact network for CPU annotation: all-global attention on the 8^3 grid, boxes enabled.
    "sam3d_small": Sam3DConfig(
        encoder_embed_dim=384,
        encoder_depth=6,
        encoder_num_heads=6,
        encoder_global_attn_indexes=(0, 1, 2, 3, 4, 5),
        window_size=0,
        prompt_embed_dim=192,
        num_point_embeddings=4,
        decoder_mlp_dim=1024,
        iou_head_hidden_dim=128,
        swap_dense_pe_axes=False,
    ),
}
# SegSAM-3D: multi-layer feature sampling and semantic point prompts, on the compact network (blocks 2, 4 and 6
# aggregated) and on SAM-Med3D-turbo's (its four global-attention blocks; loads turbo weights with strict=False).
PRESETS["segsam3d"] = replace(PRESETS["sam3d_small"], feature_stages=(1, 3, 5), semantic_prompts=True)
PRESETS["segsam3d_turbo"] = replace(PRESETS["sam_med3d_turbo"], feature_stages=(2, 5, 8, 11), semantic_prompts=True)


class Sam3D(nn.Module):
    """A 3D SAM. `encode_image` once per window, then `decode` for each set of prompts."""

    def __init__(self, config: Sam3DConfig) -> None:
        super().__init__()
        c = config
        grid = c.img_size // c.patch_size
        self.config = c
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
            feature_stages=c.feature_stages,
        )
        self.prompt_encoder = PromptEncoder3D(
            embed_dim=c.prompt_embed_dim,
            image_embedding_size=grid,
            input_image_size=c.img_size,
            mask_in_chans=c.mask_in_chans,
            num_point_embeddings=c.num_point_embeddings,
            swap_dense_axes=c.swap_dense_pe_axes,
        )
        self.mask_decoder = MaskDecoder3D(
            transformer_dim=c.prompt_embed_dim,
            transformer_depth=c.decoder_depth,
            transformer_num_heads=c.decoder_num_heads,
            transformer_mlp_dim=c.decoder_mlp_dim,
            num_multimask_outputs=c.num_multimask_outputs,
            iou_head_hidden_dim=c.iou_head_hidden_dim,
        )
        self.semantic_prompt = (
            SemanticPointPrompt(c.prompt_embed_dim, c.img_size, c.decoder_num_heads, c.decoder_mlp_dim)
            if c.semantic_prompts
            else None
        )

    @property
    def img_size(self) -> int:
        return self.config.img_size

    @property
    def low_res_size(self) -> int:
        return self.prompt_encoder.mask_input_size

    @property
    def supports_boxes(self) -> bool:
        return self.prompt_encoder.supports_boxes

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S, S) normalised window -> image embedding."""
        return self.image_encoder(image)

    def decode(
        self,
        image_embedding: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in window voxel indices -> (low-res logits (B, M, s, s, s), IoU predictions (B, M))."""
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        if self.semantic_prompt is not None and points is not None:
            coords, labels = points  # the click tokens come first; SegSAM-3D refines them, not the padding
            n = coords.shape[1]
            sp = self.semantic_prompt(coords, image_embedding) * (labels >= 0)[..., None]
            sparse = torch.cat([sparse[:, :n] + sp.to(sparse.dtype), sparse[:, n:]], dim=1)
        return self.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )


def build_sam3d(preset: str = "sam_med3d_turbo", **overrides) -> Sam3D:
    """A network from a preset name, with any size overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {sorted(PRESETS)}")
    values = PRESETS[preset].to_dict()
    values.update(overrides)
    return Sam3D(Sam3DConfig.from_dict(values))
