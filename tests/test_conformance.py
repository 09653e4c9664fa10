"""Conformance with the official SAM-Med3D-turbo network, on the golden vectors of ../shared/conformance.

The weights are rebuilt bit-exactly from the package's synthetic-weight rule (make_weights.py), checked against
its SHA-256, saved as a checkpoint and loaded the way the app loads one (strict). Every golden output is compared
with rel = max|got - ref| / max|ref|: < 1e-4 in float32, < 1e-6 in float64 (the README's acceptance). The model
is built and the encoder run once per module. A last group breaks one quirk at a time and checks the comparison
flags it, so these tests can fail.
"""

import copy
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sam3d.engine.checkpoint import load_model, read_state_dict
from sam3d.models import build_sam3d

CONF = Path(__file__).resolve().parents[1].parent / "shared" / "conformance"
if not (CONF / "make_weights.py").is_file():
    pytest.skip(f"conformance package not found at {CONF}", allow_module_level=True)

F32_TOL = 1e-4
F64_TOL = 1e-6
CASES = ("A", "B")


def rel(got, ref) -> float:
    """max|got - ref| / max|ref|, computed in float64."""
    got = got.detach().cpu().double().numpy() if torch.is_tensor(got) else np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"shape {got.shape} != golden {ref.shape}"
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def assert_all_close(rels: dict[str, float], tol: float) -> None:
    bad = {k: v for k, v in rels.items() if not v < tol}
    assert not bad, f"rel >= {tol:g}: {bad} (all: {rels})"


def prompts(golden, case: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(golden[f"case{case}_points"]), torch.from_numpy(golden[f"case{case}_labels"])


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def make_weights():
    spec = importlib.util.spec_from_file_location("conformance_make_weights", CONF / "make_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def weights_np(make_weights) -> dict[str, np.ndarray]:
    return make_weights.make_state_dict(
        str(CONF / "sam_med3d_turbo_state_dict_manifest.json"), str(CONF / "weights_rule.json")
    )


@pytest.fixture(scope="module")
def weights(weights_np) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in weights_np.items()}


@pytest.fixture(scope="module")
def manifest() -> dict[str, list[int]]:
    man = json.loads((CONF / "sam_med3d_turbo_state_dict_manifest.json").read_text())
    return man.get("state_dict", man)


@pytest.fixture(scope="module")
def raw_checkpoint(weights, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("conformance") / "sam_med3d_turbo_synthetic.pth"
    torch.save(weights, path)
    return path


@pytest.fixture(scope="module")
def model(raw_checkpoint):
    """The turbo network, loaded from a bare state_dict `.pth` through the app's loader (strict)."""
    loaded = load_model({"preset": "sam_med3d_turbo", "checkpoint": str(raw_checkpoint)})
    assert not loaded.model.training
    return loaded.model


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(CONF / "golden_sam_med3d_turbo.npz"))


@pytest.fixture(scope="module")
def golden64():
    return dict(np.load(CONF / "golden_sam_med3d_turbo_float64.npz"))


@pytest.fixture(scope="module")
def taps():
    return dict(np.load(CONF / "golden_sam_med3d_turbo_intermediates.npz"))


@pytest.fixture(scope="module")
def encoded(model, golden):
    """One float32 encoder run: the embedding, the tokens entering block 0, and every block's output."""
    out: dict[str, torch.Tensor] = {}
    blocks = model.image_encoder.blocks
    hooks = [blocks[0].register_forward_pre_hook(lambda m, args: out.__setitem__("tokens_in", args[0].clone()))]
    for i, blk in enumerate(blocks):
        hooks.append(blk.register_forward_hook(lambda m, a, y, i=i: out.__setitem__(f"block{i:02d}", y.clone())))
    try:
        with torch.no_grad():
            out["embedding"] = model.encode_image(torch.from_numpy(golden["input"]))
    finally:
        for h in hooks:
            h.remove()
    return out


class DecoderTaps:
    """Captures the decoder internals the intermediates file holds, during one `decode` call."""

    def __init__(self, model):
        self.model, self.values, self.hooks = model, {}, []

    def __enter__(self):
        dec = self.model.mask_decoder

        def keep(name, fn=lambda y: y):
            return lambda m, a, y: self.values.__setitem__(name, fn(y).clone())

        self.hooks.append(dec.transformer.register_forward_hook(keep("tokens_out", lambda y: y[0])))
        self.hooks.append(dec.transformer.register_forward_hook(keep("image_tokens_out", lambda y: y[1])))
        self.hooks.append(dec.output_upscaling.register_forward_hook(keep("upscaled_c4", lambda y: y[:, :4])))
        for i, mlp in enumerate(dec.output_hypernetworks_mlps):
            self.hooks.append(mlp.register_forward_hook(keep(f"hyper{i}")))
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()

    @property
    def hyper_in(self) -> torch.Tensor:
        n = len(self.model.mask_decoder.output_hypernetworks_mlps)
        return torch.stack([self.values[f"hyper{i}"] for i in range(n)], dim=1)


# ---------------------------------------------------------------------------------------------- weights


def test_generated_weights_match_checksums(weights_np, manifest):
    sums = json.loads((CONF / "weights_checksums.json").read_text())
    assert list(weights_np) == list(manifest)
    total = hashlib.sha256()
    for key in manifest:
        arr = weights_np[key]
        assert arr.dtype == np.float32 and list(arr.shape) == list(manifest[key]), key
        total.update(memoryview(np.ascontiguousarray(arr.astype("<f4", copy=False))).cast("B"))
    if total.hexdigest() != sums["all_keys_in_manifest_order_sha256"]:
        per_key = sums["per_key_sha256_of_float32_little_endian_C_order"]
        wrong = [k for k in manifest if hashlib.sha256(weights_np[k].astype("<f4").tobytes()).hexdigest() != per_key[k]]
        pytest.fail(f"generated weights differ from weights_checksums.json in {len(wrong)} tensors: {wrong[:10]}")


def test_state_dict_layout_matches_manifest(model, manifest):
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) == set(manifest), (sorted(set(ours) - set(manifest)), sorted(set(manifest) - set(ours)))
    assert ours == {k: list(v) for k, v in manifest.items()}


