"""The slice encoder of 3D-SAutoMed against Meta's `segment-anything` 1.0 (test-only reference), and its LoRA."""

from functools import partial

import pytest
import torch

from sam3d.models.autosam3d.slice_encoder import SliceEncoderViT, adapt_sam_state_dict
from sam3d.models.lora import LoRALinear, freeze_all_but_lora, is_lora_parameter

segment_anything = pytest.importorskip("segment_anything")
from segment_anything.modeling.image_encoder import ImageEncoderViT  # noqa: E402

VIT_B = dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11), window_size=14)


def _reference(img_size: int, **kw) -> torch.nn.Module:
    """Meta's encoder as build_sam builds it (eps 1e-6 norms, relative positions)."""
    return ImageEncoderViT(
        img_size=img_size,
        patch_size=kw.get("patch_size", 16),
        in_chans=3,
        mlp_ratio=4.0,
        embed_dim=kw["embed_dim"],
        depth=kw["depth"],
        num_heads=kw["num_heads"],
        out_chans=kw.get("out_chans", 256),
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=kw["window_size"],
        global_attn_indexes=kw["global_attn_indexes"],
    )


def _randomise(module: torch.nn.Module, seed: int) -> dict:
    """Every tensor random (position tables too, which SAM initialises to zero), so each term is exercised."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=g) * 0.05 + (1.0 if k.endswith("norm1.weight") else 0.0)
        for k, v in module.state_dict().items()
    }


def test_key_set_equals_meta_vit_b_checkpoint():
    """The full-size ViT-B (1024 px) has exactly the `image_encoder.*` keys and shapes of sam_vit_b_01ec64.pth."""
    from segment_anything import sam_model_registry

    sam = sam_model_registry["vit_b"]()
    ref = {
        k[len("image_encoder.") :]: tuple(v.shape)
        for k, v in sam.state_dict().items()
        if k.startswith("image_encoder.")
    }
    del sam
    ours = SliceEncoderViT(img_size=1024, **VIT_B)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref
    # with LoRA: the same keys plus the low-rank factors only
    lora = SliceEncoderViT(img_size=1024, lora_rank=4, **VIT_B)
    extra = set(lora.state_dict()) - set(ref)
    assert set(ref) <= set(lora.state_dict()) and extra and all(is_lora_parameter(k) for k in extra)


@pytest.mark.parametrize("img_size", [256])  # 16x16 tokens: windows of 14 split and zero-pad, globals see all
def test_vit_b_outputs_equal_segment_anything(img_size):
    ref = _reference(img_size, **VIT_B).eval()
    state = _randomise(ref, seed=1)
    ref.load_state_dict(state)
    ours = SliceEncoderViT(img_size=img_size, lora_rank=4, **VIT_B).eval()
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and all(is_lora_parameter(k) for k in missing)
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert a.shape == b.shape == (1, 256, img_size // 16, img_size // 16)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)  # LoRA's B starts at zero: exactly SAM


def test_small_config_equals_segment_anything_and_loads_resized_checkpoint():
    small = dict(
        embed_dim=64, depth=3, num_heads=4, global_attn_indexes=(2,), window_size=3, patch_size=8, out_chans=32
    )
    ref = _reference(80, **small).eval()  # 10x10 tokens, windows of 3 with padding
    ref.load_state_dict(_randomise(ref, seed=3))
    ours = SliceEncoderViT(img_size=80, **small).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 80, 80, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    # a checkpoint made for 80 px loads into a 48 px encoder (position tables resized), as SAM's 1024 px into ours
    smaller = SliceEncoderViT(img_size=48, **small)
    sam_style = {f"image_encoder.{k}": v for k, v in ref.state_dict().items()}
    smaller.load_state_dict(adapt_sam_state_dict(sam_style, smaller))
    assert smaller(torch.randn(1, 3, 48, 48)).shape == (1, 32, 6, 6)


def test_lora_layer_starts_as_base_and_only_lora_gets_gradients():
    lin = LoRALinear(8, 12, rank=2, alpha=4.0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))

    enc = SliceEncoderViT(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        window_size=2,
        global_attn_indexes=(1,),
        out_chans=16,
        lora_rank=2,
    )
    freeze_all_but_lora(enc)
    with torch.no_grad():  # B != 0, so A gets gradients too
        for name, p in enc.named_parameters():
            if name.endswith("lora_b"):
                p.normal_()
    enc(torch.randn(1, 3, 32, 32)).square().mean().backward()
    grads = {n: p.grad for n, p in enc.named_parameters()}
    assert all(g is None for n, g in grads.items() if not is_lora_parameter(n))  # the frozen base gets none
    lora = [g for n, g in grads.items() if is_lora_parameter(n)]
    assert len(lora) == 4 and all(g is not None and g.abs().sum() > 0 for g in lora)
