"""A loopback Hugging Face Hub: the part of the Hub's HTTP API that huggingface_hub's downloads use, served from
memory, so tests drive the real client (HfApi.model_info, get_hf_file_metadata, hf_hub_download) without a network.

- `GET /api/models/{repo}/revision/{rev}?blobs=true`: id, sha and siblings (rfilename, size, blobId, lfs{sha256,
  size, pointerSize}) as the Hub lists them;
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: the file, with X-Repo-Commit, ETag (the git blob sha1 of a plain file,
  the sha256 of an LFS file's content), X-Linked-Etag and X-Linked-Size for LFS files, and `Range: bytes=N-`
  answered 206 with Content-Range (how the client resumes);
- errors as the Hub sends them: 404 with X-Error-Code RepoNotFound, RevisionNotFound or EntryNotFound, 401 with
  GatedRepo for a gated repository without its token.

Faults a test sets: `cut(repo, path, *sizes)`: the next GETs of that file send `size` bytes of the body promised by
their Content-Length and drop the connection (one size per request); `corrupt(repo, path)`: the file's bytes are
changed on the wire while its ETag and listing stay those of the real content. `requests` records every request.
With `cdn` set, LFS files are answered as the Hub does: a 302 to another origin (`localhost` instead of 127.0.0.1,
standing for the CDN's signed URL) carrying X-Linked-Etag and X-Linked-Size; `cdn_authorized` records whether each
CDN request carried an Authorization header (the token must stay with the Hub).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".msgpack", ".h5")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class HubFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else git_sha1(self.data)

    def sibling(self, path: str) -> dict[str, object]:
        entry: dict[str, object] = {"rfilename": path}
        if self.lfs:
            entry |= {
                "size": len(self.data),
                "blobId": git_sha1(self.pointer),
                "lfs": {"sha256": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)},
            }
        else:
            entry |= {"size": len(self.data), "blobId": git_sha1(self.data)}
        return entry


@dataclass
class HubRepo:
    repo_id: str
    commit: str
    files: dict[str, HubFile]
    token: str | None = None  # gated: only this bearer token may read it


@dataclass
class LoopbackHub:
    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    _cuts: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    _corrupt: set[tuple[str, str]] = field(default_factory=set)
    url: str = ""
    cdn: bool = False
    cdn_authorized: list[bool] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add_repo(
        self,
        repo_id: str,
        files: Path | Mapping[str, bytes],
        *,
        commit: str | None = None,
        token: str | None = None,
    ) -> HubRepo:
        """Serve a folder's files (or name -> bytes) as `repo_id` at `commit` (a random one if not given)."""
        if isinstance(files, Path):
            contents = {str(p.relative_to(files)): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()}
        else:
            contents = dict(files)
        served = {path: HubFile(data, path.endswith(LFS_SUFFIXES)) for path, data in contents.items()}
        served.setdefault(".gitattributes", HubFile(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", False))
        repo = HubRepo(repo_id, commit or secrets.token_hex(20), served, token)
        self.repos[repo_id] = repo
        return repo

    def cut(self, repo_id: str, path: str, *sizes: int) -> None:
        with self._lock:
            self._cuts.setdefault((repo_id, path), []).extend(sizes)

    def corrupt(self, repo_id: str, path: str) -> None:
        self._corrupt.add((repo_id, path))

    def heal(self) -> None:
        with self._lock:
            self._cuts.clear()
            self._corrupt.clear()

    def gets(self, path_suffix: str) -> list[str | None]:
        """The Range header of every GET of a file whose URL path ends with `path_suffix`."""
        return [rng for method, path, rng in self.requests if method == "GET" and path.endswith(path_suffix)]

    def _next_cut(self, repo_id: str, path: str) -> int | None:
        with self._lock:
            sizes = self._cuts.get((repo_id, path))
            return sizes.pop(0) if sizes else None


_API = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)")
_RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
_CDN = re.compile(r"/cdn/(?P<repo>[^/]+/[^/]+)/(?P<sha>[0-9a-f]{64})/(?P<path>.+)")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def _handler(hub: LoopbackHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _error(self, status: int, code: str, commit: str | None = None) -> None:
            payload = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _repo(self, repo_id: str, rev: str) -> HubRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound")
                return None
            if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
                self._error(401, "GatedRepo")
                return None
            if rev != repo.commit:
                self._error(404, "RevisionNotFound")
                return None
            return repo

        def _serve(self, *, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if api := _API.fullmatch(path):
                repo = self._repo(api["repo"], api["rev"])
                if repo is not None:
                    siblings = [f.sibling(name) for name, f in sorted(repo.files.items())]
                    self._send(
                        200,
                        json.dumps({"id": repo.repo_id, "sha": repo.commit, "siblings": siblings}).encode(),
                        {"Content-Type": "application/json"},
                        body=body,
                    )
                return
            if resolve := _RESOLVE.fullmatch(path):
                repo = self._repo(resolve["repo"], resolve["rev"])
                if repo is None:
                    return
                served = repo.files.get(resolve["path"])
                if served is None:
                    self._error(404, "EntryNotFound", repo.commit)
                    return
                if hub.cdn and served.lfs:
                    port = urlsplit(hub.url).port
                    self._send(
                        302,
                        b"",
                        {
                            "Location": f"http://localhost:{port}/cdn/{repo.repo_id}/{served.sha256}/{resolve['path']}",
                            "X-Repo-Commit": repo.commit,
                            "ETag": f'"{git_sha1(served.pointer)}"',
                            "X-Linked-Etag": f'"{served.sha256}"',
                            "X-Linked-Size": str(len(served.data)),
                        },
                        body=body,
                    )
                    return
                self._file(repo, resolve["path"], served, body=body)
                return
            if cdn := _CDN.fullmatch(path):
                hub.cdn_authorized.append("Authorization" in self.headers)
                repo = hub.repos[cdn["repo"]]
                self._file(repo, cdn["path"], repo.files[cdn["path"]], body=body)
                return
            self._error(404, "RepoNotFound")

        def _file(self, repo: HubRepo, name: str, served: HubFile, *, body: bool) -> None:
            data = served.data
            if (repo.repo_id, name) in hub._corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            headers = {
                "X-Repo-Commit": repo.commit,
                "ETag": f'"{served.etag}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            if served.lfs:
                headers |= {"X-Linked-Etag": f'"{served.sha256}"', "X-Linked-Size": str(len(data))}
            status, start = 200, 0
            if body and (match := _RANGE.fullmatch(self.headers.get("Range", ""))):
                start = int(match[1])
                end = int(match[2]) if match[2] else len(data) - 1
                if start >= len(data):
                    self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, body=True)
                    return
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                status, data = 206, data[start : end + 1]
            cut = hub._next_cut(repo.repo_id, name) if body else None
            if cut is None or cut >= len(data):
                self._send(status, data, headers, body=body)
                return
            # Promise the whole body, send part of it, drop the connection: a transfer cut mid-way.
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

        def _send(self, status: int, data: bytes, headers: Mapping[str, str], *, body: bool) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler


@contextmanager
def loopback_hub() -> Iterator[LoopbackHub]:
    """A LoopbackHub listening on 127.0.0.1 (its `url`), for the length of the block."""
    hub = LoopbackHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="loopback-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
