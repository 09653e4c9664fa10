"""Published weights in one command (`sam3d.engine.weights_registry`, `bash scripts/setup.sh fetch NAME`), with no
internet: a local hub answering for HF_ENDPOINT and a plain file host, both on 127.0.0.1 (tests/fake_hub.py).

Small fakes (the click model's and a tiny ViT's state_dicts) cover the download rules: success, a tampered file
(wrong SHA-256, wrong keys, not weights only) refused and not installed, an interrupted transfer continued in the
same run and by the next run, offline failing at once with the by-hand instructions. The real `sam_med3d_turbo`
entry is fetched from the local hub through `setup.sh` (a turbo-layout checkpoint from
../shared/conformance/make_weights.py), loaded through the app's config path and checked against the golden
outputs; the slow test serves it from a real server started by `setup.sh server --weights sam_med3d_turbo`.
"""

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fake_hub import FakeHub, FileHost, sha256_of
from sam3d.engine import weights_registry as wr
from sam3d.engine.weights_registry import REGISTRY, WeightsCheckError, WeightsError, WeightsOfflineError
from sam3d.models import build_network

REPO = Path(__file__).resolve().parents[1]
CHUNK = 1 << 16  # huggingface_hub writes what it received in chunks of this size
CONF = REPO.parent / "shared" / "conformance"
SETUP = REPO / "scripts" / "setup.sh"

HUB_ENTRY = dataclasses.replace(
    REGISTRY["sam_med3d_turbo"],
    name="tiny_hub",
    filename="tiny_hub.pth",
    repo_id="tests/tiny",
    preset="clicknet_small",
    model_config="clicknet",
    known_sha256=None,
)


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No real cache, token or weights folder of the user's; no hub but the test's."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # a text test in this process may have forced it on
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)  # 10 MB otherwise: more than the small files
    monkeypatch.setenv("SAM3D_WEIGHTS_DIR", str(tmp_path / "default_weights"))
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "clicknet_small.pth"
    torch.manual_seed(0)
    torch.save(build_network("clicknet_small").state_dict(), path)
    return path


@pytest.fixture
def hub(monkeypatch, small_ckpt):
    with FakeHub() as hub:
        hub.publish("tests/tiny", "tiny_hub.pth", small_ckpt)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


def registry(*entries):
    return {e.name: e for e in entries}


