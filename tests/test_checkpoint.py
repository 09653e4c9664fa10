"""Checkpoint I/O: safetensors round trips, atomic writes, safe `.pth` reading, strict loading, missing weights."""

import hashlib
import os
import pickle
import stat

import pytest
import torch
import yaml
from safetensors.torch import save_file

from sam3d.engine import checkpoint as ckpt
from sam3d.engine.checkpoint import WeightsMissingError, load_model, read_state_dict, save_checkpoint
from sam3d.models import build_sam3d

SMALL = {"preset": "sam3d_small", "network": {"encoder_depth": 2, "encoder_global_attn_indexes": [0, 1]}}


@pytest.fixture(scope="module")
def small():
    """A reduced `sam3d_small` with every parameter random (norm weights and rel-pos tables included)."""
    torch.manual_seed(0)
    model = build_sam3d(SMALL["preset"], **SMALL["network"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def outputs(model):
    x = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(1))
    pts = (torch.tensor([[[60.0, 64.0, 70.0], [20.0, 30.0, 40.0]]]), torch.tensor([[1, 0]]))
    with torch.no_grad():
        emb = model.encode_image(x)
        return (emb, *model.decode(emb, points=pts, boxes=torch.tensor([[[40.0, 40, 40], [90, 90, 90]]])))


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


# ---------------------------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip_with_yaml(small, tmp_path):
    path = tmp_path / "models" / "small.safetensors"
    save_checkpoint(small, path, SMALL)
    assert sorted(p.name for p in path.parent.iterdir()) == ["small.safetensors", "small.yaml"]  # nothing else
    assert yaml.safe_load(path.with_suffix(".yaml").read_text()) == SMALL
    assert_same_state(read_state_dict(path), small.state_dict())

    # the yaml beside the weights is a model config: with a relative checkpoint it loads the same network
    config = {**yaml.safe_load(path.with_suffix(".yaml").read_text()), "checkpoint": "models/small.safetensors"}
    loaded = load_model(config, base_dir=tmp_path)
    assert not loaded.model.training
    assert loaded.checkpoint == str(path)
    assert loaded.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_same_state(loaded.model.state_dict(), small.state_dict())
    for got, want in zip(outputs(loaded.model), outputs(small)):
        assert torch.equal(got, want)

    # the sidecar yaml says which network the weights are for: it wins over a model config that disagrees
    other = load_model({"preset": "sam_med3d_turbo", "network": {}, "checkpoint": str(path)})
    assert other.model.config == small.config
    assert_same_state(other.model.state_dict(), small.state_dict())


def test_update_saved_config_adds_to_the_config_and_leaves_the_weights(small, tmp_path):
    path = tmp_path / "small.safetensors"
    save_checkpoint(small, path, SMALL, half=True)
    before = read_state_dict(path)
    ckpt.update_saved_config(path, {"familiarity": {"mean": [0.5, 1.5], "threshold": 2.0}})
    after = read_state_dict(path)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # still float16
    want = {**SMALL, "familiarity": {"mean": [0.5, 1.5], "threshold": 2.0}}
    assert ckpt.saved_config(path) == want == yaml.safe_load(path.with_suffix(".yaml").read_text())
    assert load_model({"checkpoint": str(path)}).saved == want


def test_half_precision_checkpoint_loads_as_float32(small, tmp_path):
    path = tmp_path / "small_fp16.safetensors"
    save_checkpoint(small, path, SMALL, half=True)
    stored = read_state_dict(path)
    assert {v.dtype for v in stored.values()} == {torch.float16}
    model = load_model({**SMALL, "checkpoint": str(path)}).model
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, small.state_dict()[k].half().float()), k


def test_save_overwrites_atomically(small, tmp_path):
    path = tmp_path / "small.safetensors"
    save_checkpoint(small, path, SMALL)
    first = path.read_bytes()
    save_checkpoint(small, path, {**SMALL, "note": "second"})
    assert_same_state(read_state_dict(path), small.state_dict())
    # the config travels inside the weights file, so one replace updates both together
    assert ckpt.saved_config(path)["note"] == "second" and path.read_bytes() != first
    assert yaml.safe_load(path.with_suffix(".yaml").read_text())["note"] == "second"
    path.with_suffix(".yaml").unlink()  # the YAML is only for people
    assert ckpt.saved_config(path)["note"] == "second"
    assert leftovers(tmp_path) == []


