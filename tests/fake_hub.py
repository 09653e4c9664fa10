"""Local stand-ins for the places published weights come from, on 127.0.0.1 (no internet in the tests).

`FileHost` serves files with Range requests, like a CDN or a plain HTTPS host (dl.fbaipublicfiles.com); it can
cut a transfer short and then refuse to answer, as a dropped connection does. `FakeHub` answers like the
Hugging Face Hub for `HF_ENDPOINT`: `HEAD/GET {endpoint}/{repo}/resolve/{revision}/{filename}` redirects to the
file host with the headers huggingface_hub reads (X-Repo-Commit, X-Linked-Etag: the LFS SHA-256, X-Linked-Size),
as the real hub does for LFS files.
"""

import hashlib
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _Server:
    def __init__(self, handler):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class _FileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        host: FileHost = self.server.owner
        host.requests.append((self.command, self.path, self.headers.get("Range")))
        path = host.files.get(unquote(self.path.split("?")[0]))
        if host.down:
            return self._answer(503, b"unavailable")
        if path is None:
            return self._answer(404, b"not found")
        size = path.stat().st_size
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and body:
            start = int(rng[6:].split("-")[0])
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{host.etags.get(self.path, "v1")}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        if not body:
            return
        limit = size - start
        if host.cut_after is not None and host.cuts_left > 0:
            host.cuts_left -= 1
            limit = min(limit, host.cut_after)
            if host.down_after_cut:
                host.down = True
        sent = 0
        with open(path, "rb") as f:
            f.seek(start)
            while sent < limit:
                chunk = f.read(min(CHUNK, limit - sent))
                if not chunk:
                    break
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                sent += len(chunk)
        if sent < size - start:  # cut short: drop the connection mid-body
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)

    def _answer(self, status: int, text: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(text)


class FileHost(_Server):
    """Serves `files` (URL path -> file). `cut_after` bytes: the next `cuts_left` transfers stop there and the
    connection drops; with `down_after_cut` the host then answers 503 until `down` is reset."""

    def __init__(self):
        super().__init__(_FileHandler)
        self.files: dict[str, Path] = {}
        self.etags: dict[str, str] = {}
        self.cut_after: int | None = None
        self.cuts_left = 0
        self.down_after_cut = False
        self.down = False

    def add(self, url_path: str, path: Path) -> str:
        self.files[url_path] = Path(path)
        return self.url + url_path


@dataclass
class HubFile:
    path: Path
    sha256: str  # what the hub states (X-Linked-Etag): a tampered file keeps the digest of the original
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    size: int | None = None


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._resolve()

    def do_GET(self):
        self._resolve()

    def _resolve(self):
        hub: FakeHub = self.server.owner
        hub.requests.append((self.command, self.path, self.headers.get("Range")))
        parts = unquote(self.path.split("?")[0]).lstrip("/").split("/")
        # /{namespace}/{repo}/resolve/{revision}/{filename}
        entry = None
        if len(parts) >= 5 and parts[2] == "resolve":
            entry = hub.files.get(("/".join(parts[:2]), parts[3], "/".join(parts[4:])))
        if entry is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(302)
        self.send_header("Location", hub.cdn.add(f"/cdn/{entry.sha256}/{parts[-1]}", entry.path))
        self.send_header("X-Repo-Commit", entry.commit)
        self.send_header("X-Linked-Etag", f'"{entry.sha256}"')
        self.send_header("ETag", f'"{entry.sha256}"')
        self.send_header("X-Linked-Size", str(entry.size or entry.path.stat().st_size))
        self.send_header("Content-Length", "0")
        self.end_headers()


class FakeHub(_Server):
    """`files[(repo_id, revision, filename)] = HubFile(...)`; the bytes come from `cdn`, another origin."""

    def __init__(self):
        super().__init__(_HubHandler)
        self.files: dict[tuple[str, str, str], HubFile] = {}
        self.cdn = FileHost()

    def __enter__(self):
        self.cdn.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.cdn.__exit__(*exc)

    def publish(self, repo_id: str, filename: str, path: Path, revision: str = "main", sha256: str | None = None):
        self.files[(repo_id, revision, filename)] = HubFile(Path(path), sha256 or sha256_of(path))