def installed(folder: Path) -> list[str]:
    """What a user sees in the folder (the lock file aside)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.exists() else []


# ---------------------------------------------------------------------------------------------- the registry


def test_registry_entries_say_where_from_licence_what_they_serve_and_how_checked():
    assert {"sam_med3d_turbo", "sam_vit_b"} <= set(REGISTRY)
    for w in REGISTRY.values():
        assert w.publisher and w.licence and w.licence_source and w.size and w.serves and w.checks()
        assert bool(w.repo_id) != bool(w.url), "one source: a Hugging Face repository or a plain address"
        if w.model_config:
            cfg = REPO / "configs" / "models" / f"{w.model_config}.yaml"
            import yaml

            assert yaml.safe_load(cfg.read_text())["preset"] == w.preset
    turbo, vit_b = REGISTRY["sam_med3d_turbo"], REGISTRY["sam_vit_b"]
    assert (turbo.repo_id, turbo.filename) == ("blueyo0/SAM-Med3D", "sam_med3d_turbo.pth")
    assert vit_b.url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert vit_b.sha256_prefix and vit_b.sha256_prefix in vit_b.filename  # Meta's names carry their hash


def test_turbo_check_is_the_conformance_manifest():
    man = json.loads((CONF / "sam_med3d_turbo_state_dict_manifest.json").read_text())
    man = man.get("state_dict", man)
    assert wr.expected_shapes(REGISTRY["sam_med3d_turbo"]) == {k: tuple(v) for k, v in man.items()}


def test_vit_b_check_is_segment_anythings_image_encoder():
    sam = pytest.importorskip("segment_anything")
    with torch.device("meta"):
        ref = sam.sam_model_registry["vit_b"]()
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k.startswith("image_encoder.")}
    assert wr.expected_shapes(REGISTRY["sam_vit_b"]) == want
    other = {k: v for k, v in ref.state_dict().items() if not k.startswith("image_encoder.")}
    assert other and not wr.compare_state_dict(
        REGISTRY["sam_vit_b"], {**{k: torch.empty(s, device="meta") for k, s in want.items()}, **other}
    )


# ---------------------------------------------------------------------------------------------- the hub


def test_fetch_from_the_hub_installs_the_checked_file_and_a_rerun_needs_no_network(hub, small_ckpt, tmp_path):
    dest = tmp_path / "weights"
    path = wr.fetch("tiny_hub", dest, registry=registry(HUB_ENTRY))
    assert path == dest / "tiny_hub.pth" and path.read_bytes() == small_ckpt.read_bytes()
    assert installed(dest) == ["tiny_hub.pth", "tiny_hub.pth.json"]
    sidecar = json.loads((dest / "tiny_hub.pth.json").read_text())
    assert sidecar["sha256"] == sha256_of(small_ckpt) and sidecar["licence"] == HUB_ENTRY.licence
    assert sidecar["commit"] == "0123456789abcdef0123456789abcdef01234567" and sidecar["revision"] == "main"
    # huggingface_hub's requests: HEAD on {endpoint}/{repo}/resolve/{revision}/{file}, then the bytes from the CDN
    assert [r[:2] for r in hub.requests] == [("HEAD", "/tests/tiny/resolve/main/tiny_hub.pth")]
    assert [r[0] for r in hub.cdn.requests] == ["GET"]

    hub.requests.clear()
    hub.cdn.requests.clear()
    assert wr.fetch("tiny_hub", dest, registry=registry(HUB_ENTRY)) == path  # checked again, on disk
    assert wr.ensure("tiny_hub", dest, registry=registry(HUB_ENTRY)) == path
    assert hub.requests == [] and hub.cdn.requests == []


def test_a_revision_is_asked_for_by_name(hub, small_ckpt, tmp_path):
    hub.publish("tests/tiny", "tiny_hub.pth", small_ckpt, revision="v2")
    wr.fetch("tiny_hub", tmp_path, revision="v2", registry=registry(HUB_ENTRY))
    assert hub.requests[0][1] == "/tests/tiny/resolve/v2/tiny_hub.pth"
    assert json.loads((tmp_path / "tiny_hub.pth.json").read_text())["revision"] == "v2"


def test_a_file_other_than_the_hub_states_is_refused_and_not_installed(hub, small_ckpt, tmp_path):
    tampered = tmp_path / "tampered.pth"
    data = bytearray(small_ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    hub.publish("tests/tiny", "tiny_hub.pth", tampered, sha256=sha256_of(small_ckpt))  # the original's digest
    dest = tmp_path / "weights"
    with pytest.raises(WeightsCheckError, match="SHA-256 is .* not " + sha256_of(small_ckpt)) as e:
        wr.fetch("tiny_hub", dest, registry=registry(HUB_ENTRY))
    assert "nothing was installed" in str(e.value)
    assert installed(dest) == []  # no weights, no sidecar, no part


def test_a_hub_that_states_no_sha256_still_gets_the_other_checks_and_says_so(hub, small_ckpt, tmp_path):
    hub.publish("tests/tiny", "tiny_hub.pth", small_ckpt, sha256="v1-not-a-digest")  # e.g. a mirror's own ETag
    path = wr.fetch("tiny_hub", tmp_path, registry=registry(HUB_ENTRY))
    assert json.loads(path.with_name(path.name + ".json").read_text())["checked"].startswith("no SHA-256")


@pytest.mark.parametrize("change", ["missing key", "other shape", "not weights only"])
def test_a_file_that_is_not_the_presets_state_dict_is_refused(hub, small_ckpt, tmp_path, change):
    state = torch.load(small_ckpt, weights_only=True)
    key = next(iter(state))
    if change == "missing key":
        del state[key]
    elif change == "other shape":
        state[key] = torch.zeros(3, 3)
    else:
        state["note"] = Path("/etc/passwd")  # an object: torch.load(weights_only=True) refuses the file
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    hub.publish("tests/tiny", "tiny_hub.pth", bad)  # its own, correct digest: only the contents are wrong
    dest = tmp_path / "weights"
    with pytest.raises(WeightsCheckError) as e:
        wr.fetch("tiny_hub", dest, registry=registry(HUB_ENTRY))
    expected = {
        "missing key": f"1 missing keys: {key}",
        "other shape": f"other shapes: {key} [3, 3]",
        "not weights only": "not loadable as weights only",
    }
    assert expected[change] in str(e.value)
    assert installed(dest) == []


def test_an_interrupted_transfer_is_continued_in_the_same_run(hub, small_ckpt, tmp_path):
    cut = small_ckpt.stat().st_size // 3 // CHUNK * CHUNK
    hub.cdn.cut_after, hub.cdn.cuts_left = cut, 1  # the connection drops a third of the way
    path = wr.fetch("tiny_hub", tmp_path, registry=registry(HUB_ENTRY))
    assert path.read_bytes() == small_ckpt.read_bytes()
    assert [r[2] for r in hub.cdn.requests] == [None, f"bytes={cut}-"]


def test_an_interrupted_download_leaves_nothing_installed_and_the_next_run_continues_it(hub, small_ckpt, tmp_path):
    half = small_ckpt.stat().st_size // 2 // CHUNK * CHUNK
    hub.cdn.cut_after, hub.cdn.cuts_left, hub.cdn.down_after_cut = half, 1, True  # then the host is down
    dest = tmp_path / "weights"
    with pytest.raises(WeightsError, match="run the same command again to continue") as e:
        wr.fetch("tiny_hub", dest, registry=registry(HUB_ENTRY))
    assert not isinstance(e.value, WeightsCheckError)
    assert "tiny_hub.pth" not in installed(dest) and (dest / ".tiny_hub.pth.part").stat().st_size == half

    hub.cdn.down = False
    hub.cdn.requests.clear()
    path = wr.fetch("tiny_hub", dest, registry=registry(HUB_ENTRY))
    assert path.read_bytes() == small_ckpt.read_bytes()
    assert [r[2] for r in hub.cdn.requests] == [f"bytes={half}-"]  # only the rest was asked for
    assert installed(dest) == ["tiny_hub.pth", "tiny_hub.pth.json"]


def test_a_part_of_another_version_is_not_continued(hub, small_ckpt, tmp_path):
    dest = tmp_path / "weights"
    dest.mkdir()
    (dest / ".tiny_hub.pth.part").write_bytes(b"x" * 1000)
    (dest / ".tiny_hub.pth.part.json").write_text(json.dumps({"source": "elsewhere", "tag": "old", "size": 5}))
    assert wr.fetch("tiny_hub", dest, registry=registry(HUB_ENTRY)).read_bytes() == small_ckpt.read_bytes()
    assert [r[2] for r in hub.cdn.requests] == [None]


def test_a_copy_in_huggingface_hubs_cache_needs_no_network(monkeypatch, small_ckpt, tmp_path):
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    digest = sha256_of(small_ckpt)
    repo = cache / "models--tests--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    shutil.copy(small_ckpt, repo / "blobs" / digest)
    (repo / "refs" / "main").write_text("c0ffee")
    (repo / "snapshots" / "c0ffee" / "tiny_hub.pth").symlink_to(repo / "blobs" / digest)
    assert constants.HF_HUB_CACHE == str(cache)  # the autouse fixture's
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = wr.fetch("tiny_hub", tmp_path / "weights", registry=registry(HUB_ENTRY))
    assert path.read_bytes() == small_ckpt.read_bytes()


# ---------------------------------------------------------------------------------------------- a plain host


@pytest.fixture
def vit_files(tmp_path):
    """A SAM-style checkpoint of the tiny 3D-SAutoMed encoder (image_encoder.* plus SAM's other parts), and its
    registry entry: a plain address, the SHA-256's first hex digits in the file name, as Meta publishes."""
    torch.manual_seed(1)
    enc = build_network("autosam3d_tiny", lora_rank=0).encoder
    state = {f"image_encoder.{k}": v for k, v in enc.state_dict().items()}
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 8)  # SAM's 2D decoder: in the file, not used
    path = tmp_path / "published.pth"
    torch.save(state, path)
    prefix = sha256_of(path)[:6]
    entry = dataclasses.replace(
        REGISTRY["sam_vit_b"],
        name="tiny_vit",
        filename=f"sam_tiny_{prefix}.pth",
        sha256_prefix=prefix,
        preset="autosam3d_tiny",
        network={"lora_rank": 0},
    )
    return path, entry


