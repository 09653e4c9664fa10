"""Published checkpoints in one command: a small registry of weights that others publish, and `fetch`, which
downloads one, checks it, and only then installs it.

    bash scripts/setup.sh fetch NAME [--dest DIR] [--revision REV]   # python -m sam3d.engine.weights_registry fetch
    bash scripts/setup.sh server --weights NAME                      # fetches first when missing, then serves it

Nothing is downloaded implicitly: the server (`--conf weights NAME`) and the recipes (`model.init_checkpoint` or
`auto.sam_checkpoint` set to a registry name) only read what `fetch` installed.

Where: `--dest DIR`, else `$SAM3D_WEIGHTS_DIR`, else `${XDG_CACHE_HOME:-~/.cache}/sam3d/weights`.

How `fetch` works, one file at a time under a lock in that folder:

1. the source: a Hugging Face repository through huggingface_hub (`HF_ENDPOINT`, `HF_TOKEN`, revisions; the hub
   states the file's size and, for LFS and Xet files, its SHA-256; a copy already in huggingface_hub's cache is
   used without network), or a plain HTTPS address;
2. the bytes go to `DIR/.<file>.part` through huggingface_hub's resumable GET (Range requests, retries, a tqdm
   progress bar); an interrupted transfer keeps its part, and the next run continues it;
3. the checks: the SHA-256 (the registry's, else the one the hub states) or the hex prefix its publisher puts in the
   file name; the file loads with `torch.load(weights_only=True)`; its state_dict has exactly the keys and shapes of
   the network it serves;
4. only then a sidecar `DIR/<file>.json` (where from, which commit, SHA-256, licence) and one rename into place.
   A file that fails a check is deleted; nothing is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

# `server-conf` and the app's config read the registry without torch: the checks import it when they run.

SHA256_RE = re.compile(r"[0-9a-f]{64}")
METADATA_TIMEOUT_S = 10.0  # one metadata request; offline, `fetch` fails at once instead of retrying


class WeightsError(RuntimeError):
    """Fetching published weights failed; the message says what went wrong and what to do."""


class WeightsOfflineError(WeightsError):
    """The source cannot be reached (no network, HF_HUB_OFFLINE): the message says how to place the file by hand."""


class WeightsCheckError(WeightsError):
    """The file is not the published one (SHA-256, not weights only, other keys or shapes): it is not installed."""


@dataclass(frozen=True)
class PublishedWeights:
    """One published checkpoint: where it comes from, its licence as its publisher states it, what it serves, and
    how a download is checked."""

    name: str
    filename: str  # the installed file's name
    publisher: str
    licence: str  # as the publisher states it
    licence_source: str  # where the publisher states it
    size: str  # for people
    serves: str  # for people: the task or recipes it is for
    preset: str  # the network whose keys and shapes the file must have (sam3d.models.build_network)
    model_config: str | None = None  # configs/models/<name>.yaml that serves it in a task; None: recipes only
    repo_id: str | None = None  # a Hugging Face repository ...
    revision: str = "main"
    url: str | None = None  # ... or a plain HTTPS address
    sha256: str | None = None  # must match
    sha256_prefix: str | None = None  # the hex prefix the publisher puts in the file name must match
    known_sha256: str | None = None  # the file at `revision` when this entry was written (a difference is reported)
    network: dict = field(default_factory=dict)  # size overrides of the reference network
    module: str = ""  # the part of the network the file fills ("": all of it)
    key_prefix: str = ""  # that part's prefix in the file
    ignored_prefixes: tuple[str, ...] = ()  # other parts of the file, which nothing here uses

    def source_url(self, revision: str | None = None) -> str:
        if self.repo_id:
            from huggingface_hub import hf_hub_url

            return hf_hub_url(self.repo_id, self.filename, revision=revision or self.revision, endpoint=_endpoint())
        return str(self.url)

    @property
    def source(self) -> str:
        if self.repo_id:
            return f"Hugging Face {self.repo_id} ({self.filename}, revision {self.revision})"
        return str(self.url)

    def checks(self, source_sha256: bool = True) -> str:
        """How a download is checked; `source_sha256`: its source stated a SHA-256 (the hub does for LFS files)."""
        sha = (
            f"SHA-256 {self.sha256}"
            if self.sha256
            else f"SHA-256 starting {self.sha256_prefix} (its name)"
            if self.sha256_prefix
            else "SHA-256 as the hub states it"
            if source_sha256
            else "no SHA-256 (its source stated none)"
        )
        part = f"`{self.key_prefix}*` keys" if self.key_prefix else "keys"
        return f"{sha}; torch.load(weights_only=True); {part} and shapes of preset {self.preset}, exactly"


REGISTRY: dict[str, PublishedWeights] = {
    w.name: w
    for w in (
        PublishedWeights(
            name="sam_med3d_turbo",
            filename="sam_med3d_turbo.pth",
            publisher="the SAM-Med3D authors (uni-medical), on Hugging Face as blueyo0/SAM-Med3D",
            repo_id="blueyo0/SAM-Med3D",
            licence="Apache-2.0",
            licence_source="https://huggingface.co/blueyo0/SAM-Med3D (model card: license: apache-2.0)",
            known_sha256="899a46d04d3b70f723282ceb489149373558bf0aaba389a346f5ab57da5cdd3c",
            size="402 MB",
            serves="sam3d_point with the model config sam_med3d_turbo; recipes sam_med3d_finetune and refsam3d "
            "(model.init_checkpoint), the preset segsam3d_turbo (model.init_strict=false)",
            preset="sam_med3d_turbo",
            model_config="sam_med3d_turbo",
        ),
        PublishedWeights(
            name="sam_vit_b",
            filename="sam_vit_b_01ec64.pth",
            publisher="Meta AI (Segment Anything)",
            url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
            licence="Apache-2.0",
            licence_source="https://github.com/facebookresearch/segment-anything (README and LICENSE)",
            sha256_prefix="01ec64",
            size="375 MB",
            serves="the 3D-SAutoMed ViT-B slice encoder: recipe autosam3d with model.preset=autosam3d_vit_b "
            "auto.sam_checkpoint=sam_vit_b",
            preset="autosam3d_vit_b",
            network={"img_size": 1024, "lora_rank": 0},  # the published 1024-pixel encoder, before resizing
            module="encoder",
            key_prefix="image_encoder.",
            ignored_prefixes=("prompt_encoder.", "mask_decoder."),  # SAM's 2D prompt encoder and decoder
        ),
    )
}

RECIPE_KEYS = (("model", "init_checkpoint"), ("auto", "sam_checkpoint"))  # recipe keys that take a registry name


def get(name: str, registry: dict[str, PublishedWeights] | None = None) -> PublishedWeights:
    registry = REGISTRY if registry is None else registry
    try:
        return registry[name]
    except KeyError:
        raise WeightsError(f"unknown weights {name!r}; published weights: {', '.join(sorted(registry))}") from None


def weights_dir(dest: str | os.PathLike | None = None) -> Path:
    """`dest`, else $SAM3D_WEIGHTS_DIR, else ${XDG_CACHE_HOME:-~/.cache}/sam3d/weights."""
    if dest:
        return Path(dest).expanduser().resolve()
    if os.environ.get("SAM3D_WEIGHTS_DIR"):
        return Path(os.environ["SAM3D_WEIGHTS_DIR"]).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(cache).expanduser() / "sam3d" / "weights").resolve()


def installed_path(name: str, dest=None, registry=None) -> Path:
    return weights_dir(dest) / get(name, registry).filename


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")  # read now, not at import


def _offline() -> bool:
    from huggingface_hub import constants

    flag = (os.environ.get("HF_HUB_OFFLINE") or "").strip().upper()
    return constants.is_offline_mode() or flag in ("1", "ON", "YES", "TRUE")


def how_to_place_by_hand(entry: PublishedWeights, final: Path, dest=None) -> str:
    where = f" --dest {final.parent}" if dest else ""
    sha = (
        f" (SHA-256 {entry.sha256})"
        if entry.sha256
        else f" (its SHA-256 starts with {entry.sha256_prefix})"
        if entry.sha256_prefix
        else ""
    )
    return (
        f"to place it by hand: download {entry.source_url()}{sha} on a machine with internet access, copy it "
        f"to {final}, then run `bash scripts/setup.sh fetch {entry.name}{where}`, which checks it there "
        "without network"
    )


# ---------------------------------------------------------------------------------------------- the checks


def expected_shapes(entry: PublishedWeights) -> dict[str, tuple[int, ...]]:
    """The keys (with the file's prefix) and shapes of the network part the file fills; built on the meta device."""
    import torch

    from ..models import build_network

    with torch.device("meta"):
        net = build_network(entry.preset, **entry.network)
    part = net.get_submodule(entry.module) if entry.module else net
    return {entry.key_prefix + k: tuple(v.shape) for k, v in part.state_dict().items()}


def compare_state_dict(entry: PublishedWeights, state: dict) -> list[str]:
    """What differs between the file's state_dict and the preset's keys and shapes (empty: they match exactly)."""
    want = expected_shapes(entry)
    got = {
        k: tuple(v.shape)
        for k, v in state.items()
        if not (entry.ignored_prefixes and k.startswith(entry.ignored_prefixes))
    }
    problems = []
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    wrong = [f"{k} {list(got[k])} (expected {list(want[k])})" for k in want if k in got and got[k] != want[k]]
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("other shapes", wrong)):
        if keys:
            problems.append(f"{len(keys)} {what}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}")
    return problems


