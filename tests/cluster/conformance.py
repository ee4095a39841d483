"""The conformance harness: one HTTP request sent to the API emulator and to the real kube-apiserver, both answers
kept side by side.

The emulator runs in-process with the repository's CRDs and the offline admission, as `make demo` runs it; the real
server is `RealCluster` with the same CRDs applied, reached as its admin. `Replies.same(view)` asserts that both
answered the same status code and that `view` of both bodies is equal; `normalised` takes out what differs between
any two servers by nature (uids, resourceVersions, timestamps, managedFields times), and the views below pick the
fields a client reads.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kleinstyle.devcluster.controlplane import RealCluster

from .rbac import decode_body

JSON = "application/json"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"

UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
# Keys whose values two servers never share, whatever the object.
VOLATILE = ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp", "time")

# kind -> (URL prefix, plural): where the cases' objects live.
RESOURCES = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Secret": ("/api/v1", "secrets"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Pod": ("/api/v1", "pods"),
    "Event": ("/api/v1", "events"),
    "Job": ("/apis/batch/v1", "jobs"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "StyleBoard": ("/apis/kleinstyle.dev/v1alpha1", "styleboards"),
    "StyleLoRA": ("/apis/kleinstyle.dev/v1alpha1", "styleloras"),
}


def path(kind: str, namespace: str, name: str = "", subresource: str = "", query: str = "") -> str:
    prefix, plural = RESOURCES[kind]
    tail = "/".join(part for part in (name, subresource) if part)
    return f"{prefix}/namespaces/{namespace}/{plural}" + (f"/{tail}" if tail else "") + (f"?{query}" if query else "")


def normalised(value: Any) -> Any:
    """`value` with uids, resourceVersions and timestamps replaced by placeholders, also inside strings."""
    if isinstance(value, dict):
        return {k: f"<{k}>" if k in VOLATILE and v is not None else normalised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalised(item) for item in value]
    if isinstance(value, str):
        return TIMESTAMP.sub("<time>", UID.sub("<uid>", value))
    return value


def dig(value: Any, dotted: str) -> Any:
    """The value at a dotted path (`metadata.labels`, `spec.containers.0.image`); None where it leads nowhere."""
    for step in dotted.split("."):
        if isinstance(value, list) and step.isdigit():
            value = value[int(step)] if int(step) < len(value) else None
        elif isinstance(value, dict):
            value = value.get(step)
        else:
            return None
    return value


def fields(*dotted: str) -> Callable[[Any], dict[str, Any]]:
    """A view of these paths of the normalised body."""
    return lambda body: {key: dig(normalised(body), key) for key in dotted}


def status_view(body: Any, *, message: bool = True) -> dict[str, Any]:
    """What a client reads of a Status: code, reason, the details naming the object, each cause's reason and field
    (a set: the real server may report one twice), and the message unless `message` is off."""
    if not isinstance(body, dict) or body.get("kind") != "Status":
        return {"not a Status": normalised(body)}
    details = body.get("details") or {}
    view = {
        "code": body.get("code"),
        "status": body.get("status"),
        "reason": body.get("reason"),
        "details": {k: details.get(k) for k in ("name", "group", "kind") if details.get(k)},
        "causes": sorted({(c.get("reason"), c.get("field")) for c in details.get("causes") or ()}),
    }
    if message:
        view["message"] = normalised(body.get("message"))
    return view


def status_codes(body: Any) -> dict[str, Any]:
    """A Status without its message: for refusals whose wording differs (see the known differences)."""
    return status_view(body, message=False)


def names(body: Any) -> list[str]:
    """The names in a list, the controllers' own objects (kube-root-ca.crt, the default ServiceAccount) left out."""
    found = [item["metadata"]["name"] for item in body.get("items") or ()]
    return sorted(name for name in found if name not in ("kube-root-ca.crt", "default"))


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any

    def __getitem__(self, dotted: str) -> Any:
        return dig(self.body, dotted)