def test_plain_host_download_checks_the_prefix_in_the_name(vit_files, tmp_path):
    path, entry = vit_files
    with FileHost() as host:
        entry = dataclasses.replace(entry, url=host.add(f"/segment_anything/{entry.filename}", path))
        got = wr.fetch("tiny_vit", tmp_path / "weights", registry=registry(entry))
    assert got.name == entry.filename and got.read_bytes() == path.read_bytes()
    assert [r[0] for r in host.requests] == ["HEAD", "GET"]
    assert json.loads(got.with_name(got.name + ".json").read_text())["source"] == entry.url


def test_plain_host_tampered_file_is_refused(vit_files, tmp_path):
    path, entry = vit_files
    state = torch.load(path, weights_only=True)
    next(iter(state.values())).add_(1.0)  # same keys and shapes, other values: only the hash can tell
    torch.save(state, tmp_path / "tampered.pth")
    with FileHost() as host:
        entry = dataclasses.replace(entry, url=host.add(f"/x/{entry.filename}", tmp_path / "tampered.pth"))
        with pytest.raises(WeightsCheckError, match=f"starts with {entry.sha256_prefix}"):
            wr.fetch("tiny_vit", tmp_path / "weights", registry=registry(entry))
    assert installed(tmp_path / "weights") == []