def test_raw_and_wrapped_pth_load_strict(model, weights, raw_checkpoint, tmp_path):
    raw = read_state_dict(raw_checkpoint)
    assert list(raw) == list(weights)
    assert all(torch.equal(raw[k], weights[k]) for k in weights)
    # the loaded model holds exactly the generated weights
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())

    # SAM-Med3D's training checkpoints wrap the weights, next to optimizer state and counters
    wrapped_path = tmp_path / "sam_med3d_turbo_wrapped.pth"
    torch.save(
        {"model_state_dict": weights, "epoch": 3, "optimizer_state_dict": {"state": {}, "param_groups": []}},
        wrapped_path,
    )
    wrapped = read_state_dict(wrapped_path)
    assert list(wrapped) == list(weights)
    assert all(torch.equal(wrapped[k], weights[k]) for k in weights)
    result = model.load_state_dict(wrapped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


# ---------------------------------------------------------------------------------------------- float32


def test_image_embedding(encoded, golden):
    assert encoded["embedding"].dtype == torch.float32
    assert rel(encoded["embedding"], golden["image_embedding"]) < F32_TOL


def test_encoder_block_taps(encoded, taps):
    rels = {"tokens_in": rel(encoded["tokens_in"][..., :96], taps["enc_tokens_in_c96"])}
    for i in range(12):
        rels[f"block{i:02d}"] = rel(encoded[f"block{i:02d}"][..., :96], taps[f"enc_block{i:02d}_out_c96"])
    assert_all_close(rels, F32_TOL)


def test_image_pe(model, golden):
    pe = model.prompt_encoder.get_dense_pe()
    assert pe.dtype == torch.float32
    assert rel(pe, golden["image_pe"]) < F32_TOL


@pytest.mark.parametrize("case", CASES)
def test_case_outputs(model, golden, taps, case):
    """Each case on its own: the golden image embedding and the stored mask input go in."""
    pts = prompts(golden, case)
    mask_input = torch.from_numpy(golden[f"case{case}_mask_input"])
    emb = torch.from_numpy(golden["image_embedding"])
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=pts, boxes=None, masks=mask_input)
        with DecoderTaps(model) as dt:
            low, iou = model.decode(emb, points=pts, mask_input=mask_input, multimask_output=False)
    rels = {
        "sparse": rel(sparse, golden[f"case{case}_sparse_embeddings"]),
        "dense": rel(dense, golden[f"case{case}_dense_embeddings"]),
        "low_res_masks": rel(low, golden[f"case{case}_low_res_masks"]),
        "iou": rel(iou, golden[f"case{case}_iou_predictions"]),
        "dec_tokens_out": rel(dt.values["tokens_out"], taps[f"case{case}_dec_tokens_out"]),
        "hyper_in": rel(dt.hyper_in, taps[f"case{case}_hyper_in"]),
    }
    if case == "A":
        rels["dec_image_tokens_out"] = rel(dt.values["image_tokens_out"], taps["caseA_dec_image_tokens_out"])
        rels["upscaled_c4"] = rel(dt.values["upscaled_c4"], taps["caseA_upscaled_embedding_c4"])
    assert_all_close(rels, F32_TOL)


