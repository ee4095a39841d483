"""Fixtures every test folder shares: loopback servers that speak the model providers' wire protocols.

`gemini_server` answers `POST /v1beta/models/{model}:generateContent` as the Gemini API does (checking the
`x-goog-api-key` header); `openrouter_server` answers `POST /api/v1/chat/completions` as OpenRouter does (checking
the bearer token). Tests drive them with the real google-genai SDK and the real httpx client. Each server plays a
script of replies in order, then falls back to `respond(request)`; faults (error statuses, Retry-After, safety
blocks, malformed bodies, reset connections, hangs) are replies like any other. Nothing leaves 127.0.0.1.

Tiers: every test is `unit`, `emulator` or `cluster` (pyproject.toml registers them; `pytest -m emulator` runs one).
The rule (`pytest_collection_modifyitems` below): a tier marker on the test, its class or its module (`pytestmark`)
wins; a test without one is `emulator` when its module lies in tests/devcluster/, `cluster` in tests/cluster/ (a real
control plane on loopback, built by `make controlplane`; skipped, saying so, where it is not built), else `unit`.
Two tiers on one test fail the collection.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

API_KEY = "test-key"

# --- tiers -----------------------------------------------------------------------------------------------------------

TIERS = ("unit", "emulator", "cluster")
# Folders of tests/ whose every module is of one tier: the embedded cluster's, the real control plane's.
FOLDER_TIERS = {"devcluster": "emulator", "cluster": "cluster"}
TESTS = Path(__file__).parent


def _tiers(item: pytest.Item) -> list[str]:
    """The tiers marked on `item`, its class or its module, each once."""
    return sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})


def _default_tier(item: pytest.Item) -> str:
    relative = item.path.relative_to(TESTS) if item.path.is_relative_to(TESTS) else item.path
    return FOLDER_TIERS.get(relative.parts[0], "unit")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every test exactly one tier: its own marker, else its folder's default; two tiers fail the collection."""
    doubled = []
    for item in items:
        tiers = _tiers(item)
        if len(tiers) > 1:
            doubled.append(f"{item.nodeid}: {', '.join(tiers)}")
        elif not tiers:
            item.add_marker(getattr(pytest.mark, _default_tier(item)))
    if doubled:
        raise pytest.UsageError("a test has exactly one tier (unit, emulator or cluster):\n  " + "\n  ".join(doubled))


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: Any = None  # JSON-serialisable, or bytes sent as they are
    headers: dict[str, str] = field(default_factory=dict)
    action: str = "respond"  # respond | reset (close the connection with RST) | hang (answer after `delay`)
    delay: float = 0.0


@dataclass
class ModelRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def schema_name(self) -> str:
        """caption | style_profile | reformulated_prompt: what the request asks for."""
        if "generationConfig" in self.body:
            properties = self.body["generationConfig"]["responseJsonSchema"]["properties"]
            return {"caption": "caption", "MUST_APPLY": "style_profile", "prompt": "reformulated_prompt"}[
                next(iter(properties))
            ]
        return self.body["response_format"]["json_schema"]["name"]

    @property
    def text(self) -> str:
        """All the user text of the request (the prompt and any note appended to it)."""
        if "contents" in self.body:
            return " ".join(p.get("text", "") for c in self.body["contents"] for p in c["parts"])
        content = self.body["messages"][-1]["content"]
        return " ".join(p.get("text", "") for p in content if p.get("type") == "text")

    @property
    def image_count(self) -> int:
        if "contents" in self.body:
            return sum("inlineData" in p for c in self.body["contents"] for p in c["parts"])
        return sum(p.get("type") == "image_url" for p in self.body["messages"][-1]["content"])