def test_plain_host_interrupted_then_continued(vit_files, tmp_path):
    path, entry = vit_files
    half = path.stat().st_size // 2 // CHUNK * CHUNK
    with FileHost() as host:
        entry = dataclasses.replace(entry, url=host.add(f"/x/{entry.filename}", path))
        host.cut_after, host.cuts_left, host.down_after_cut = half, 1, True
        with pytest.raises(WeightsError, match="continue"):
            wr.fetch("tiny_vit", tmp_path, registry=registry(entry))
        host.down = False
        wr.fetch("tiny_vit", tmp_path, registry=registry(entry))
    assert (tmp_path / entry.filename).read_bytes() == path.read_bytes()
    assert host.requests[-1] == ("GET", f"/x/{entry.filename}", f"bytes={half}-")


# ---------------------------------------------------------------------------------------------- offline, by hand


@pytest.mark.parametrize("how", ["unreachable", "HF_HUB_OFFLINE"])
def test_offline_fails_at_once_saying_how_to_place_the_file_by_hand(monkeypatch, tmp_path, how):
    if how == "unreachable":  # a free port, closed again: nothing listens there
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dest = tmp_path / "weights"
    started = time.monotonic()
    with pytest.raises(WeightsOfflineError) as e:
        wr.fetch("sam_med3d_turbo", dest)
    assert time.monotonic() - started < 5
    message = str(e.value)
    assert "place it by hand" in message and str(dest / "sam_med3d_turbo.pth") in message
    assert "blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth" in message
    assert installed(dest) == []