def test_failure_mid_write_keeps_the_old_file(small, tmp_path, monkeypatch):
    path = tmp_path / "small.safetensors"
    save_checkpoint(small, path, SMALL)
    old_weights, old_yaml = path.read_bytes(), path.with_suffix(".yaml").read_bytes()

    def half_written(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 1000)  # a partial file in the temporary path ...
        raise OSError("disk full")  # ... then the writer dies

    monkeypatch.setattr(ckpt, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(small, path, {**SMALL, "note": "never written"})
    assert path.read_bytes() == old_weights
    assert path.with_suffix(".yaml").read_bytes() == old_yaml
    assert leftovers(tmp_path) == []
    assert_same_state(read_state_dict(path), small.state_dict())

    # an interrupted yaml write leaves the old yaml whole as well
    monkeypatch.undo()
    monkeypatch.setattr(ckpt.yaml, "safe_dump", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(small, path, {**SMALL, "note": "never written"})
    assert path.with_suffix(".yaml").read_bytes() == old_yaml
    assert leftovers(tmp_path) == []


def test_saved_files_get_the_usual_permissions(small, tmp_path):
    path = tmp_path / "small.safetensors"
    old = os.umask(0o022)
    try:
        save_checkpoint(small, path, SMALL)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.with_suffix(".yaml").stat().st_mode) == 0o644


# ---------------------------------------------------------------------------------------------- .pth files


@pytest.mark.parametrize("wrapper", [None, "model_state_dict", "state_dict", "model"])
def test_pth_wrappers(small, tmp_path, wrapper):
    state = small.state_dict()
    path = tmp_path / "weights.pth"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 7, "lr": [1e-4]}, path)
    assert_same_state(read_state_dict(path), state)


class _Exploit:
    """Unpickling this would run code: create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pth_with_arbitrary_objects_is_refused(small, tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "exploit.pth"
    torch.save({"model_state_dict": small.state_dict(), "args": _Exploit(marker)}, path)
    with pytest.raises((pickle.UnpicklingError, ValueError)) as err:
        read_state_dict(path)
    assert not marker.exists(), "unpickling ran code from the checkpoint"
    message = str(err.value)
    assert "weights only" in message.lower() or "weights_only" in message, message
    assert "makedirs" in message  # names what it refused
    with pytest.raises((pickle.UnpicklingError, ValueError)):
        load_model({**SMALL, "checkpoint": str(path)})
    assert not marker.exists()


def test_pth_without_tensors_is_refused(tmp_path):
    path = tmp_path / "not_weights.pth"
    torch.save({"model_state_dict": {"a": 1}, "epoch": 3}, path)
    with pytest.raises(ValueError, match="no state_dict of tensors"):
        read_state_dict(path)


# ---------------------------------------------------------------------------------------------- load_model


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(WeightsMissingError) as err:
        load_model({**SMALL, "checkpoint": "models/absent.safetensors"}, base_dir=tmp_path)
    assert str(tmp_path / "models" / "absent.safetensors") in str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(WeightsMissingError, match="no checkpoint configured"):
        load_model({"preset": "sam_med3d_turbo", "checkpoint": None})


def test_strict_loading(small, tmp_path):
    state = {k: v.contiguous() for k, v in small.state_dict().items()}
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in state.items() if k != "mask_decoder.iou_token.weight"}, str(missing))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*mask_decoder\.iou_token\.weight"):
        load_model({**SMALL, "checkpoint": str(missing)})

    extra = tmp_path / "extra.safetensors"
    save_file({**state, "image_encoder.extra": torch.zeros(3)}, str(extra))
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*image_encoder\.extra"):
        load_model({**SMALL, "checkpoint": str(extra)})

    # the right keys for another network size: refused, not silently reshaped (no sidecar yaml to say otherwise)
    other = tmp_path / "other.safetensors"
    save_file(state, str(other))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_model(
            {
                "preset": "sam3d_small",
                "network": {"encoder_depth": 2, "encoder_embed_dim": 192, "encoder_global_attn_indexes": [0, 1]},
                "checkpoint": str(other),
            }
        )


def test_unknown_preset_and_setting(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_model({"preset": "sam3d_small", "checkpoint": str(corrupt)})
    path = tmp_path / "w.pth"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="unknown model preset"):
        load_model({"preset": "sam_huge", "checkpoint": str(path)})
    with pytest.raises(ValueError, match="unknown model settings"):
        load_model({"preset": "sam3d_small", "network": {"depth": 3}, "checkpoint": str(path)})


def test_full_sam3d_small_round_trip(tmp_path):
    """The `sam3d_small` preset as configured (no overrides): save, load, same outputs."""
    torch.manual_seed(2)
    model = build_sam3d("sam3d_small").eval()
    config = {"preset": "sam3d_small", "network": {}}
    path = tmp_path / "sam3d_small.safetensors"
    save_checkpoint(model, path, config)
    loaded = load_model({**yaml.safe_load(path.with_suffix(".yaml").read_text()), "checkpoint": str(path)}).model
    assert loaded.config == model.config
    assert_same_state(loaded.state_dict(), model.state_dict())
    for got, want in zip(outputs(loaded), outputs(model)):
        assert torch.equal(got, want)


def test_factory(tmp_path, monkeypatch):
    (tmp_path / "my_sam_factory.py").write_text(
        "import torch\ndef build(config):\n    m = torch.nn.Linear(2, 2)\n    m.seen = dict(config)\n    return m\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model({"factory": "my_sam_factory:build", "checkpoint": "whatever.bin"})
    assert isinstance(loaded.model, torch.nn.Linear) and not loaded.model.training
    assert loaded.model.seen["checkpoint"] == "whatever.bin"
    assert loaded.checkpoint == "whatever.bin" and loaded.checkpoint_sha256 is None
    with pytest.raises(ValueError, match="module:callable"):
        load_model({"factory": "my_sam_factory.build"})