def test_multimask_and_no_mask_taps(model, golden, taps):
    pts = prompts(golden, "A")
    emb = torch.from_numpy(golden["image_embedding"])
    with torch.no_grad():
        multi_low, multi_iou = model.decode(
            emb, points=pts, mask_input=torch.from_numpy(golden["caseA_mask_input"]), multimask_output=True
        )
        nomask_low, nomask_iou = model.decode(emb, points=pts, mask_input=None, multimask_output=False)
    assert_all_close(
        {
            "multimask_low_res_masks": rel(multi_low, taps["caseA_multimask_low_res_masks"]),
            "multimask_iou": rel(multi_iou, taps["caseA_multimask_iou_predictions"]),
            "nomask_low_res_masks": rel(nomask_low, taps["caseA_nomask_low_res_masks"]),
            "nomask_iou": rel(nomask_iou, taps["caseA_nomask_iou_predictions"]),
        },
        F32_TOL,
    )


def test_chained_end_to_end(model, encoded, golden):
    """Our own embedding, and our own case A logits as case B's mask input (errors would accumulate)."""
    with torch.no_grad():
        low_a, iou_a = model.decode(
            encoded["embedding"], points=prompts(golden, "A"), mask_input=torch.zeros(1, 1, 32, 32, 32)
        )
        low_b, iou_b = model.decode(encoded["embedding"], points=prompts(golden, "B"), mask_input=low_a)
    assert_all_close(
        {
            "caseA_low_res_masks": rel(low_a, golden["caseA_low_res_masks"]),
            "caseA_iou": rel(iou_a, golden["caseA_iou_predictions"]),
            "caseB_low_res_masks": rel(low_b, golden["caseB_low_res_masks"]),
            "caseB_iou": rel(iou_b, golden["caseB_iou_predictions"]),
        },
        F32_TOL,
    )


# ---------------------------------------------------------------------------------------------- float64


def test_float64(weights, golden, golden64):
    """The network in float64, with the Fourier PE kept in float32 as the official network forces (README,
    quirk 3).

    Our PE layer follows its buffer's dtype, so it is cast back to float32 explicitly; its output then equals
    the float32 golden `image_pe` bit for bit, and the rest of the network runs in float64. (Built on the meta
    device and assigned the weights: a deep copy plus `.double()` of 100 M parameters costs 3 s more.)
    """
    with torch.device("meta"):
        m64 = build_sam3d("sam_med3d_turbo")
    m64.load_state_dict({k: v.double() for k, v in weights.items()}, strict=True, assign=True)
    m64.eval().prompt_encoder.pe_layer.float()
    pe = m64.prompt_encoder.get_dense_pe()
    assert pe.dtype == torch.float32
    assert rel(pe, golden["image_pe"]) == 0.0
    with torch.no_grad():
        emb = m64.encode_image(torch.from_numpy(golden["input"]).double())
        assert emb.dtype == torch.float64
        rels = {"image_embedding": rel(emb, golden64["image_embedding"])}
        for case in CASES:
            pts = prompts(golden, case)
            # case B's stored float64 mask input is the float64 case A logits (chained)
            key = f"case{case}_mask_input"
            mask_input = torch.from_numpy(golden64[key] if key in golden64 else golden[key]).double()
            sparse, dense = m64.prompt_encoder(points=pts, boxes=None, masks=mask_input)
            low, iou = m64.decode(emb, points=pts, mask_input=mask_input)
            assert low.dtype == torch.float64 and iou.dtype == torch.float64
            rels[f"case{case}_sparse"] = rel(sparse, golden64[f"case{case}_sparse_embeddings"])
            rels[f"case{case}_dense"] = rel(dense, golden64[f"case{case}_dense_embeddings"])
            rels[f"case{case}_low_res_masks"] = rel(low, golden64[f"case{case}_low_res_masks"])
            rels[f"case{case}_iou"] = rel(iou, golden64[f"case{case}_iou_predictions"])
    assert_all_close(rels, F64_TOL)