def check_file(entry: PublishedWeights, path: Path, sha256: str | None = None, whence: str = "") -> str:
    """Check `path` as `entry`'s file; its SHA-256 when it passes, WeightsCheckError otherwise.

    `sha256`: the digest its source states (the hub's), used when the registry pins none.
    """
    from .checkpoint import file_sha256, read_state_dict

    digest = file_sha256(path)
    want = entry.sha256 or sha256
    if want and digest != want:
        raise WeightsCheckError(f"{entry.name}: the file's SHA-256 is {digest}, not {want}{whence}")
    if entry.sha256_prefix and not digest.startswith(entry.sha256_prefix):
        raise WeightsCheckError(
            f"{entry.name}: the file's SHA-256 is {digest}; the published file's starts with "
            f"{entry.sha256_prefix} (the hex digits in its name)"
        )
    try:
        state = read_state_dict(path)  # torch.load(weights_only=True): tensors only, never arbitrary objects
    except Exception as e:  # noqa: BLE001 - a pickle with objects, a truncated zip, not a torch file at all
        raise WeightsCheckError(f"{entry.name}: not loadable as weights only ({type(e).__name__}: {e})") from None
    problems = compare_state_dict(entry, state)
    if problems:
        raise WeightsCheckError(f"{entry.name}: not the state_dict of preset {entry.preset}: {'; '.join(problems)}")
    return digest


