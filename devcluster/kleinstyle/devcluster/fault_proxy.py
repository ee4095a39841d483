"""`FaultProxy`: a loopback HTTPS proxy in front of kube-apiserver that misbehaves on purpose.

A client whose kubeconfig names the proxy (`proxy.url`, the cluster's CA: the proxy serves a certificate it signed)
reaches the real API server through it: every request is forwarded as sent (its bearer token too, so the server
knows the client as itself), and every response streamed back as it comes, watches included. On a seeded schedule
(`storm`) or on command (`inject`), it answers instead of the server, or loses the answer:

- `429`: TooManyRequests with Retry-After, as API priority and fairness sheds load;
- `500`: InternalError, as a server whose etcd timed out answers;
- `409`: Conflict on a PUT or PATCH, as an optimistic-concurrency clash with another writer;
- `reset`: a write (POST, PUT, PATCH, DELETE) is forwarded and done, and the connection is then dropped before the
  answer: the client cannot tell whether it happened, as after a load balancer's timeout.

The first three never reach the server (the request did not happen); `reset` always does. `cut_watches()` drops every
open watch stream at once, mid-stream, as a restarted load balancer does; `expire_watches(seconds)` cuts them and, for
that long, answers every watch with 410 Gone (its resourceVersion "too old"), as a restarted kube-apiserver, whose
watch cache starts afresh, answers a client that resumes: the client must list again, and what was deleted
meanwhile reaches it as no DELETED event. Only the client's certificate-less
credentials pass: a bearer token (a ServiceAccount's), never a client certificate, which TLS does not forward.

    with FaultProxy(cluster, seed=7) as proxy:  # write a kubeconfig with proxy.url and the cluster's CA
        proxy.storm(Rates(throttle=0.1, error=0.05), seconds=10)
        proxy.inject("reset")                    # the next write is done, and its answer lost
        proxy.cut_watches()
        proxy.injected                           # Counter of faults dealt, by kind
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from .lifecycle import ThreadedService

FAULTS = ("429", "500", "409", "reset")
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
RETRY_AFTER_S = 1
# Not forwarded either way: hop-by-hop headers, and what the two connections set for themselves.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}
)
MAX_BODY = 64 * 1024 * 1024
# The one event of a watch whose resourceVersion the server no longer has (what kube-apiserver streams).
GONE = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": "too old resource version",
    "reason": "Expired",
    "code": 410,
}


class Upstream(Protocol):
    """What the proxy needs of a cluster (RealCluster has it): the API's URL, its CA, a serving certificate."""

    server: str
    ca_file: Path

    def serving_certificate(self, name: str, ips: Sequence[str]) -> tuple[Path, Path]: ...


@dataclass(frozen=True)
class Rates:
    """The share of eligible requests that get each fault while a storm lasts (each in [0, 1], summing to <= 1)."""

    throttle: float = 0.0  # 429, any request
    error: float = 0.0  # 500, any request
    conflict: float = 0.0  # 409, PUT and PATCH only
    reset: float = 0.0  # the answer lost, writes only


def eligible(fault: str, method: str) -> bool:
    """Whether `fault` may be dealt to a request of `method`: 409 only where a real server can answer it (an update),
    a lost answer only where it matters (a write)."""
    if fault == "409":
        return method in ("PUT", "PATCH")
    if fault == "reset":
        return method in WRITES
    return fault in FAULTS


def choose_fault(draw: float, method: str, rates: Rates) -> str | None:
    """The fault one request gets for a uniform `draw` in [0, 1) under `rates`, or None: the rates are laid end to
    end (429, 500, 409, reset), and a fault the method is not eligible for is no fault."""
    edge = 0.0
    for fault, rate in zip(FAULTS, (rates.throttle, rates.error, rates.conflict, rates.reset), strict=True):
        edge += rate
        if draw < edge:
            return fault if eligible(fault, method) else None
    return None


def is_watch(method: str, path: str, query: dict[str, str]) -> bool:
    """A watch request: `?watch=true` (or 1), or the legacy /watch/ paths."""
    return method == "GET" and (query.get("watch") in ("true", "1") or "/watch/" in path)


def status_body(fault: str, method: str, path: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    """(code, headers, metav1.Status) the API server would answer for `fault`, worded as it words it, and saying who
    dealt it."""
    resource = path.rstrip("/").rsplit("/", 1)[-1] or path
    by = "(dealt by kleinstyle's fault proxy)"
    if fault == "429":
        code, reason = 429, "TooManyRequests"
        message = f"Too many requests, please try again later. {by}"
        details: dict[str, Any] = {"retryAfterSeconds": RETRY_AFTER_S}
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    elif fault == "500":
        code, reason, headers, details = 500, "InternalError", {}, {}
        message = f"Internal error occurred: etcdserver: request timed out {by}"
    elif fault == "409":
        code, reason, headers, details = 409, "Conflict", {}, {"name": resource}
        message = (
            f'Operation cannot be fulfilled on "{resource}": the object has been modified; please apply your changes '
            f"to the latest version and try again {by}"
        )
    else:
        raise ValueError(f"{fault} is answered by no status: {method} {path}")
    status = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code,
    }
    return code, headers, status