@dataclass
class ModelServer:
    """A provider on loopback: `script` replies first, then `respond(request)` (default: an error)."""

    protocol: str  # gemini | openrouter
    script: list[Reply] = field(default_factory=list)
    respond: Callable[[ModelRequest], Reply] | None = None
    requests: list[ModelRequest] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    port: int = 0
    prompt_tokens: int = 100
    output_tokens: int = 20

    @property
    def base_url(self) -> str:
        root = f"http://127.0.0.1:{self.port}"
        return root if self.protocol == "gemini" else f"{root}/api/v1"

    @property
    def env(self) -> dict[str, str]:
        """The variables that point the pipeline at this server with a valid key."""
        if self.protocol == "gemini":
            return {"GEMINI_API_KEY": API_KEY, "KLEINSTYLE_GEMINI_BASE_URL": self.base_url}
        return {"OPENROUTER_API_KEY": API_KEY, "KLEINSTYLE_OPENROUTER_BASE_URL": self.base_url}

    # --- replies in this server's protocol ---

    @staticmethod
    def reply(**fields: Any) -> Reply:
        """A raw reply: reply(action="reset"), reply(action="hang", delay=5), reply(body=b"<html>")."""
        return Reply(**fields)

    def answer(self, obj: Any) -> Reply:
        """A successful answer whose text is `obj` as JSON (or `obj` itself when it is a str)."""
        text = obj if isinstance(obj, str) else json.dumps(obj)
        if self.protocol == "gemini":
            return Reply(
                body={
                    "candidates": [
                        {"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}
                    ],
                    "usageMetadata": {
                        "promptTokenCount": self.prompt_tokens,
                        "candidatesTokenCount": self.output_tokens - 5,
                        "thoughtsTokenCount": 5,
                        "totalTokenCount": self.prompt_tokens + self.output_tokens,
                    },
                    "modelVersion": "gemini-2.5-pro",
                }
            )
        return Reply(
            body={
                "id": "gen-1",
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                        "native_finish_reason": "STOP",
                    }
                ],
                "usage": {
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self.output_tokens,
                    "total_tokens": self.prompt_tokens + self.output_tokens,
                },
            }
        )

    def error(self, status: int, message: str = "error", headers: dict[str, str] | None = None, **extra: Any) -> Reply:
        """An HTTP error with the provider's error body (extra keys go into it, e.g. Gemini's `details`)."""
        names = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED"}
        status_name = names.get(status, "UNAVAILABLE" if status >= 500 else "FAILED_PRECONDITION")
        if self.protocol == "gemini":
            body = {"error": {"code": status, "message": message, "status": status_name, **extra}}
        else:
            body = {"error": {"code": status, "message": message, **extra}}
        return Reply(status=status, body=body, headers=headers or {})

    def blocked(self) -> Reply:
        """A safety block: Gemini's prompt feedback, OpenRouter's content filter."""
        if self.protocol == "gemini":
            return Reply(body={"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 9}})
        return Reply(
            body={
                "choices": [
                    {"message": {"role": "assistant", "content": ""}, "finish_reason": "content_filter",
                     "native_finish_reason": "SAFETY"}
                ],
                "usage": {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9},
            }
        )  # fmt: skip

    def calls(self, schema_name: str | None = None) -> list[ModelRequest]:
        return [r for r in self.requests if schema_name is None or r.schema_name == schema_name]

    # --- serving ---

    def _route_ok(self, request: ModelRequest) -> Reply | None:
        if self.protocol == "gemini":
            if not (request.path.startswith("/v1beta/models/") and request.path.endswith(":generateContent")):
                return self.error(404, f"unknown path {request.path}")
            if request.headers.get("x-goog-api-key") != API_KEY:
                return self.error(403, "API key not valid. Please pass a valid API key.")
        else:
            if request.path != "/api/v1/chat/completions":
                return self.error(404, f"unknown path {request.path}")
            if request.headers.get("authorization") != f"Bearer {API_KEY}":
                return self.error(401, "No auth credentials found")
        return None

    def next_reply(self, request: ModelRequest) -> Reply:
        if (refused := self._route_ok(request)) is not None:
            return refused
        if self.script:
            return self.script.pop(0)
        if self.respond is not None:
            return self.respond(request)
        return self.error(500, "no reply scripted")


def _handler(state: ModelServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b"{}"
            headers = {k.lower(): v for k, v in self.headers.items()}
            request = ModelRequest(self.path, headers, json.loads(raw or b"{}"))
            state.requests.append(request)
            reply = state.next_reply(request)
            if reply.action == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
                return
            if reply.action == "hang" and state.stop.wait(reply.delay):
                return
            body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def loopback() -> Iterator[Callable[..., ThreadingHTTPServer]]:
    """start(handler_class, tls_context=None): an HTTP(S) server on 127.0.0.1 serving from a thread; every server
    started is shut down at teardown (after the fixtures using it, which release their handlers first)."""
    servers: list[ThreadingHTTPServer] = []

    def start(handler: type[BaseHTTPRequestHandler], context: Any = None) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.handle_error = lambda request, address: None  # resets and client hang-ups are what tests play
        if context is not None:
            server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _serve(protocol: str, loopback: Callable[..., ThreadingHTTPServer]) -> Iterator[ModelServer]:
    state = ModelServer(protocol)
    state.port = loopback(_handler(state)).server_address[1]
    try:
        yield state
    finally:
        state.stop.set()


@pytest.fixture
def gemini_server(loopback: Callable[..., ThreadingHTTPServer]) -> Iterator[ModelServer]:
    yield from _serve("gemini", loopback)


@pytest.fixture
def openrouter_server(loopback: Callable[..., ThreadingHTTPServer]) -> Iterator[ModelServer]:
    yield from _serve("openrouter", loopback)


@pytest.fixture(params=["gemini", "openrouter"])
def model_server(request: pytest.FixtureRequest) -> Iterator[ModelServer]:
    """Each provider in turn: for behaviour both must share (retries, faults, blocks, the cache)."""
    yield from _serve(request.param, request.getfixturevalue("loopback"))


@pytest.fixture(autouse=True)
def no_provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a real provider: keys and endpoint overrides from the developer's shell are removed."""
    for name in (
        "GEMINI_API_KEY",
        "GOOGLE_API_KEY",
        "OPENROUTER_API_KEY",
        "KLEINSTYLE_GEMINI_BASE_URL",
        "KLEINSTYLE_OPENROUTER_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)


@dataclass
class Clients:
    """Builds TextClients against a ModelServer with tiny, recorded waits (nothing really sleeps)."""

    cache_dir: str
    sleeps: list[float] = field(default_factory=list)

    def __call__(self, server: ModelServer, *, cache: bool = True, attempts: int = 3, timeout_s: float = 5.0,
                 max_server_wait_s: float = 5.0, model: str | None = None) -> Any:  # fmt: skip
        from kleinstyle.runtime.text.cache import AnswerCache
        from kleinstyle.runtime.text.client import TextClient
        from kleinstyle.runtime.text.providers import make_provider
        from kleinstyle.runtime.text.retry import RetryPolicy

        provider = make_provider(server.protocol, model, env=server.env, timeout_s=timeout_s)
        policy = RetryPolicy(
            attempts=attempts, base_s=0.01, cap_s=0.05, max_server_wait_s=max_server_wait_s, deadline_s=60
        )
        return TextClient(
            provider, AnswerCache(self.cache_dir if cache else None), policy=policy, sleep=self.sleeps.append
        )


@pytest.fixture
def clients(tmp_path: Any) -> Clients:
    """clients(server, cache=True, attempts=3, timeout_s=5.0, ...) -> a TextClient; `clients.sleeps` lists waits."""
    return Clients(str(tmp_path / "text-cache"))