# ---------------------------------------------------------------------------------------------- the source


@dataclass
class _Remote:
    url: str  # what the bytes are read from
    shown: str  # what the messages name
    size: int | None
    sha256: str | None  # as the source states it
    tag: str  # identifies this version of the file: a part of another version is not continued
    commit: str | None = None
    headers: dict = field(default_factory=dict)
    local: Path | None = None  # a copy in huggingface_hub's cache


def _network_error_types() -> tuple[type[BaseException], ...]:
    import httpx2

    return (
        httpx2.ConnectError,
        httpx2.TimeoutException,
        httpx2.NetworkError,
        httpx2.RemoteProtocolError,
        ConnectionError,
    )


def _remote(entry: PublishedWeights, revision: str, final: Path, dest) -> _Remote:
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers

    shown = entry.source_url(revision)
    if entry.repo_id:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(entry.repo_id, entry.filename, revision=revision)
        if isinstance(cached, str) and os.path.isfile(cached):
            blob = Path(cached).resolve().name  # the cache names an LFS blob by its SHA-256
            return _Remote(
                cached,
                f"{cached} (huggingface_hub's cache)",
                os.path.getsize(cached),
                blob if SHA256_RE.fullmatch(blob) else None,
                f"cache:{blob}",
                local=Path(cached),
            )
    if _offline():
        raise WeightsOfflineError(
            f"{entry.name} is not installed ({final}) and HF_HUB_OFFLINE is set; "
            + how_to_place_by_hand(entry, final, dest)
        )
    headers = build_hf_headers()
    try:
        if entry.repo_id:
            from huggingface_hub import get_hf_file_metadata

            meta = get_hf_file_metadata(shown, timeout=METADATA_TIMEOUT_S, endpoint=_endpoint())
            if _origin(meta.location) != _origin(shown):
                headers.pop("authorization", None)  # a signed CDN address: the token stays on the hub
            etag = meta.etag or ""
            return _Remote(
                meta.location,
                shown,
                meta.size,
                etag if SHA256_RE.fullmatch(etag) else None,
                f"{entry.repo_id}@{meta.commit_hash or revision}:{etag}",
                meta.commit_hash,
                headers,
            )
        from huggingface_hub.utils import get_session, hf_raise_for_status

        headers.pop("authorization", None)  # a plain host gets no Hugging Face token
        response = get_session().head(shown, headers=headers, follow_redirects=True, timeout=METADATA_TIMEOUT_S)
        hf_raise_for_status(response)
        size = response.headers.get("Content-Length")
        tag = response.headers.get("ETag") or response.headers.get("Last-Modified") or ""
        return _Remote(
            str(response.url),
            shown,
            int(size) if size and size.isdigit() else None,
            None,
            f"{shown}:{tag}",
            None,
            headers,
        )
    except _network_error_types() as e:
        raise WeightsOfflineError(
            f"{entry.name} is not installed ({final}) and {shown} cannot be reached "
            f"({type(e).__name__}: {e}); " + how_to_place_by_hand(entry, final, dest)
        ) from None
    except HfHubHTTPError as e:
        raise WeightsError(f"{entry.name}: {shown} answered {_status(e)}: {_first_line(e)}") from None


