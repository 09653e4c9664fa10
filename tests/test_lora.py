"""Fine-tuning LoRA (`sam3d.models.lora.add_lora`): exact at the start, folded into the network's own keys on export."""

import pytest
import torch

from sam3d.models import build_network
from sam3d.models.lora import LoRALinear, add_lora, merged_state_dict
from tiny_datastore import tiny_network


def _tiny():
    torch.manual_seed(0)
    return build_network("sam3d_small", **tiny_network()).eval()


def test_added_lora_starts_exact_and_its_update_folds_into_the_same_keys():
    model = _tiny()
    keys = set(model.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    before = model.encode_image(x)
    added = add_lora(model, ["image_encoder"], ["qkv"], rank=2, alpha=4.0)
    assert added == [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(added) == len(model.image_encoder.blocks)
    assert torch.equal(model.encode_image(x), before)  # B = 0: the pretrained projection exactly
    with torch.no_grad():
        for name in added:
            model.get_submodule(name).lora_b.normal_(0, 0.1)  # as if trained
    tuned = model.encode_image(x)
    assert not torch.allclose(tuned, before)

    merged = merged_state_dict(model)
    assert set(merged) == keys  # the served network's keys: no lora_a/lora_b
    plain = _tiny()
    plain.load_state_dict(merged, strict=True)
    assert torch.allclose(plain.encode_image(x), tuned, atol=1e-5)


def test_add_lora_names_what_it_could_not_find():
    with pytest.raises(ValueError, match=r"no linear layer named \['query'\] under \['image_encoder'\]"):
        add_lora(_tiny(), ["image_encoder"], ["query"], rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_lora(_tiny(), ["image_encoder"], ["qkv"], rank=0, alpha=2.0)