@dataclass(frozen=True)
class Replies:
    """The real server's reply and the emulator's to one request."""

    real: Reply
    emulator: Reply

    def __iter__(self) -> Iterator[Reply]:
        return iter((self.real, self.emulator))

    def same(self, view: Callable[[Any], Any] = normalised) -> Any:
        """Assert equal status codes and equal views of both bodies; return the view."""
        seen = (view(self.real.body), view(self.emulator.body))
        assert (self.real.status, seen[0]) == (self.emulator.status, seen[1]), (
            f"the real server and the emulator differ:\n  real     {self.real.status} {seen[0]}\n"
            f"  emulator {self.emulator.status} {seen[1]}"
        )
        return seen[0]


class Server:
    """One API server over HTTP: plain for the emulator, TLS with the admin's client certificate for the real one."""

    def __init__(self, name: str, url: str, context: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.url = urllib.parse.urlsplit(url)
        self.context = context

    @classmethod
    def admin_of(cls, cluster: RealCluster) -> Server:
        context = ssl.create_default_context(cafile=str(cluster.ca_file))
        context.load_cert_chain(str(cluster.admin_cert_file), str(cluster.admin_key_file))
        return cls("real", cluster.server, context)

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        host, port = self.url.hostname or "127.0.0.1", self.url.port
        if self.url.scheme == "https":
            return http.client.HTTPSConnection(host, port, context=self.context, timeout=timeout)
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def send(
        self, method: str, url: str, body: Any = None, *, content_type: str = JSON, raw: bytes | None = None
    ) -> Reply:
        """One request; `raw` is sent as it is (a malformed body). A 429 (a new CRD's storage still starting on the
        real server) is retried, as clients do, for up to ten seconds."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        headers = {"Accept": JSON} | ({"Content-Type": content_type} if data is not None else {})
        deadline = time.monotonic() + 10
        while True:
            connection = self._connection(30)
            try:
                connection.request(method, url, body=data, headers=headers)
                response = connection.getresponse()
                reply = Reply(response.status, decode_body(response.read()))
            finally:
                connection.close()
            if reply.status != 429 or time.monotonic() > deadline:
                return reply
            time.sleep(0.2)

    def watch(self, url: str, *, events: int, seconds: float) -> Reply:
        """A watch: its first `events` events (fewer when `seconds` pass first) as a list, or the refusal."""
        separator = "&" if "?" in url else "?"
        deadline = time.monotonic() + 10
        while True:
            connection = self._connection(seconds)
            try:
                connection.request("GET", f"{url}{separator}watch=true", headers={"Accept": JSON})
                response = connection.getresponse()
                if response.status != 200:
                    reply = Reply(response.status, decode_body(response.read()))
                else:
                    reply = Reply(200, _read_events(response, events))
            finally:
                connection.close()
            if reply.status != 429 or time.monotonic() > deadline:
                return reply
            time.sleep(0.2)


def _read_events(response: http.client.HTTPResponse, count: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    try:
        while len(found) < count and (line := response.readline()):
            if line.strip():
                found.append(json.loads(line))
    except TimeoutError:
        pass  # the stream stayed quiet: what came so far is the answer
    return found


class Pair:
    """The real server and the emulator, asked the same."""

    def __init__(self, real: Server, emulator: Server) -> None:
        self.real = real
        self.emulator = emulator

    def __iter__(self) -> Iterator[Server]:
        return iter((self.real, self.emulator))

    def send(self, method: str, url: str, body: Any = None, **options: Any) -> Replies:
        return Replies(*(server.send(method, url, body, **options) for server in self))

    def watch(self, url: str, *, events: int, seconds: float = 2.0) -> Replies:
        return Replies(*(server.watch(url, events=events, seconds=seconds) for server in self))

    def each(self, request: Callable[[Server], Reply]) -> Replies:
        """A request that differs per server (a resourceVersion each server gave): `request(server)` on both."""
        return Replies(*(request(server) for server in self))


def wait_for(what: str, probe: Callable[[], Any], seconds: float = 15.0) -> Any:
    """Poll `probe` until it returns something true (the real garbage collector and controllers act a moment after a
    request); fail naming `what`."""
    deadline = time.monotonic() + seconds
    while not (result := probe()):
        assert time.monotonic() < deadline, f"{what}: not within {seconds:.0f}s"
        time.sleep(0.1)
    return result