class FaultProxy(ThreadedService):
    """The proxy, on 127.0.0.1 with a free port, serving TLS with a certificate of the cluster's CA. `with` runs it in
    a thread of its own; `url` is where clients go. Thread-safe: a harness steers it from any thread."""

    thread_name = "fault-proxy"

    def __init__(self, cluster: Upstream, *, seed: int = 0) -> None:
        self.cluster = cluster
        self.url = ""
        self.injected: Counter[str] = Counter()  # faults dealt, by kind ("watch-cut" for each stream cut)
        self.forwarded = 0
        self._rng = random.Random(seed)
        self._rates = Rates()
        self._storm_until = 0.0
        self._queued: deque[str] = deque()
        self._lock = threading.Lock()
        self._watches: set[asyncio.Future[None]] = set()
        self._expired_until = 0.0
        super().__init__()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- steering

    def storm(self, rates: Rates, seconds: float) -> None:
        """Deal faults at `rates` (drawn from the seeded generator, request by request) for the next `seconds`."""
        with self._lock:
            self._rates, self._storm_until = rates, time.monotonic() + seconds

    def calm(self) -> None:
        """End a storm now; faults queued with `inject` are still dealt."""
        with self._lock:
            self._rates, self._storm_until = Rates(), 0.0

    def inject(self, fault: str, count: int = 1) -> None:
        """Deal `fault` to the next `count` requests it is eligible for (in the order they arrive)."""
        if fault not in FAULTS:
            raise ValueError(f"no fault {fault!r}: one of {', '.join(FAULTS)}")
        with self._lock:
            self._queued.extend([fault] * count)

    def cut_watches(self) -> int:
        """Drop every watch stream open now, mid-stream; returns how many. The clients' next watch goes through."""
        if self._loop is None:
            return 0
        return asyncio.run_coroutine_threadsafe(self._cut(), self._loop).result(timeout=30)

    def expire_watches(self, seconds: float) -> int:
        """Cut every watch now and answer each watch for `seconds` with 410 Gone; returns how many were cut."""
        with self._lock:
            self._expired_until = time.monotonic() + seconds
        return self.cut_watches()

    async def _cut(self) -> int:
        open_now = [cut for cut in self._watches if not cut.done()]
        for cut in open_now:
            cut.set_result(None)
        with self._lock:
            self.injected["watch-cut"] += len(open_now)
        return len(open_now)

    def _fault_for(self, method: str) -> str | None:
        """The fault this request gets: a queued one it is eligible for first, else the storm's draw."""
        with self._lock:
            for index, queued in enumerate(self._queued):
                if eligible(queued, method):
                    del self._queued[index]
                    self.injected[queued] += 1
                    return queued
            if time.monotonic() >= self._storm_until:
                return None
            fault = choose_fault(self._rng.random(), method, self._rates)
            if fault is not None:
                self.injected[fault] += 1
            return fault

    # -- serving

    async def start(self) -> None:
        cert, key = self.cluster.serving_certificate("kleinstyle-fault-proxy", ("127.0.0.1",))
        serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        serving.load_cert_chain(str(cert), str(key))
        upstream = ssl.create_default_context(cafile=str(self.cluster.ca_file))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=upstream, limit=0),
            auto_decompress=False,  # bytes pass as the server encoded them, with its Content-Encoding
            trust_env=False,
        )
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that goes away ends its handler, and with it the upstream request (a watch).
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=serving).start()
        self.url = f"https://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        await self._cut()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        method, path = request.method, request.path
        if is_watch(method, path, dict(request.query)) and time.monotonic() < self._expired_until:
            with self._lock:
                self.injected["watch-expired"] += 1
            return web.json_response({"type": "ERROR", "object": GONE})
        fault = self._fault_for(method)
        if fault in ("429", "500", "409"):
            code, headers, status = status_body(fault, method, path)
            return web.json_response(status, status=code, headers=headers)
        try:
            return await self._forward(request, fault)
        except (aiohttp.ClientError, OSError, TimeoutError):
            # The server is away (restarting: refused; or it dropped us): so is the client's connection, as through
            # a TCP load balancer, rather than an answer the server never gave.
            _drop(request)
            return web.Response(status=502)

    async def _forward(self, request: web.Request, fault: str | None) -> web.StreamResponse:
        method, path = request.method, request.path
        assert self._session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        watch = is_watch(method, path, dict(request.query))
        # No total timeout: a watch lasts as long as the server keeps it.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with self._session.request(
            method,
            self.cluster.server + request.raw_path,
            data=body or None,
            headers=headers,
            # A body without a Content-Type goes without one (the API server reads it as JSON); aiohttp would
            # call it application/octet-stream, which the server refuses.
            skip_auto_headers=() if "Content-Type" in request.headers else ("Content-Type",),
            timeout=timeout,
            allow_redirects=False,
        ) as upstream:
            with self._lock:
                self.forwarded += 1
            if fault == "reset":  # done on the server; the client never hears of it
                await upstream.read()
                _drop(request)
                return web.Response(status=502)  # never reaches anyone: the connection is gone
            reply = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP or name.lower() == "content-length":
                    reply.headers.add(name, value)
            await reply.prepare(request)
            if watch:
                await self._stream_watch(request, upstream, reply)
            else:
                async for chunk in upstream.content.iter_any():
                    await reply.write(chunk)
            with contextlib.suppress(ConnectionError):
                await reply.write_eof()
            return reply

    async def _stream_watch(
        self, request: web.Request, upstream: aiohttp.ClientResponse, reply: web.StreamResponse
    ) -> None:
        """Pass a watch's events on as they come until the server ends it, or `cut_watches` drops it mid-stream."""
        cut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._watches.add(cut)
        try:
            while True:
                read = asyncio.ensure_future(upstream.content.readany())
                try:
                    await asyncio.wait({read, cut}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not read.done():  # cut, or the client went away (the handler is cancelled)
                        read.cancel()
                if cut.done():
                    _drop(request)
                    return
                chunk = read.result()
                if not chunk:
                    return
                await reply.write(chunk)
        finally:
            self._watches.discard(cut)


def _drop(request: web.Request) -> None:
    """Close the client's connection at once, mid-answer or before one."""
    if request.transport is not None:
        request.transport.abort()