# ---------------------------------------------------------------------------------------------- the test can fail


def _decode_with_mistake(model, golden, case, mistake, monkeypatch):
    pts, labels = prompts(golden, case)
    emb = torch.from_numpy(golden["image_embedding"])
    mask_input = torch.from_numpy(golden[f"case{case}_mask_input"])
    pe_layer = model.prompt_encoder.pe_layer
    if mistake == "dense PE without the axis swap":
        dense = pe_layer.dense
        # the swapped grid transposed back along axes 2 and 3 is the grid without the swap
        monkeypatch.setattr(pe_layer, "dense", lambda size: dense(size).transpose(1, 2))
    elif mistake == "reversed point coordinate order":
        pts = pts.flip(-1)
    elif mistake == "no +0.5 point shift":
        pts = pts - 0.5
    if mistake == "no padding (not-a-point) token":
        sparse, dense_emb = model.prompt_encoder(points=(pts, labels), boxes=None, masks=mask_input)
        low, _ = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse[:, :-1], dense_emb, False)
        return low
    if mistake == "token 1 taken when multimask_output=False":
        return model.decode(emb, points=(pts, labels), mask_input=mask_input, multimask_output=True)[0][:, :1]
    return model.decode(emb, points=(pts, labels), mask_input=mask_input)[0]


# README "What the vectors catch": rel deviation of case A / case B logits from the official model
MISTAKES = {
    "dense PE without the axis swap": (0.35, 0.28),
    "no padding (not-a-point) token": (0.31, 0.27),
    "reversed point coordinate order": (0.13, 0.46),
    "no +0.5 point shift": (0.040, 0.039),
    "token 1 taken when multimask_output=False": (1.56, 1.66),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
@pytest.mark.parametrize("case", CASES)
def test_broken_decoder_quirk_is_caught(model, golden, case, mistake, monkeypatch):
    with torch.no_grad():
        low = _decode_with_mistake(model, golden, case, mistake, monkeypatch)
    deviation = rel(low, golden[f"case{case}_low_res_masks"])
    expected = MISTAKES[mistake][CASES.index(case)]
    assert deviation > F32_TOL
    assert 0.5 * expected < deviation < 2 * expected, f"{mistake}: rel {deviation:.3g}, README {expected}"
    if mistake == "dense PE without the axis swap" and case == "A":
        assert deviation > 0.1


def test_broken_window_padding_is_caught(model, encoded, taps):
    """Block 0 with the padded keys masked out: the same block run globally on the 8^3 real tokens, with the
    rows of its 27-row tables that an 8^3 grid reaches (offsets -7..7). Every key the quirky terms read is
    then a real token, so this is exactly 'mask the padded keys'."""
    blk = copy.deepcopy(model.image_encoder.blocks[0])
    for name in ("rel_pos_d", "rel_pos_h", "rel_pos_w"):
        table = getattr(blk.attn, name)
        setattr(blk.attn, name, torch.nn.Parameter(table[14 - 8 : 14 + 7].clone()))
    blk.window_size = 0
    with torch.no_grad():
        masked = blk(encoded["tokens_in"])
    ok = rel(encoded["block00"][..., :96], taps["enc_block00_out_c96"])
    broken = rel(masked[..., :96], taps["enc_block00_out_c96"])
    assert ok < F32_TOL
    assert broken > 100 * F32_TOL, broken
