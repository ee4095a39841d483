"""Fixtures for runtime tests: a pod filesystem under a temp dir, loopback HTTP(S) servers, generated pictures.

Nothing here reaches beyond loopback. The TLS server uses the test-only certificate in data/ (see data/README.md).
The suite runs with --import-mode=importlib, so helpers reach tests as fixtures rather than imports.
"""

from __future__ import annotations

import io
import json
import random
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

DATA = Path(__file__).parent / "data"
TEST_CA = DATA / "test-ca.pem"

Handler = Callable[[BaseHTTPRequestHandler], None]


# --- pod filesystem ------------------------------------------------------------------------------------------


@pytest.fixture
def rootfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """KLEINSTYLE_ROOTFS for the test; no Kubernetes API configured unless a test sets one."""
    root = tmp_path / "rootfs"
    root.mkdir()
    monkeypatch.setenv("KLEINSTYLE_ROOTFS", str(root))
    for name in ("KLEINSTYLE_KUBE_API", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    return root


# --- pictures ------------------------------------------------------------------------------------------------


def _picture(seed: int, size: tuple[int, int] = (96, 80), *, brightness: int = 0) -> Image.Image:
    rng = random.Random(seed)
    grid = Image.frombytes("RGB", (6, 6), bytes(rng.randrange(256) for _ in range(6 * 6 * 3)))
    image = grid.resize(size, Image.Resampling.BICUBIC)
    if brightness:
        image = image.point(lambda v: max(0, min(255, v + brightness)))
    return image


def _encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.fixture
def picture() -> Callable[..., Image.Image]:
    """picture(seed, size=(96, 80), brightness=0): a smooth RGB picture (an upscaled random 6x6 grid).

    Distinct seeds look nothing alike (difference hashes far apart); a brightness shift is a near copy.
    """
    return _picture


@pytest.fixture
def encode() -> Callable[..., bytes]:
    """encode(image, fmt="PNG", **save_params) -> the file's bytes."""
    return _encode


# --- loopback servers ----------------------------------------------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


@dataclass
class LoopbackServer:
    """A threaded HTTP(S) server on 127.0.0.1; tests add routes and read what it received."""

    tls: bool
    routes: dict[str, Handler] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)  # TLS SNI, one per handshake
    stop: threading.Event = field(default_factory=threading.Event)  # set at teardown; slow routes wait on it
    port: int = 0

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

    def respond(
        self,
        path: str,
        status: int = 200,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        length: bool = True,
    ) -> None:
        """Answer `path` with `status` and `body`; `length=False` omits Content-Length (the body ends at close)."""

        def handle(request: BaseHTTPRequestHandler) -> None:
            request.send_response(status)
            for name, value in (headers or {}).items():
                request.send_header(name, value)
            if length:
                request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            request.wfile.write(body)

        self.routes[path] = handle


def _make_handler(state: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class RouteHandler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            state.requests.append(Recorded(self.command, self.path, dict(self.headers.items()), body))
            route = state.routes.get(self.path.split("?", 1)[0])
            if route is None:
                self.send_error(404)
                return
            route(self)

        do_GET = do_PATCH = do_POST = _handle

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

    return RouteHandler


def _serve(tls: bool, loopback: Callable[..., Any]) -> Iterator[LoopbackServer]:
    state = LoopbackServer(tls=tls)
    context = None
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(DATA / "test-server.pem", DATA / "test-server-key.pem")
        context.sni_callback = lambda sock, name, ctx: state.server_names.append(name)
    state.port = loopback(_make_handler(state), context).server_address[1]
    try:
        yield state
    finally:
        state.stop.set()


@pytest.fixture
def https_server(loopback: Callable[..., Any]) -> Iterator[LoopbackServer]:
    yield from _serve(True, loopback)


@pytest.fixture
def http_server(loopback: Callable[..., Any]) -> Iterator[LoopbackServer]:
    yield from _serve(False, loopback)


@pytest.fixture
def trust_test_ca() -> ssl.SSLContext:
    """A client TLS context that trusts the test CA (and nothing else); verification stays on."""
    return ssl.create_default_context(cafile=str(TEST_CA))


# --- a Kubernetes API stand-in --------------------------------------------------------------------------------


@dataclass
class KubeApi:
    """Answers PATCH on a status subresource like the API server would, recording each one."""

    server: LoopbackServer
    statuses: list[int] = field(default_factory=list)  # answers to give, in order; 200 once used up

    def serve_status(self, path: str) -> None:
        def handle(request: BaseHTTPRequestHandler) -> None:
            status = self.statuses.pop(0) if self.statuses else 200
            body = json.dumps({"kind": "Status", "code": status}).encode()
            request.send_response(status)
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            request.wfile.write(body)

        self.server.routes[path] = handle

    @property
    def patches(self) -> list[Recorded]:
        return [r for r in self.server.requests if r.method == "PATCH"]


@pytest.fixture
def kube_api(http_server: LoopbackServer, rootfs: Path, monkeypatch: pytest.MonkeyPatch) -> KubeApi:
    """A plain-http API stand-in announced through KLEINSTYLE_KUBE_API, as the local dev cluster does."""
    monkeypatch.setenv("KLEINSTYLE_KUBE_API", http_server.url(""))
    return KubeApi(http_server)


@pytest.fixture
def in_cluster_api(https_server: LoopbackServer, rootfs: Path, monkeypatch: pytest.MonkeyPatch) -> KubeApi:
    """An https API stand-in found the in-cluster way: service env vars, ServiceAccount token "sa-token" and CA."""
    account = rootfs / "var/run/secrets/kubernetes.io/serviceaccount"
    account.mkdir(parents=True)
    (account / "token").write_text("sa-token\n")
    (account / "ca.crt").write_bytes(TEST_CA.read_bytes())
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(https_server.port))
    return KubeApi(https_server)


@pytest.fixture
def memory_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryFileSystem]:
    """fsspec's memory:// filesystem, emptied for this test."""
    monkeypatch.setattr(MemoryFileSystem, "store", {})
    monkeypatch.setattr(MemoryFileSystem, "pseudo_dirs", [""])
    yield MemoryFileSystem()