def test_a_file_placed_by_hand_is_checked_without_network(monkeypatch, small_ckpt, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dest = tmp_path / "weights"
    dest.mkdir()
    shutil.copy(small_ckpt, dest / "tiny_hub.pth")
    assert wr.fetch("tiny_hub", dest, registry=registry(HUB_ENTRY)) == dest / "tiny_hub.pth"
    sidecar = json.loads((dest / "tiny_hub.pth.json").read_text())
    assert sidecar["source"] == "placed by hand" and sidecar["sha256"] == sha256_of(small_ckpt)
    # later damage is found against the digest recorded then; the user's file stays where it is
    data = bytearray((dest / "tiny_hub.pth").read_bytes())
    data[100] ^= 0xFF
    (dest / "tiny_hub.pth").write_bytes(bytes(data))
    with pytest.raises(WeightsCheckError, match="fails the checks.*Delete it and fetch again"):
        wr.fetch("tiny_hub", dest, registry=registry(HUB_ENTRY))
    assert (dest / "tiny_hub.pth").is_file()


# ---------------------------------------------------------------------------------------------- the users


def test_recipes_take_a_registry_name_where_they_take_a_checkpoint(tmp_path):
    from sam3d.training import load_recipe

    recipe = load_recipe(
        REPO / "configs" / "train" / "sam_med3d_finetune.yaml", ["model.init_checkpoint=sam_med3d_turbo"]
    )
    with pytest.raises(FileNotFoundError, match="bash scripts/setup.sh fetch sam_med3d_turbo"):
        wr.resolve_recipe(recipe, dest=tmp_path)  # nothing is downloaded at run time
    (tmp_path / "sam_med3d_turbo.pth").write_bytes(b"")
    assert wr.resolve_recipe(recipe, dest=tmp_path)["model"]["init_checkpoint"] == str(tmp_path / "sam_med3d_turbo.pth")

    auto = load_recipe(REPO / "configs" / "train" / "autosam3d.yaml", ["auto.sam_checkpoint=sam_vit_b"])
    (tmp_path / "sam_vit_b_01ec64.pth").write_bytes(b"")
    assert wr.resolve_recipe(auto, dest=tmp_path)["auto"]["sam_checkpoint"] == str(tmp_path / "sam_vit_b_01ec64.pth")
    plain = {"model": {"init_checkpoint": "models/sam3d_small.safetensors"}}
    assert wr.resolve_recipe(plain) == {"model": {"init_checkpoint": "models/sam3d_small.safetensors"}}


def test_the_train_script_resolves_registry_names():
    assert "resolve_recipe(load_recipe(" in (REPO / "lib" / "sam3d" / "cli" / "train.py").read_text()


def test_conf_weights_serves_the_installed_file_and_info_names_it_with_its_licence(monkeypatch, tmp_path):
    from sam3d.monailabel.app_config import load_app_config
    from sam3d.monailabel.infer_point import Sam3DPointInfer

    monkeypatch.setenv("SAM3D_WEIGHTS_DIR", str(tmp_path))
    conf = load_app_config({"model": "sam_med3d_turbo", "weights": "sam_med3d_turbo"}, REPO / "configs")
    spec = conf.infers["sam3d_point"]
    assert spec.error is None and spec.model_config["checkpoint"] == str(tmp_path / "sam_med3d_turbo.pth")
    info = Sam3DPointInfer(spec, device="cpu").info()
    assert info["sam3d"]["weights"]["name"] == "sam_med3d_turbo" and info["sam3d"]["weights"]["licence"] == "Apache-2.0"
    assert "[weights sam_med3d_turbo: Apache-2.0]" in info["description"]
    assert "bash scripts/setup.sh fetch sam_med3d_turbo" in info["sam3d"]["message"]  # not fetched yet

    wrong = load_app_config({"weights": "sam_med3d_turbo"}, REPO / "configs").infers["sam3d_point"]
    assert "--conf model sam_med3d_turbo" in wrong.error
    unknown = load_app_config({"model": "sam_med3d_turbo", "weights": "nope"}, REPO / "configs").infers["sam3d_point"]
    assert "unknown weights 'nope'" in unknown.error
    default = load_app_config({}, REPO / "configs").infers["sam3d_point"]
    assert "weights" not in default.model_config  # the default serves our own weights, no registry involved


# ---------------------------------------------------------------------------------------------- SAM-Med3D-turbo


def quick_venv(folder: Path) -> Path:
    """A venv that is this one (its python, its packages) with setup.sh's install stamp up to date, so that
    setup.sh does not install anything during the test."""
    venv = folder / "venv"
    (venv / "bin").mkdir(parents=True)
    real = Path(sys.prefix)
    shutil.copy(real / "pyvenv.cfg", venv / "pyvenv.cfg")
    (venv / "lib").symlink_to(real / "lib")
    for exe in ("python", "monailabel"):
        (venv / "bin" / exe).symlink_to(real / "bin" / exe)
    stamp = subprocess.run(
        f"cat {REPO}/requirements.txt {REPO}/pyproject.toml | sha256sum | cut -d' ' -f1",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (venv / ".sam3d-requirements.sha256").write_text(stamp + "\n")
    return venv


@pytest.fixture(scope="module")
def turbo_ckpt(tmp_path_factory) -> Path:
    """A checkpoint in the layout of the published sam_med3d_turbo.pth (a bare state_dict), with the
    conformance package's synthetic weights."""
    if not (CONF / "make_weights.py").is_file():
        pytest.skip(f"conformance package not found at {CONF}")
    spec = importlib.util.spec_from_file_location("conformance_make_weights", CONF / "make_weights.py")
    make_weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_weights)
    path = tmp_path_factory.mktemp("turbo") / "sam_med3d_turbo.pth"
    torch.save(make_weights.to_torch(make_weights.make_state_dict()), path)
    return path


def setup_sh(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    # a text model loaded earlier in this process forces HF_HUB_OFFLINE into os.environ: only `env` may set it
    inherited = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env = {**inherited, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", **env}
    return subprocess.run(["bash", str(SETUP), *args], env=env, capture_output=True, text=True, timeout=timeout)


def rel(got, ref) -> float:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_setup_fetch_installs_turbo_from_the_hub_and_the_served_config_reproduces_the_golden_outputs(
    turbo_ckpt, small_ckpt, tmp_path, monkeypatch
):
    from sam3d.engine.checkpoint import load_model
    from sam3d.monailabel.app_config import load_app_config

    dest = tmp_path / "weights"
    with FakeHub() as hub:
        hub.publish("blueyo0/SAM-Med3D", "sam_med3d_turbo.pth", turbo_ckpt)
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf_cache")}
        done = setup_sh(["fetch", "sam_med3d_turbo", "--dest", str(dest)], env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(dest / "sam_med3d_turbo.pth")
        assert "licence Apache-2.0" in done.stderr and "differs from the file this registry was written" in done.stderr

        # a tampered copy (here: another file, served under the digest of the real one) is refused
        hub.publish("blueyo0/SAM-Med3D", "sam_med3d_turbo.pth", small_ckpt, sha256=sha256_of(turbo_ckpt))
        refused = setup_sh(["fetch", "sam_med3d_turbo", "--dest", str(tmp_path / "other")], env)
        assert refused.returncode == 1 and "Refused: nothing was installed" in refused.stderr
        assert installed(tmp_path / "other") == []
    assert sha256_of(dest / "sam_med3d_turbo.pth") == sha256_of(turbo_ckpt)

    # the app's config path: --conf model sam_med3d_turbo --conf weights sam_med3d_turbo
    monkeypatch.setenv("SAM3D_WEIGHTS_DIR", str(dest))
    spec = load_app_config({"model": "sam_med3d_turbo", "weights": "sam_med3d_turbo"}, REPO / "configs").infers[
        "sam3d_point"
    ]
    assert spec.error is None
    loaded = load_model(spec.model_config)
    assert loaded.checkpoint == str(dest / "sam_med3d_turbo.pth")
    golden = dict(np.load(CONF / "golden_sam_med3d_turbo.npz"))
    model = loaded.model
    with torch.no_grad():
        emb = model.encode_image(torch.from_numpy(golden["input"]))
        rels = {"image_embedding": rel(emb, golden["image_embedding"])}
        for case in ("A", "B"):
            pts = (torch.from_numpy(golden[f"case{case}_points"]), torch.from_numpy(golden[f"case{case}_labels"]))
            low, iou = model.decode(emb, points=pts, mask_input=torch.from_numpy(golden[f"case{case}_mask_input"]))
            rels[f"case{case}_low_res_masks"] = rel(low, golden[f"case{case}_low_res_masks"])
            rels[f"case{case}_iou"] = rel(iou, golden[f"case{case}_iou_predictions"])
    assert max(rels.values()) < 1e-4, rels


def test_setup_server_with_published_weights_offline_fails_at_once(tmp_path):
    venv = quick_venv(tmp_path)
    started = time.monotonic()
    done = setup_sh(
        ["server", "--weights", "sam_med3d_turbo", "--studies", str(tmp_path)],
        {"SAM3D_VENV": str(venv), "HF_HUB_OFFLINE": "1", "SAM3D_WEIGHTS_DIR": str(tmp_path / "w")},
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "place it by hand" in done.stderr and str(tmp_path / "w" / "sam_med3d_turbo.pth") in done.stderr
    assert "start_server" not in done.stderr  # no server was started
    assert time.monotonic() - started < 90  # python's start-up on a busy machine; no network wait


@pytest.mark.slow
def test_setup_server_fetches_and_serves_turbo_and_answers_clicks_as_the_engine(
    turbo_ckpt, shared_data, tmp_path, monkeypatch
):
    import requests
    from monailabel.client import MONAILabelClient

    from sam3d.monailabel.app_config import load_app_config
    from sam3d.monailabel.local_server import free_port, log_tail
    from sam3d.predictor import load_engine

    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(shared_data / "totalseg_ct" / "image.nii.gz", studies / "ct.nii.gz")
    weights = tmp_path / "weights"
    port = free_port()
    log = tmp_path / "server.log"
    (tmp_path / "server_tmp").mkdir()
    with FakeHub() as hub:
        hub.publish("blueyo0/SAM-Med3D", "sam_med3d_turbo.pth", turbo_ckpt)
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_HUB_CACHE": str(tmp_path / "hf_cache"),
            "SAM3D_VENV": str(quick_venv(tmp_path)),
            "SAM3D_WEIGHTS_DIR": str(weights),
            "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions"),
            "TMPDIR": str(tmp_path / "server_tmp"),
            "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
            "OMP_NUM_THREADS": "2",
        }
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    "bash",
                    str(SETUP),
                    "server",
                    "--weights",
                    "sam_med3d_turbo",
                    "--studies",
                    str(studies),
                    "--port",
                    str(port),
                    "--conf",
                    "device",
                    "cpu",
                ],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                assert proc.poll() is None, log_tail(log)
                try:
                    info = requests.get(f"{url}/info/", timeout=5).json()
                    break
                except requests.RequestException:
                    assert time.monotonic() < deadline, log_tail(log)
                    time.sleep(1)
            task = info["models"]["sam3d_point"]
            assert task["sam3d"]["model"] == "sam_med3d_turbo"
            assert task["sam3d"]["weights"]["name"] == "sam_med3d_turbo"
            assert task["sam3d"]["weights"]["licence"] == "Apache-2.0"
            assert task["sam3d"]["weights"]["sha256"] == sha256_of(turbo_ckpt)
            assert task["sam3d"]["checkpoint"] == str(weights / "sam_med3d_turbo.pth")
            click = {"foreground": [[60, 50, 56]], "label": "liver"}
            (tmp_path / "client").mkdir()
            result, params = MONAILabelClient(url, tmpdir=str(tmp_path / "client")).infer(
                "sam3d_point", "ct", dict(click)
            )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    import nibabel as nib

    served = np.asarray(nib.load(result).dataobj)
    monkeypatch.setenv("SAM3D_WEIGHTS_DIR", str(weights))
    spec = load_app_config({"model": "sam_med3d_turbo", "weights": "sam_med3d_turbo"}, REPO / "configs").infers[
        "sam3d_point"
    ]
    engine = load_engine(spec.model_config, "cpu", "point")
    ours = engine.segment(str(studies / "ct.nii.gz"), foreground=click["foreground"], label="liver")
    assert served.shape == ours.mask.shape and served.any()
    assert np.array_equal(served > 0, np.asarray(ours.mask) > 0)