def _origin(url: str) -> tuple:
    p = urlparse(url)
    return p.scheme, (p.hostname or "").lower(), p.port


def _status(e) -> str:
    response = getattr(e, "response", None)
    return f"HTTP {response.status_code}" if response is not None else "an error"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _transfer(remote: _Remote, part: Path, state_path: Path, filename: str) -> None:
    """The remote file into `part`, continuing a part that an earlier run of the same version left."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get

    from .checkpoint import atomic_write

    state = {"source": remote.shown, "tag": remote.tag, "size": remote.size}
    try:
        previous = json.loads(state_path.read_text())
    except (OSError, ValueError):
        previous = None
    have = part.stat().st_size if part.exists() else 0
    if have and (previous != state or (remote.size is not None and have > remote.size)):
        part.unlink()  # a part of another version of the file, or longer than the file: start again
        have = 0
    atomic_write(state_path, lambda tmp: Path(tmp).write_text(json.dumps(state)))
    if remote.local is not None:
        with open(remote.local, "rb") as src, open(part, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        return
    with open(part, "r+b" if have else "wb") as f:
        f.seek(have)
        try:
            http_get(
                remote.url,
                f,
                resume_size=have,
                headers=remote.headers,
                expected_size=remote.size,
                displayed_filename=filename,
            )
        except HfHubHTTPError as e:
            if getattr(e.response, "status_code", None) == 416 and have and remote.size is None:
                return  # the part was complete already (the host did not say the size)
            raise


# ---------------------------------------------------------------------------------------------- fetch


def fetch(name: str, dest=None, revision: str | None = None, registry=None, log=None) -> Path:
    """Download `name`, check it and install it as `<dest>/<filename>` (see the module's docstring); its path.

    Already installed: checks the file there (no network) and returns it. Raises WeightsOfflineError when the
    source cannot be reached, WeightsCheckError when the file is not the published one (nothing is installed),
    WeightsError for other failures (an interrupted transfer keeps its part: run again to continue it).
    """
    from filelock import FileLock, Timeout

    entry = get(name, registry)
    log = log or _log
    folder = weights_dir(dest)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / f".{entry.filename}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"waiting for another fetch of {entry.name} into {folder} to end")
        lock.acquire()
    try:
        return _fetch_locked(entry, folder, revision, dest, log)
    finally:
        lock.release()


def _fetch_locked(entry: PublishedWeights, folder: Path, revision: str | None, dest, log) -> Path:
    final = folder / entry.filename
    part = folder / f".{entry.filename}.part"
    state_path = folder / f".{entry.filename}.part.json"
    if final.is_file():
        return _check_installed(entry, final, log)
    revision = revision or entry.revision
    remote = _remote(entry, revision, final, dest)
    log(f"fetching {entry.name} from {remote.shown} into {final}")
    started = time.monotonic()
    try:
        _transfer(remote, part, state_path, entry.filename)
    except Exception as e:  # noqa: BLE001 - the network, the host (HTTP errors), a short read, the disk
        raise WeightsError(_interrupted(entry, remote, part, e)) from None
    whence = f" (as {remote.shown} states it)" if remote.sha256 and not entry.sha256 else ""
    try:
        digest = check_file(entry, part, remote.sha256, whence)
    except WeightsCheckError as e:
        part.unlink(missing_ok=True)
        state_path.unlink(missing_ok=True)
        raise WeightsCheckError(
            f"{e}. Refused: nothing was installed at {final} and the download was deleted"
        ) from None
    checked = entry.checks(source_sha256=bool(remote.sha256))
    _install(
        entry,
        part,
        final,
        state_path,
        {
            "source": remote.shown if remote.local is None else entry.source_url(revision),
            "revision": revision,
            "commit": remote.commit,
            "sha256": digest,
            "checked": checked,
        },
    )
    log(
        f"installed {entry.name}: {final} ({part_size(final)}, {time.monotonic() - started:.0f} s); "
        f"checked: {checked}; licence {entry.licence} ({entry.licence_source})"
    )
    if entry.known_sha256 and digest != entry.known_sha256:
        log(
            f"note: its SHA-256 {digest} differs from the file this registry was written against "
            f"({entry.known_sha256}); the publisher may have updated it. It passed every check."
        )
    return final


def part_size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def _interrupted(entry: PublishedWeights, remote: _Remote, part: Path, e: BaseException) -> str:
    have = part.stat().st_size if part.exists() else 0
    of = f" of {remote.size:,}" if remote.size else ""
    return (
        f"{entry.name}: the download from {remote.shown} stopped after {have:,}{of} bytes "
        f"({type(e).__name__}: {_first_line(e)}). Nothing was installed; the bytes so far are kept in {part}: "
        "run the same command again to continue"
    )


def _write_sidecar(entry: PublishedWeights, final: Path, facts: dict) -> None:
    """`<file>.json` beside the weights: where they came from, their SHA-256, their licence, how they were checked."""
    from .checkpoint import atomic_write

    sidecar = {
        "name": entry.name,
        "file": entry.filename,
        **facts,
        "licence": entry.licence,
        "licence_source": entry.licence_source,
        "publisher": entry.publisher,
        "checked": entry.checks(),
        **facts,
        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write(final.with_name(final.name + ".json"), lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=1)))


def _install(entry: PublishedWeights, part: Path, final: Path, state_path: Path, facts: dict) -> None:
    # the sidecar first: a crash between the two renames leaves no weights without their description
    _write_sidecar(entry, final, facts)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(part, 0o666 & ~umask)
    os.replace(part, final)
    state_path.unlink(missing_ok=True)


def _check_installed(entry: PublishedWeights, final: Path, log) -> Path:
    """The file is in place (fetched before, or placed by hand): check it again, without network."""
    sidecar = read_sidecar(final)
    try:
        digest = check_file(entry, final, sidecar.get("sha256"), " (when it was installed)")
    except WeightsCheckError as e:
        raise WeightsCheckError(f"{final} is in place but fails the checks: {e}. Delete it and fetch again") from None
    if not sidecar:  # placed by hand: describe it, as fetch would have
        _write_sidecar(
            entry, final, {"source": "placed by hand", "sha256": digest, "checked": entry.checks(source_sha256=False)}
        )
        if entry.known_sha256 and digest != entry.known_sha256:
            log(
                f"note: its SHA-256 {digest} differs from the published file this registry was written against "
                f"({entry.known_sha256}); its keys and shapes are right"
            )
    log(f"{entry.name} is installed and passes the checks: {final}")
    return final


def read_sidecar(final: Path) -> dict:
    try:
        data = json.loads(final.with_name(final.name + ".json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def ensure(name: str, dest=None, registry=None, log=None) -> Path:
    """The installed file of `name`, fetched (and checked) only when it is missing; no network when it is there."""
    final = installed_path(name, dest, registry)
    return final if final.is_file() else fetch(name, dest, registry=registry, log=log)


def _log(message: str) -> None:
    print(f"[weights] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- users


def resolve_reference(value, dest=None, registry=None):
    """A checkpoint value of a recipe: a registry name -> its installed file (which must be there), else unchanged.

    Nothing is downloaded here; a missing file is an error that says how to fetch it.
    """
    registry = REGISTRY if registry is None else registry
    if not isinstance(value, str) or value not in registry:
        return value
    final = installed_path(value, dest, registry)
    if not final.is_file():
        raise FileNotFoundError(
            f"weights {value!r} are not installed ({final}): run `bash scripts/setup.sh fetch {value}` first"
        )
    return str(final)


def resolve_recipe(recipe: dict, dest=None, registry=None) -> dict:
    """`recipe` with every registry name in RECIPE_KEYS replaced by the installed file's path (in place)."""
    for section, key in RECIPE_KEYS:
        node = recipe.get(section)
        if isinstance(node, dict) and node.get(key):
            node[key] = resolve_reference(node[key], dest, registry)
    return recipe


def apply_to_model_config(model_config: dict, registry=None) -> str | None:
    """A task's `weights: NAME`: its checkpoint (unless one is set) is NAME's installed file. An error message
    when NAME is unknown or fits another network, else None."""
    name = model_config.get("weights")
    if not name:
        return None
    registry = REGISTRY if registry is None else registry
    entry = registry.get(str(name))
    if entry is None:
        return f"unknown weights {name!r}; published weights: {', '.join(sorted(registry))}"
    if not entry.model_config:
        return f"weights {name!r} serve no task ({entry.serves})"
    if model_config.get("preset") != entry.preset:
        return (
            f"weights {name!r} fit the model config {entry.model_config!r} (preset {entry.preset}), not preset "
            f"{model_config.get('preset')!r}: add `--conf model {entry.model_config}`"
        )
    if not model_config.get("checkpoint"):
        model_config["checkpoint"] = str(installed_path(str(name), registry=registry))
    return None


def weights_info(model_config: dict, registry=None) -> dict | None:
    """What /info says about a task's published weights (name, source, licence, and the installed file's facts)."""
    name = model_config.get("weights")
    entry = (REGISTRY if registry is None else registry).get(str(name)) if name else None
    if entry is None:
        return None
    info = {
        "name": entry.name,
        "source": entry.source,
        "publisher": entry.publisher,
        "licence": entry.licence,
        "licence_source": entry.licence_source,
    }
    if model_config.get("checkpoint"):
        sidecar = read_sidecar(Path(model_config["checkpoint"]))
        info.update({k: sidecar[k] for k in ("commit", "sha256", "installed_at") if sidecar.get(k)})
    return info


def how_to_fetch(model_config: dict) -> str | None:
    name = model_config.get("weights")
    return f"fetch them with `bash scripts/setup.sh fetch {name}`" if name else None


# ---------------------------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sam3d.engine.weights_registry",
        description="Published weights: list, fetch (download, check, install), ensure.",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the registry: name, source, licence, size, what it serves")
    for cmd, text in (
        ("fetch", "download, check and install (or check the installed file again)"),
        ("ensure", "the installed file's path; fetched only when missing"),
        ("server-conf", "ensure, then print the start_server --conf arguments that serve it"),
    ):
        p = sub.add_parser(cmd, help=text)
        p.add_argument("name", choices=sorted(REGISTRY))
        p.add_argument("--dest", help="folder (default: $SAM3D_WEIGHTS_DIR or ~/.cache/sam3d/weights)")
        if cmd == "fetch":
            p.add_argument("--revision", help="a Hugging Face branch, tag or commit (default: the registry's)")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for w in REGISTRY.values():
            print(f"{w.name}\t{w.source}\t{w.licence}\t{w.size}\t{w.serves}")
        return 0
    try:
        if args.cmd == "fetch":
            print(fetch(args.name, args.dest, args.revision))
        elif args.cmd == "ensure":
            print(ensure(args.name, args.dest))
        else:
            if args.dest:
                raise WeightsError("server-conf reads $SAM3D_WEIGHTS_DIR (the server looks there), not --dest")
            if not REGISTRY[args.name].model_config:
                raise WeightsError(f"{args.name} serves no task: {REGISTRY[args.name].serves}")
            ensure(args.name)
            print(f"--conf model {REGISTRY[args.name].model_config} --conf weights {args.name}")
    except WeightsError as e:
        _log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        _log("interrupted; nothing was installed. Run the same command again to continue the download")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
