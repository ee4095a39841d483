"""A Kubernetes API emulator on a loopback port: kmock serves HTTP, `ObjectStore` keeps the objects.

kmock's `KubernetesScaffold` logs every request; its discovery and its stateful `KubernetesEmulator` lack what the
operator and kubectl rely on (docs/facts.md#kubernetes-and-kmock), so discovery (`discovery.py`), the OpenAPI
documents (`openapi.py`) and resource URLs are answered here: CRUD on `ObjectStore` with real metadata rules, PUT,
`/status`, selectors, finalizers, garbage collection, field validation (`?fieldValidation=`), admission, server-side
apply, watches that resume from a resourceVersion and send bookmarks (JSON lines), Tables for kubectl (`tables.py`),
kubectl's protobuf bodies (`protobuf.py`) and pod logs (`pod_logs.py`).

The server runs in its own thread with its own event loop. Code that blocks the caller's loop (a synchronous
`kubernetes` client call inside an `async def` kopf handler) then stalls only itself instead of deadlocking
against the server it is waiting for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml

from . import discovery, errors, openapi, protobuf, tables
from .errors import ApiError, bad_request
from .patching import APPLY_PATCH, JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH
from .pod_logs import PodLog
from .resources import CRD_GROUP, CRD_PLURAL, KindRegistry, ResourceKind
from .selectors import convert_field_selector, parse_field_selector, parse_label_selector
from .store import Admit, ObjectStore, WatchEvent, translate_event
from .validation import duplicate_fields, unknown_fields

DEV_TOKEN = "devcluster-token"  # any bearer token is accepted; kubeconfigs carry this one
MAX_REQUEST_BYTES = 3 * 1024 * 1024  # the API server's limit on a request body
FIELD_VALIDATION = ("Strict", "Warn", "Ignore")  # `?fieldValidation=`; none given is Warn, as on a real server


def is_protobuf(content_type: str) -> bool:
    return content_type.startswith("application/vnd.kubernetes.protobuf")


_NAMESPACE_LIST = re.compile(r"^/api/v1/namespaces/?$")


@dataclass(frozen=True)
class ApiPath:
    group: str
    version: str
    plural: str
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None


def parse_api_path(path: str) -> ApiPath | None:
    """The resource a URL addresses, or None for discovery and non-API paths."""
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    if not rest:
        return None
    # /api/v1/namespaces[/NAME[/status|/finalize]] is the Namespace kind itself, not a namespace prefix.
    namespace_kind = len(rest) <= 2 or (len(rest) == 3 and rest[2] in ("status", "finalize"))
    if group == "" and rest[0] == "namespaces" and namespace_kind:
        name, subresource = [*rest[1:], None, None][:2]
        return ApiPath("", version, "namespaces", None, name, subresource)
    namespace = None
    if rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
        if not rest:
            return None
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) or None
    return ApiPath(group, version, rest[0], namespace, name, subresource)


@dataclass(frozen=True)
class ApiRequest:
    """One request to a resource URL, as tests assert on it: `POST .../jobs` with a body naming the Job."""

    method: str
    path: str
    params: dict[str, str]
    body: Any
    status: int

    @property
    def name(self) -> str | None:
        """The object's name from the body (creates) or from the URL."""
        if isinstance(self.body, dict) and isinstance(self.body.get("metadata"), dict):
            name = self.body["metadata"].get("name")
            if name:
                return str(name)
        target = parse_api_path(self.path)
        return target.name if target else None


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesScaffold):
    """kmock's scaffold with resource URLs served from an `ObjectStore`."""

    store: ObjectStore
    bookmark_interval: float = 5.0
    # Where the executor writes each pod's log (LOGS/NAMESPACE/POD.log): `kubectl logs` reads them.
    logs_dir: Path | None = None
    log: list[ApiRequest] = attrs.field(factory=list, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _tick: asyncio.Future[None] | None = attrs.field(default=None, init=False)
    _loop: asyncio.AbstractEventLoop | None = attrs.field(default=None, init=False)
    _openapi_revision: int = attrs.field(default=-1, init=False)
    _openapi_docs: dict[str, Any] = attrs.field(factory=dict, init=False)

    async def __aenter__(self) -> ApiServer:
        self._loop = asyncio.get_running_loop()
        self.store.subscribe(self._on_change)
        return await super().__aenter__()

    def close_watches(self) -> None:
        """End every watch stream (at shutdown, so the HTTP server need not wait for them)."""
        self._closing = True
        self._wake()

    def _on_change(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._tick is not None and not self._tick.done():
            self._tick.set_result(None)

    def _next_tick(self) -> asyncio.Future[None]:
        if self._tick is None or self._tick.done():
            self._tick = asyncio.get_running_loop().create_future()
        return self._tick

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if (raw_request.content_length or 0) > MAX_REQUEST_BYTES:
            return _status_response(errors.too_large(MAX_REQUEST_BYTES))
        # kmock's URL parser fails on the bare namespace list; build its Request for that one path ourselves.
        if not _NAMESPACE_LIST.match(raw_request.path):
            return await super().__call__(raw_request)
        body = await raw_request.read()
        request = kmock.Request(
            id=len(self._requests),
            method=raw_request.method,
            url=raw_request.url,
            params=dict(raw_request.query),
            headers=dict(raw_request.headers),
            body=body,
            text=body.decode("utf-8", "replace"),
            data=_json_or_none(body),
            resource=kmock.resource("", "v1", "namespaces"),
            raw_request=raw_request,
        )
        self._requests.append(request)
        return await self._handle(request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        path = request.url.path
        if path == "/version":
            return _json_response(200, discovery.SERVER_VERSION)
        if discovery.is_discovery_path(path):
            doc = discovery.document(path, list(self.store.kinds))
            return _json_response(200, doc) if doc is not None else _status_response(errors.NOT_FOUND_PATH)
        if path.startswith("/openapi/"):
            doc = self._openapi(path)
            return _json_response(200, doc) if doc is not None else _status_response(errors.NOT_FOUND_PATH)
        target = parse_api_path(path)
        if target is None:  # not an API path: kmock's fallback answers (404)
            return await super()._handle(request)
        body = None
        warnings: list[str] = []
        try:
            kind = self.store.kinds.get(target.group, target.version, target.plural)
            if kind is None:
                raise errors.NOT_FOUND_PATH
            if target.subresource is not None and target.subresource not in kind.subresources:
                # A custom kind's unknown subresource reads as its object not found, a built-in's as no such path.
                raise (
                    errors.not_found(kind.plural, target.name or "", kind.group)
                    if kind.custom
                    else errors.NOT_FOUND_PATH
                )
            body = _request_body(request, kind)
            _check_body(str(request.method.value).upper(), kind, body)
            warnings = self._validate_fields(request, kind, target, body)
            status, payload = await self._dispatch(request, kind, target, body)
        except ApiError as exc:
            status, payload = exc.code, exc.status
        self.log.append(ApiRequest(str(request.method.value), request.url.path, dict(request.params), body, status))
        if isinstance(payload, PodLog):
            return await payload.respond(_raw(request))
        as_table = (
            status == 200
            and request.method.value.upper() == "GET"
            and tables.wants_table(request.headers.get("Accept", ""))
        )
        include = request.params.get("includeObject", "")
        if hasattr(payload, "__aiter__"):
            if as_table:
                payload = tables.table_events(kind, self._crd_of(kind), payload, include)
            return await _stream_events(_raw(request), payload)
        if as_table:
            payload = tables.table(kind, self._crd_of(kind), payload, include)
        response = _json_response(status, payload)
        for warning in warnings if status < 400 else ():
            response.headers.add("Warning", f"299 - {json.dumps(warning)}")  # kubectl prints "Warning: ..."
        return response

    def _validate_fields(self, request: kmock.Request, kind: ResourceKind, target: ApiPath, body: Any) -> list[str]:
        """The decoder's field validation of a write to a custom resource, as `?fieldValidation=` asks: fields its
        schema does not declare and JSON keys given twice are a 400 under Strict (kubectl's default), dropped with
        a warning each under Warn (no parameter: client-go, kopf), dropped silently under Ignore (`kubectl apply
        --validate=false`). `body` loses the unknown fields in place; the warnings are returned. JSON patches (a
        list of operations) and /status writes are left to the admission hook."""
        method = str(request.method.value).upper()
        directive = request.params.get("fieldValidation") or "Warn"
        if method not in ("POST", "PUT", "PATCH") or not kind.custom:
            return []
        if directive not in FIELD_VALIDATION:
            allowed = ", ".join(f'"{value}"' for value in FIELD_VALIDATION)
            raise bad_request(f'fieldValidation: Unsupported value: "{directive}": supported values: {allowed}')
        schema = self._schema_of(kind, target.version)
        if target.subresource is not None or not isinstance(body, dict) or schema is None:
            return []
        problems = [f'duplicate field "{path}"' for path in duplicate_fields(request.body or b"")]
        problems += [f'unknown field "{path}"' for path in unknown_fields(body, schema)]
        if problems and directive == "Strict":
            raise bad_request(
                f'{kind.kind} in version "{target.version}" cannot be handled as a {kind.kind}: strict decoding '
                f"error: {', '.join(problems)}"
            )
        return problems if directive == "Warn" else []

    def _schema_of(self, kind: ResourceKind, version: str) -> dict[str, Any] | None:
        """The openAPIV3Schema a CRD gives `version` of `kind`, if any."""
        crd = self._crd_of(kind) or {}
        for served in crd.get("spec", {}).get("versions", ()):
            if served.get("name") == version:
                return (served.get("schema") or {}).get("openAPIV3Schema")
        return None

    def _crd_of(self, kind: ResourceKind) -> dict[str, Any] | None:
        if not kind.custom:
            return None
        crd_kind = self.store.kinds.get(CRD_GROUP, "v1", CRD_PLURAL)
        assert crd_kind is not None
        try:
            return self.store.get(crd_kind, None, kind.qualified)
        except ApiError:
            return None

    async def _dispatch(
        self, request: kmock.Request, kind: ResourceKind, target: ApiPath, body: Any
    ) -> tuple[int, Any]:
        method = str(request.method.value).upper()
        params = request.params
        namespace = target.namespace if kind.namespaced else None
        if params.get("dryRun"):
            raise bad_request("dryRun is not supported by the dev cluster")  # refuse rather than write for real
        if method == "GET" and params.get("watch") in ("true", "1"):
            return 200, self._watch(kind, namespace, target.name, dict(params))
        if target.name is None:
            if method == "GET":
                items, rv = self.store.list(kind, namespace, *_selectors(params, kind, self._crd_of(kind)))
                return 200, self._list_body(kind, items, rv)
            if method == "POST":
                return 201, self.store.create(kind, namespace, body or {}, manager=_manager(request))
            if method == "DELETE":
                selected = _selectors(params, kind, self._crd_of(kind))
                deleted = self.store.delete_collection(kind, namespace, *selected, _delete_options(params, body))
                return 200, self._list_body(kind, deleted, self.store.resource_version)
        elif method == "GET" and target.subresource == "log" and kind.qualified == "pods":
            return 200, self._pod_log(namespace, target.name, params)
        elif method == "GET":
            return 200, self.store.get(kind, namespace, target.name)
        elif method == "PUT":
            return 200, self.store.replace(
                kind, namespace, target.name, body or {}, target.subresource, manager=_manager(request)
            )
        elif method == "PATCH":
            content_type = _media_type(request.headers.get("Content-Type", ""))
            _check_patch(kind, content_type, body)
            is_apply = content_type == APPLY_PATCH and target.subresource is None
            with self.store.lock:  # an apply that creates answers 201, as a POST does
                created = is_apply and not self.store.exists(kind, namespace, target.name)
                patched = self.store.patch(
                    kind,
                    namespace,
                    target.name,
                    body,
                    content_type,
                    target.subresource,
                    # An apply names its manager; only other writes fall back to the client's name.
                    manager=params.get("fieldManager") if is_apply else _manager(request),
                    force=params.get("force") in ("true", "1"),
                )
            return 201 if created else 200, patched
        elif method == "DELETE":
            return 200, self.store.delete(kind, namespace, target.name, _delete_options(params, body))
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _openapi(self, path: str) -> dict[str, Any] | None:
        """An OpenAPI document, built once per set of served kinds (kubectl asks for the root on every apply)."""
        if self._openapi_revision != self.store.kinds.revision:
            self._openapi_docs.clear()
            self._openapi_revision = self.store.kinds.revision
        if path not in self._openapi_docs:
            self._openapi_docs[path] = self._build_openapi(path)
        return self._openapi_docs[path]

    def _build_openapi(self, path: str) -> dict[str, Any] | None:
        kinds = list(self.store.kinds)
        crd_kind = self.store.kinds.get(CRD_GROUP, "v1", CRD_PLURAL)
        crds = self.store.list(crd_kind)[0] if crd_kind is not None else []
        if path == "/openapi/v2":
            return openapi.v2(kinds, crds)
        if path == "/openapi/v3":
            docs = {gv: self._openapi(f"/openapi/v3/{gv}") for gv in openapi.group_versions(kinds)}
            return openapi.v3_root({gv: doc for gv, doc in docs.items() if doc is not None})
        if path.startswith("/openapi/v3/"):
            return openapi.v3_group_version(path.removeprefix("/openapi/v3/"), kinds, crds)
        return None

    def _pod_log(self, namespace: str | None, name: str, params: Any) -> PodLog:
        pods = self.store.kinds.get("", "v1", "pods")
        assert pods is not None
        self.store.get(pods, namespace, name)  # 404 for a pod that does not exist
        path = (self.logs_dir or Path("/nonexistent")) / (namespace or "") / f"{name}.log"

        def finished() -> bool:
            try:
                pod = self.store.get(pods, namespace, name)
            except ApiError:
                return True
            return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")

        tail = params.get("tailLines")
        return PodLog(
            path,
            follow=params.get("follow") in ("true", "1"),
            tail_lines=int(tail) if tail and tail.lstrip("-").isdigit() and int(tail) >= 0 else None,
            finished=finished,
        )

    @staticmethod
    def _list_body(kind: ResourceKind, items: list[dict[str, Any]], rv: str) -> dict[str, Any]:
        return {
            "apiVersion": kind.api_version,
            "kind": f"{kind.kind}List",
            "metadata": {"resourceVersion": rv},
            "items": items,
        }

    def _watch(
        self, kind: ResourceKind, namespace: str | None, name: str | None, params: dict[str, str]
    ) -> AsyncIterator[Any]:
        labels, fields = _selectors(params, kind, self._crd_of(kind))
        if name is not None:
            fields = [*fields, ("metadata.name", "=", name)]
        since = params.get("resourceVersion") or ""
        if since not in ("", "0") and not since.isdigit():
            raise bad_request(f"invalid resourceVersion {since!r}")
        initial = params.get("sendInitialEvents") == "true"
        bookmarks = params.get("allowWatchBookmarks") == "true"
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        if initial or since in ("", "0"):
            snapshot, rv = self.store.list(kind, namespace, labels, fields)
            cursor = int(rv)
        else:
            snapshot, cursor = [], int(since)

        async def stream() -> AsyncIterator[Any]:
            nonlocal cursor
            for obj in snapshot:
                yield {"type": "ADDED", "object": obj}
            if initial:
                yield self._bookmark(kind, cursor, initial_end=True)
            deadline = time.monotonic() + timeout if timeout else None
            last_sent = time.monotonic()
            while not self._closing:
                tick = self._next_tick()
                try:
                    events = self.store.events_since(kind, cursor)
                except ApiError as exc:
                    yield {"type": "ERROR", "object": exc.status}
                    return
                for event in events:
                    cursor = event.rv
                    shown = translate_event(event, namespace if kind.namespaced else None, labels, fields)
                    if shown is not None:
                        yield {"type": shown, "object": self._event_object(kind, event)}
                        last_sent = time.monotonic()
                if events:
                    continue
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return
                if bookmarks and now - last_sent >= self.bookmark_interval:
                    yield self._bookmark(kind, int(self.store.resource_version))
                    last_sent = now
                wait = self.bookmark_interval if deadline is None else min(self.bookmark_interval, deadline - now)
                await asyncio.wait({tick}, timeout=max(wait, 0.01))

        return stream()

    def _event_object(self, kind: ResourceKind, event: WatchEvent) -> dict[str, Any]:
        return self.store.present(kind, event.obj)

    @staticmethod
    def _bookmark(kind: ResourceKind, rv: int, initial_end: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {"type": "BOOKMARK", "object": {"apiVersion": kind.api_version, "kind": kind.kind, "metadata": meta}}


def _manager(request: kmock.Request) -> str:
    """The field manager of a write: `?fieldManager=`, else the client's name from its User-Agent, as a real API
    server derives it."""
    named = request.params.get("fieldManager")
    if named:
        return str(named)[:128]
    agent = request.headers.get("User-Agent", "")
    return (agent.split("/")[0].strip() or "unknown")[:128]


def _raw(request: kmock.Request) -> aiohttp.web.BaseRequest:
    """aiohttp's request behind kmock's (kmock keeps it private), to stream a response on it."""
    raw = request._raw_request
    assert raw is not None
    return raw


def _request_factory(*args: Any) -> aiohttp.web.BaseRequest:
    """aiohttp's request, reading bodies up to the API server's limit (aiohttp's default is 1 MiB)."""
    return aiohttp.web.BaseRequest(*args, asyncio.get_running_loop(), client_max_size=MAX_REQUEST_BYTES)


def _json_response(status: int, payload: Any) -> aiohttp.web.Response:
    return aiohttp.web.Response(status=status, body=json.dumps(payload).encode(), content_type="application/json")


def _status_response(error: ApiError) -> aiohttp.web.Response:
    return _json_response(error.code, error.status)


async def _stream_events(raw: aiohttp.web.BaseRequest, events: AsyncIterator[Any]) -> aiohttp.web.StreamResponse:
    """A watch as the API server sends it: `application/json`, one event object per line."""
    response = aiohttp.web.StreamResponse(status=200)
    response.content_type = "application/json"
    response.enable_chunked_encoding()
    await response.prepare(raw)
    with contextlib.suppress(ConnectionResetError, ConnectionError):
        async for event in events:
            await response.write(json.dumps(event).encode() + b"\n")
        await response.write_eof()
    return response


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def _media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def _request_body(request: kmock.Request, kind: ResourceKind) -> Any:
    """The decoded body (JSON, YAML for server-side apply, kubectl's protobuf), None when there is none; a body that
    does not decode is the client's error (400), as on a real server, not an empty object."""
    raw = request.body or b""
    if not raw.strip():
        return None
    content_type = request.headers.get("Content-Type", "")
    if is_protobuf(content_type):
        return protobuf.decode(raw)
    patching = str(request.method.value).upper() == "PATCH"
    try:
        if "yaml" in _media_type(content_type):
            return yaml.safe_load(raw)
        return json.loads(raw)
    except (ValueError, yaml.YAMLError) as exc:
        if patching:
            raise bad_request(f"error decoding patch: {exc}") from exc
        raise bad_request(
            f"the object provided is unrecognized (must be of type {kind.kind}): couldn't get version/kind; "
            f"json parse error: {exc}"
        ) from exc


def _check_body(method: str, kind: ResourceKind, body: Any) -> None:
    """The decoder's checks of a created or replaced object's apiVersion and kind: a custom resource must name its
    own (its decoder has nothing to default them from); a built-in kind may leave them out but not name another."""
    if method not in ("POST", "PUT") or not isinstance(body, dict):
        return
    api_version, kind_name = body.get("apiVersion"), body.get("kind")
    if kind.custom:
        for key, value in (("Kind", kind_name), ("apiVersion", api_version)):
            if not value:
                raise bad_request(
                    f"the object provided is unrecognized (must be of type {kind.kind}): "
                    f"Object '{key}' is missing in '{json.dumps(body)[:100]}'"
                )
        if api_version != kind.api_version:
            raise bad_request(
                f"the API version in the data ({api_version}) does not match the expected API version "
                f"({kind.api_version})"
            )
        if kind_name != kind.kind:
            name = str((body.get("metadata") or {}).get("name") or "")
            problem = f'kind: Invalid value: "{kind_name}": must be {kind.kind}'
            raise errors.field_invalid(str(kind_name), kind.group, name, [problem])
    elif (api_version and api_version != kind.api_version) or (kind_name and kind_name != kind.kind):
        version = api_version or kind.api_version
        raise bad_request(f'{kind_name or kind.kind} in version "{version}" cannot be handled as a {kind.kind}')


def _check_patch(kind: ResourceKind, media_type: str, body: Any) -> None:
    """415 for a patch format the kind does not take (custom resources have no strategic merge patch: no Go types
    to read merge keys from), 400 for a body of the wrong shape, before the object is looked up."""
    accepted = [JSON_PATCH, MERGE_PATCH, APPLY_PATCH] + ([] if kind.custom else [STRATEGIC_MERGE_PATCH])
    if media_type not in accepted:
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format - accepted media types include: {', '.join(accepted)}",
        )
    if media_type == JSON_PATCH and not isinstance(body, list):
        raise bad_request("error decoding patch: a JSON patch must be a list of operations")
    if media_type != JSON_PATCH and not isinstance(body, dict):
        raise bad_request("error decoding patch: the patch must be a JSON object")


def _selectors(params: Any, kind: ResourceKind, crd: dict[str, Any] | None) -> tuple[list[Any], list[Any]]:
    """The request's label selector, and its field selector with each label as the stored object's path; 400 for
    what does not parse or names a field the kind does not index (`selectors.FIELD_LABELS`)."""
    selectable = tuple(
        str(field.get("jsonPath", "")).lstrip(".")
        for version in ((crd or {}).get("spec") or {}).get("versions") or ()
        if version.get("name") == kind.version
        for field in version.get("selectableFields") or ()
    )
    try:
        fields = convert_field_selector(
            parse_field_selector(params.get("fieldSelector")),
            (kind.group, kind.plural),
            custom=kind.custom,
            namespaced=kind.namespaced,
            selectable=selectable,
        )
        return parse_label_selector(params.get("labelSelector")), fields
    except ValueError as exc:
        raise bad_request(str(exc)) from exc


def _delete_options(params: Any, body: Any) -> dict[str, Any]:
    options = dict(body) if isinstance(body, dict) else {}
    if params.get("propagationPolicy"):
        options["propagationPolicy"] = params["propagationPolicy"]
    return options


class Emulator:
    """The API emulator, served from a background thread on a loopback port.

    `async with Emulator(crds, admit=hook) as api:` (or `with ...`, or `start()`/`stop()`); then `api.url`,
    `api.kubeconfig(path)`, and the test helpers `get`, `list`, `requests`, `count_creates`. Objects are written
    only over HTTP, like on a real cluster; the helpers read the store directly.
    """

    def __init__(
        self,
        crds: Iterable[dict[str, Any]] = (),
        admit: Admit | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        bookmark_interval: float = 5.0,
        logs_dir: Path | None = None,
    ) -> None:
        self.store = ObjectStore(admit=admit)
        self.logs_dir = logs_dir
        self.register_crds(crds)
        self._host, self._port = host, port
        self._bookmark_interval = bookmark_interval
        self._server: ApiServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._url: str | None = None

    @property
    def kinds(self) -> KindRegistry:
        return self.store.kinds

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the emulator is not running")
        return self._url

    def register_crds(self, crds: Iterable[dict[str, Any]]) -> None:
        """Serve the custom kinds of these CRD documents (also stored, so `kubectl get crd` lists them)."""
        crd_kind = self.store.kinds.get(CRD_GROUP, "v1", CRD_PLURAL)
        assert crd_kind is not None
        for crd in crds:
            name = (crd.get("metadata") or {}).get("name")
            current = self.get(f"{CRD_GROUP}/v1/{CRD_PLURAL}", None, name) if name else None
            if current is not None:
                meta = {**crd.get("metadata", {}), "resourceVersion": current["metadata"]["resourceVersion"]}
                self.store.replace(crd_kind, None, name, {**crd, "metadata": meta})
            else:
                self.store.create(crd_kind, None, crd)

    # --- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the emulator is already running")
        self._ready.clear()
        self._thread = threading.Thread(target=self._thread_main, name="devcluster-api", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError("the emulator failed to start") from self._error

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop may have just closed
                self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=30)
        self._thread = None
        self._url = None

    def __enter__(self) -> Emulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Emulator:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start() if it happens before the server is ready
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = ApiServer(store=self.store, bookmark_interval=self._bookmark_interval, logs_dir=self.logs_dir)
        async with server:
            runner = aiohttp.web.ServerRunner(
                aiohttp.web.Server(server, request_factory=_request_factory), shutdown_timeout=1.0
            )
            await runner.setup()
            site = aiohttp.web.TCPSite(runner, self._host, self._port)
            await site.start()
            host, port = runner.addresses[0][:2]
            self._url = f"http://{host}:{port}"
            self._server = server
            self._ready.set()
            try:
                await self._stopping.wait()
            finally:
                server.close_watches()
                await asyncio.sleep(0.05)  # let the streams see the close and end their responses
                await runner.cleanup()

    # --- test helpers --------------------------------------------------------------------------------------------

    def kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        """Write a kubeconfig for this emulator (plain http, a dummy bearer token) and return its path."""
        return write_kubeconfig(path, self.url, namespace=namespace)

    def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object as the API would return it, or None. `resource` is a plural, kind, or `group/version/plural`."""
        try:
            return self.store.get(self.kinds.find(resource), namespace, name)
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def list(
        self, resource: str, namespace: str | None = None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        return self.store.list(self.kinds.find(resource), namespace, parse_label_selector(label_selector))[0]

    def requests(self) -> list[ApiRequest]:
        """Every request to a resource URL so far, oldest first (discovery requests are in kmock's own log)."""
        return list(self._server.log) if self._server is not None else []

    def count_creates(self, resource: str, name: str, namespace: str | None = None, *, attempts: bool = False) -> int:
        """How many times `POST .../{plural}` created an object called `name` (or tried to, with `attempts`)."""
        kind = self.kinds.find(resource)
        count = 0
        for request in self.requests():
            target = parse_api_path(request.path)
            if request.method != "POST" or target is None or target.name is not None:
                continue
            if (target.group, target.plural) != kind.storage_key or (namespace and target.namespace != namespace):
                continue
            if request.name == name and (attempts or request.status == 201):
                count += 1
        return count


def write_kubeconfig(path: str | Path, url: str, *, namespace: str = "default") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "devcluster", "cluster": {"server": url}}],
        "users": [{"name": "devcluster", "user": {"token": DEV_TOKEN}}],
        "contexts": [
            {"name": "devcluster", "context": {"cluster": "devcluster", "user": "devcluster", "namespace": namespace}}
        ],
        "current-context": "devcluster",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
