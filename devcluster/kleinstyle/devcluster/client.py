"""A small async HTTP client for the emulator: what the executor (kubelet + Job controller) and `apply` use.

It talks HTTP like any other client, so everything it does is in the request log and goes through the same
admission, validation and watch events as the operator's own writes.
"""

from __future__ import annotations

import asyncio
import json
import math
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from .emulator import DEV_TOKEN
from .errors import ApiError
from .patching import LAST_APPLIED, MERGE_PATCH, three_way_patch
from .resources import KindRegistry, ResourceKind


class KubeClient:
    """`get`, `list`, `create`, `patch`, `delete` and kubectl-style `apply` against one API server URL.

    `kinds` maps apiVersion+kind and resource names to URLs (the emulator's registry, shared in-process, stands in
    for discovery). Failures raise `ApiError` carrying the server's code, reason and message.
    """

    def __init__(self, url: str, kinds: KindRegistry) -> None:
        self.url = url.rstrip("/")
        self.kinds = kinds
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def kind(self, resource: str | ResourceKind) -> ResourceKind:
        return resource if isinstance(resource, ResourceKind) else self.kinds.find(resource)

    def path(
        self,
        kind: ResourceKind,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None = None,
    ) -> str:
        path = f"/api/{kind.version}" if not kind.group else f"/apis/{kind.group}/{kind.version}"
        if kind.namespaced and namespace:
            path += f"/namespaces/{quote(namespace)}"
        path += f"/{kind.plural}"
        if name:
            path += f"/{quote(name)}"
        if subresource:
            path += f"/{subresource}"
        return path

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        session = self._ensure_session()
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type, "Authorization": f"Bearer {DEV_TOKEN}"}
        async with session.request(method, self.url + path, data=data, params=params, headers=headers) as response:
            text = await response.text()
            payload: Any
            try:
                payload = json.loads(text) if text else None
            except ValueError:
                payload = text
            if response.status >= 400:
                raise ApiError.from_status(response.status, payload)
            return payload

    def _ensure_session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is not None and not self._session.closed and self._loop is not loop:
            raise RuntimeError("a KubeClient serves the event loop it was first used in; make one per loop")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
            self._loop = loop
        return self._session

    # --- verbs ---------------------------------------------------------------------------------------------------

    async def get(self, resource: str | ResourceKind, namespace: str | None, name: str) -> dict[str, Any]:
        kind = self.kind(resource)
        return await self.request("GET", self.path(kind, namespace, name))

    async def get_or_none(
        self, resource: str | ResourceKind, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        try:
            return await self.get(resource, namespace, name)
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    async def list(
        self,
        resource: str | ResourceKind,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        kind = self.kind(resource)
        params = {}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        result = await self.request("GET", self.path(kind, namespace), params=params)
        return list(result.get("items") or [])

    async def list_with_version(
        self, resource: str | ResourceKind, namespace: str | None = None
    ) -> tuple[list[dict[str, Any]], str]:
        """The items and the list's resourceVersion, to watch from."""
        kind = self.kind(resource)
        result = await self.request("GET", self.path(kind, namespace))
        return list(result.get("items") or []), str((result.get("metadata") or {}).get("resourceVersion") or "")

    async def next_event(
        self, resource: str | ResourceKind, since: str, namespace: str | None = None, timeout: float = 2.0
    ) -> dict[str, Any] | None:
        """Wait for the first watch event after resourceVersion `since`; None when `timeout` passes quietly."""
        kind = self.kind(resource)
        params = {"watch": "true", "resourceVersion": since, "timeoutSeconds": str(max(1, math.ceil(timeout)))}
        session = self._ensure_session()
        headers = {"Authorization": f"Bearer {DEV_TOKEN}"}
        request_timeout = aiohttp.ClientTimeout(total=timeout + 10)
        url = self.url + self.path(kind, namespace)
        async with session.get(url, params=params, headers=headers, timeout=request_timeout) as response:
            if response.status >= 400:
                raise ApiError.from_status(response.status, await response.json(content_type=None))
            async for line in response.content:
                if line.strip():
                    return json.loads(line)
        return None

    async def create(
        self, resource: str | ResourceKind, body: dict[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        kind = self.kind(resource)
        namespace = namespace or (body.get("metadata") or {}).get("namespace")
        typed = {"apiVersion": kind.api_version, "kind": kind.kind, **body}  # as a typed client sends it
        return await self.request("POST", self.path(kind, namespace), body=typed)

    async def patch(
        self,
        resource: str | ResourceKind,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        subresource: str | None = None,
        content_type: str = MERGE_PATCH,
    ) -> dict[str, Any]:
        kind = self.kind(resource)
        path = self.path(kind, namespace, name, subresource)
        return await self.request("PATCH", path, body=patch, content_type=content_type)

    async def delete(
        self,
        resource: str | ResourceKind,
        namespace: str | None,
        name: str,
        *,
        propagation: str = "Background",
        missing_ok: bool = True,
    ) -> dict[str, Any] | None:
        kind = self.kind(resource)
        try:
            body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
            return await self.request("DELETE", self.path(kind, namespace, name), body=body)
        except ApiError as exc:
            if exc.code == 404 and missing_ok:
                return None
            raise

    async def apply(self, doc: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        """Create or update `doc` the way client-side `kubectl apply` does.

        Create with the last-applied annotation when absent; otherwise send a merge patch that sets what `doc` says
        and removes only what the previous apply set and `doc` no longer does, so fields written by others survive.
        """
        api_version, kind_name = doc.get("apiVersion"), doc.get("kind")
        kind = self.kinds.for_object(str(api_version), str(kind_name))
        if kind is None:
            raise ApiError(404, "NotFound", f'no matches for kind "{kind_name}" in version "{api_version}"')
        meta = doc.get("metadata") or {}
        name = meta.get("name")
        if not name:
            raise ApiError(400, "BadRequest", "resource name may not be empty")
        ns = (meta.get("namespace") or namespace) if kind.namespaced else None
        desired = json.loads(json.dumps(doc))
        desired.setdefault("metadata", {})
        if ns:
            desired["metadata"]["namespace"] = ns
        desired["metadata"].setdefault("annotations", {})[LAST_APPLIED] = json.dumps(doc, sort_keys=True)
        current = await self.get_or_none(kind, ns, name)
        if current is None:
            return await self.request("POST", self.path(kind, ns), body=desired)
        previous_text = ((current.get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED)
        previous = json.loads(previous_text) if previous_text else None
        patch = three_way_patch(previous, desired)
        return await self.request("PATCH", self.path(kind, ns, name), body=patch, content_type=MERGE_PATCH)
