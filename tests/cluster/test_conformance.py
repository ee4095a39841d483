"""The emulator held to the real kube-apiserver: the same requests to both, status codes and key fields compared.

The emulator stays the instant, no-Go default of `make demo` and of the emulator tier; this file is what keeps it
honest. Each case sends one request (or a short story of them) to both servers through `conformance.Pair` and
compares what a client reads: the status code, the Status' reason, details and causes, and the fields the case
names, with uids, resourceVersions and timestamps normalised away.

A difference is either fixed in the emulator or listed here, with why it does not matter; each listed difference has
a test that shows both sides' answer, so the list cannot go stale (a fix makes its test fail, and the entry goes).

Known differences (the `test_known_*` tests):

- Namespaces appear on first use in the emulator; the real server refuses an object in a missing namespace (404).
  `make demo` and the emulator tier have no admin to create them, and nothing the operator does depends on it.
- Built-in kinds have no schema in the emulator: it neither prunes nor refuses their unknown fields, applies none of
  their defaults (a Pod's restartPolicy, a container's terminationMessagePath) and none of their validation
  (a RoleBinding's immutable roleRef). Only metadata is checked (names, labels, annotations, ConfigMap keys). The
  operator's children are built by tested code and the cluster tier runs them on the real server.
- Writes to `/status` are not checked against the CRD's status schema (the offline admission, admission.py, judges
  creates and spec writes only); the operator writes status through typed models generated into the same schema.
- Strategic merge patches merge lists whole in the emulator, where the real server merges them by their patch merge
  key (containers by name). The operator sends JSON merge patches only; kubectl sends strategic ones to built-in
  kinds for `annotate`, `label` and client-side `apply`, which touch maps.
- Deletion is not staged: a `Foreground` or `Orphan` delete (and a batch/v1 Job's default, `Orphan`) completes at once
  in the emulator, where the real server answers the object with a `foregroundDeletion`/`orphan` finalizer and its
  garbage collector finishes a moment later. The end state is the same; the operator deletes with `Background`.
- An object whose ownerReferences name no existing object stays in the emulator; the real garbage collector
  removes it. The emulator collects garbage when an owner it knows is deleted.
- A watch from a future resourceVersion is 410 Gone in the emulator (a client that kept one across an emulator
  restart lists again); the real server waits for that version.
- `dryRun` is refused (400) rather than emulated: a dry run that wrote for real would be worse.
- No controllers: no `kube-root-ca.crt` ConfigMap or `default` ServiceAccount appears in a new namespace (the views
  leave them out of lists).
- Wording only, never the code, reason or causes: metadata errors lack the real server's regex hint, and malformed
  selectors, JSON patches that fail and bodies that do not decode are explained in the emulator's words. A
  resourceVersion that is not a number is a 400 in the emulator, a 500 on the real server.
- Discovery: the emulator's built-in kinds come from kmock's bundled discovery (a K3s cluster's, its add-ons' groups
  left out), so it lacks the create-only groups (authentication, authorization), resource.k8s.io and
  storagemigration.k8s.io; an unknown group's path is a JSON Status there, plain text on the real server. Every
  group and kind the operator, kopf and kubectl use is served the same.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from kleinstyle.devcluster import Emulator, admission
from kleinstyle.devcluster.controlplane import RealCluster

from .conformance import (
    APPLY,
    JSON_PATCH,
    MERGE,
    STRATEGIC,
    Pair,
    Reply,
    Server,
    fields,
    names,
    normalised,
    path,
    status_codes,
    status_view,
    wait_for,
)
from .conftest import CRDS

GROUP_VERSION = "kleinstyle.dev/v1alpha1"
# The API groups the operator, kopf, kubectl and the chart use: served alike on both.
USED_GROUPS = (
    "apps",
    "batch",
    "events.k8s.io",
    "rbac.authorization.k8s.io",
    "apiextensions.k8s.io",
    "coordination.k8s.io",
)
# group/version -> the resources of it the operator and kubectl read and write
USED_RESOURCES = {
    "/api/v1": ("configmaps", "secrets", "serviceaccounts", "pods", "pods/log", "pods/status", "events", "namespaces"),
    "/apis/batch/v1": ("jobs", "jobs/status"),
    "/apis/rbac.authorization.k8s.io/v1": ("roles", "rolebindings"),
    "/apis/events.k8s.io/v1": ("events",),
}

_serial = itertools.count()


@pytest.fixture(scope="module")
def servers(crds_applied: RealCluster) -> Iterator[Pair]:
    """The real server with the repository's CRDs, and the emulator with the same CRDs and the offline admission."""
    crds = [yaml.safe_load(crd.read_text(encoding="utf-8")) for crd in sorted(CRDS.glob("*.yaml"))]
    with Emulator(crds, admit=admission.admit) as emulator:
        yield Pair(Server.admin_of(crds_applied), Server("emulator", emulator.url))


@pytest.fixture
def ns(servers: Pair) -> str:
    """A fresh namespace, created on both."""
    name = f"conformance-{next(_serial)}"
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    servers.send("POST", "/api/v1/namespaces", namespace).same(fields("metadata.name", "status.phase"))
    return name


def stylelora(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "StyleLoRA",
        "metadata": {"name": name},
        "spec": {"boardRef": {"name": "bd9"}, **spec},
    }


def configmap(name: str, **metadata: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, **metadata}, "data": {"a": "1"}}


def job(name: str) -> dict[str, Any]:
    container = {"name": "main", "image": "runtime", "command": ["true"]}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"app": "conformance"}},
        "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never", "containers": [container]}}},
    }


def owned_by(reply: Reply) -> list[dict[str, Any]]:
    meta = reply.body["metadata"]
    ref = {"apiVersion": reply.body["apiVersion"], "kind": reply.body["kind"], "name": meta["name"], "uid": meta["uid"]}
    return [ref]


# --- discovery --------------------------------------------------------------------------------------------------------


def _resources(body: Any) -> dict[str, Any]:
    return {
        r["name"]: (r["namespaced"], r["kind"], sorted(r["verbs"]), sorted(r.get("shortNames", ())), r["singularName"])
        for r in body["resources"]
    }


def test_discovery_serves_the_same_groups_and_resources(servers: Pair) -> None:
    servers.send("GET", "/version").same(fields("major", "minor"))
    servers.send("GET", "/api").same(lambda body: body["versions"])

    def preferred(body: Any) -> dict[str, str]:
        found = {g["name"]: g["preferredVersion"]["groupVersion"] for g in body["groups"]}
        return {group: found.get(group) for group in (*USED_GROUPS, "kleinstyle.dev")}

    apis = servers.send("GET", "/apis")
    assert apis.same(preferred)["kleinstyle.dev"] == GROUP_VERSION
    for reply in apis:  # custom groups after every built-in one, as kubectl's resource lookup expects
        assert reply.body["groups"][-1]["name"] == "kleinstyle.dev"
    servers.send("GET", "/apis/kleinstyle.dev").same(lambda body: body["preferredVersion"])
    ours = servers.send("GET", f"/apis/{GROUP_VERSION}").same(_resources)
    assert {"styleloras", "styleloras/status", "styleboards", "generationjobs", "lorafusions"} <= set(ours)

    for group_version, used in USED_RESOURCES.items():
        servers.send("GET", group_version).same(lambda body, used=used: {k: _resources(body).get(k) for k in used})


def test_openapi_v3_lists_and_describes_the_custom_kinds(servers: Pair) -> None:
    def listed(body: Any) -> bool:
        return "apis/kleinstyle.dev/v1alpha1" in body["paths"]

    # The real server publishes a new CRD's OpenAPI a few seconds after it is Established.
    wait_for("the CRDs in /openapi/v3", lambda: listed(servers.real.send("GET", "/openapi/v3").body), seconds=60)
    servers.send("GET", "/openapi/v3").same(listed)

    def schema_of(server: Server) -> Any:
        def fetched() -> Any:  # a hash the server has just replaced redirects: ask the root again
            root = server.send("GET", "/openapi/v3").body
            reply = server.send("GET", root["paths"]["apis/kleinstyle.dev/v1alpha1"]["serverRelativeURL"])
            return reply if reply.status == 200 else None

        return wait_for(f"{server.name}: the group's OpenAPI document", fetched)

    def described(body: Any) -> dict[str, Any]:
        schemas = body["components"]["schemas"]
        return {
            kind: sorted(schemas[f"dev.kleinstyle.v1alpha1.{kind}"]["properties"]["spec"]["properties"])
            for kind in ("StyleBoard", "StyleLoRA", "GenerationJob", "LoRAFusion")
        }

    servers.each(schema_of).same(described)


# --- CRUD -------------------------------------------------------------------------------------------------------------


def test_crud_on_a_custom_resource(servers: Pair, ns: str) -> None:
    forged = stylelora("crud") | {"status": {"phase": "Succeeded"}}
    view = fields("metadata.name", "metadata.namespace", "metadata.generation", "spec", "status")
    created = servers.send("POST", path("StyleLoRA", ns), forged)
    assert created.same(view)["status"] is None, "a create never sets status"
    servers.send("POST", path("StyleLoRA", ns), forged).same(status_view)
    servers.send("GET", path("StyleLoRA", ns, "crud")).same(view)
    servers.send("GET", path("StyleLoRA", ns)).same(names)

    def replace(server: Server, **changes: Any) -> Any:
        current = server.send("GET", path("StyleLoRA", ns, "crud")).body
        current["spec"]["variant"] = "GEM+B"
        current["metadata"] |= changes
        return server.send("PUT", path("StyleLoRA", ns, "crud"), current)

    assert servers.each(replace).same(view)["metadata.generation"] == 2
    servers.each(lambda server: replace(server, resourceVersion=None)).same(status_view)  # PUT needs a version
    servers.each(lambda server: replace(server, resourceVersion="1")).same(status_view)  # ... the current one
    servers.send("DELETE", path("StyleLoRA", ns, "crud")).same(status_view)
    servers.send("GET", path("StyleLoRA", ns, "crud")).same(status_view)


def event(ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "crud"},
        "involvedObject": {"apiVersion": GROUP_VERSION, "kind": "StyleLoRA", "name": "x", "namespace": ns},
        "reason": "RunStarted",
        "message": "Job x-train-0123456789 created",
        "type": "Normal",
        "source": {"component": "kleinstyle-operator"},
        "count": 1,
    }


CORE = {
    "ConfigMap": (configmap("crud"), ("data",)),
    "ServiceAccount": ({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "crud"}}, ()),
    "Role": (
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "crud"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}],
        },
        ("rules",),
    ),
    "RoleBinding": (
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "crud"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "crud"},
            "subjects": [{"kind": "ServiceAccount", "name": "crud"}],
        },
        ("roleRef", "subjects"),
    ),
    "Event": (event, ("involvedObject", "reason", "message", "type", "source", "count")),
    "Job": (
        job("crud"),
        (
            "spec.suspend",
            "spec.completions",
            "spec.parallelism",
            "spec.backoffLimit",
            "spec.completionMode",
            "spec.selector",
            "spec.template.metadata.labels",
            "spec.template.spec.containers.0.name",
            "spec.template.spec.containers.0.image",
        ),
    ),
}


@pytest.mark.parametrize("kind", sorted(CORE))
def test_crud_on_the_core_kinds_the_operator_uses(servers: Pair, ns: str, kind: str) -> None:
    body, keys = CORE[kind]
    body = body(ns) if callable(body) else body
    view = fields("apiVersion", "kind", "metadata.name", "metadata.namespace", "metadata.generation", *keys)
    servers.send("POST", path(kind, ns), body).same(view)
    servers.send("POST", path(kind, ns), body).same(status_view)
    servers.send("GET", path(kind, ns, "crud")).same(view)
    servers.send("GET", path(kind, ns)).same(names)
    patched = servers.send("PATCH", path(kind, ns, "crud"), {"metadata": {"labels": {"a": "b"}}}, content_type=MERGE)
    patched.same(fields("metadata.labels", "metadata.generation"))
    options = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}  # the operator's
    servers.send("DELETE", path(kind, ns, "crud"), options).same(lambda body: normalised(body).get("details"))
    servers.send("GET", path(kind, ns, "crud")).same(status_view)


def test_events_k8s_io_reads_the_core_events(servers: Pair, ns: str) -> None:
    servers.send("POST", path("Event", ns), event(ns))
    servers.send("GET", f"/apis/events.k8s.io/v1/namespaces/{ns}/events/crud").same(
        fields("apiVersion", "kind", "regarding", "reason", "note", "type", "deprecatedSource", "deprecatedCount")
    )


# --- patches ----------------------------------------------------------------------------------------------------------


def test_json_merge_patch(servers: Pair, ns: str) -> None:
    servers.send("POST", path("ConfigMap", ns), configmap("m") | {"data": {"a": "1", "b": "2"}})
    merged = servers.send("PATCH", path("ConfigMap", ns, "m"), {"data": {"a": None, "c": "3"}}, content_type=MERGE)
    assert merged.same(fields("data"))["data"] == {"b": "2", "c": "3"}
    stale = {"metadata": {"resourceVersion": "1"}, "data": {"d": "4"}}
    servers.send("PATCH", path("ConfigMap", ns, "m"), stale, content_type=MERGE).same(status_view)
    servers.send("PATCH", path("ConfigMap", ns, "m"), raw=b"[1]", content_type=MERGE).same(status_codes)
    servers.send("PATCH", path("ConfigMap", ns, "gone"), {"data": {}}, content_type=MERGE).same(status_view)


def test_json_patch_and_its_test_operation(servers: Pair, ns: str) -> None:
    servers.send("POST", path("ConfigMap", ns), configmap("j"))
    ops = [{"op": "add", "path": "/data/b", "value": "2"}, {"op": "remove", "path": "/data/a"}]
    servers.send("PATCH", path("ConfigMap", ns, "j"), ops, content_type=JSON_PATCH).same(fields("data"))
    failed_test = [{"op": "test", "path": "/data/b", "value": "other"}, {"op": "add", "path": "/data/c", "value": "3"}]
    servers.send("PATCH", path("ConfigMap", ns, "j"), failed_test, content_type=JSON_PATCH).same(status_codes)
    missing = [{"op": "remove", "path": "/data/nothing"}]
    servers.send("PATCH", path("ConfigMap", ns, "j"), missing, content_type=JSON_PATCH).same(status_codes)
    servers.send("PATCH", path("ConfigMap", ns, "j"), {"data": {}}, content_type=JSON_PATCH).same(status_codes)
    servers.send("GET", path("ConfigMap", ns, "j")).same(fields("data"))


def test_strategic_merge_patch_on_built_in_kinds_only(servers: Pair, ns: str) -> None:
    servers.send("POST", path("ConfigMap", ns), configmap("s", labels={"a": "1"}))
    patch = {"metadata": {"labels": {"b": "2"}}, "data": {"c": "3"}}
    servers.send("PATCH", path("ConfigMap", ns, "s"), patch, content_type=STRATEGIC).same(
        fields("metadata.labels", "data")
    )
    servers.send("POST", path("StyleLoRA", ns), stylelora("s"))
    # A custom resource has no Go type to read merge keys from: 415, naming the formats it takes.
    servers.send("PATCH", path("StyleLoRA", ns, "s"), {"spec": {}}, content_type=STRATEGIC).same(status_codes)


# --- server-side apply ------------------------------------------------------------------------------------------------


def _owners(body: Any) -> dict[str, Any]:
    """Who owns what after an apply: each manager's operation and fields (their order is the server's business)."""
    entries = body["metadata"].get("managedFields") or ()
    return {e["manager"]: (e["operation"], e.get("subresource"), e["fieldsV1"]) for e in entries}


def test_server_side_apply_conflicts_and_force(servers: Pair, ns: str) -> None:
    url = path("StyleLoRA", ns, "ssa")
    config = yaml.safe_dump(stylelora("ssa", training={"rank": 32})).encode()
    view = fields("metadata.generation", "spec.training")
    created = servers.send("PATCH", f"{url}?fieldManager=alice", raw=config, content_type=APPLY)
    created.same(lambda body: (view(body), _owners(body)))
    assert created.real.status == 201
    again = servers.send("PATCH", f"{url}?fieldManager=alice", raw=config, content_type=APPLY)
    again.same(lambda body: (view(body), _owners(body)))
    for first, second in zip(created, again, strict=True):
        assert first["metadata.resourceVersion"] == second["metadata.resourceVersion"], "a re-apply is a no-op"

    theirs = yaml.safe_dump(stylelora("ssa", training={"rank": 64})).encode()
    conflict = servers.send("PATCH", f"{url}?fieldManager=bob", raw=theirs, content_type=APPLY)
    assert conflict.same(status_view)["causes"] == [("FieldManagerConflict", ".spec.training.rank")]
    # The same value is no conflict: bob shares the field with alice.
    servers.send("PATCH", f"{url}?fieldManager=bob", raw=config, content_type=APPLY).same(_owners)
    forced = servers.send("PATCH", f"{url}?fieldManager=carol&force=true", raw=theirs, content_type=APPLY)
    forced.same(lambda body: (view(body), _owners(body)))
    servers.send("PATCH", f"{url}?fieldManager=alice", raw=config, content_type=APPLY).same(status_view)
    # An update takes what it changed; a later apply conflicting with it names its version and time.
    servers.send("PATCH", f"{url}?fieldManager=kopf", {"spec": {"training": {"rank": 128}}}, content_type=MERGE)
    servers.send("PATCH", f"{url}?fieldManager=carol", raw=theirs, content_type=APPLY).same(status_view)
    servers.send("PATCH", url, raw=config, content_type=APPLY).same(status_view)  # an apply names its manager


# --- the status subresource -------------------------------------------------------------------------------------------


def test_status_subresource_isolates_status_and_spec(servers: Pair, ns: str) -> None:
    servers.send("POST", path("StyleLoRA", ns), stylelora("st"))
    view = fields("metadata.generation", "spec.variant", "status")
    to_status = {"spec": {"variant": "GEM+B"}, "status": {"phase": "Running", "message": "training"}}
    servers.send("PATCH", path("StyleLoRA", ns, "st", "status"), to_status, content_type=MERGE).same(view)
    servers.send("PATCH", path("StyleLoRA", ns, "st"), {"status": {"phase": "Failed"}}, content_type=MERGE).same(view)
    labelled = {"metadata": {"labels": {"a": "b"}}}
    assert (
        servers.send("PATCH", path("StyleLoRA", ns, "st"), labelled, content_type=MERGE).same(view)[
            "metadata.generation"
        ]
        == 1
    ), "metadata is not spec"
    respec = {"spec": {"variant": "GEM+D"}}
    assert (
        servers.send("PATCH", path("StyleLoRA", ns, "st"), respec, content_type=MERGE).same(view)["metadata.generation"]
        == 2
    )

    def put_status(server: Server) -> Any:
        current = server.send("GET", path("StyleLoRA", ns, "st")).body
        current["status"], current["spec"]["variant"] = {"phase": "Succeeded"}, "auto"
        return server.send("PUT", path("StyleLoRA", ns, "st", "status"), current)

    servers.each(put_status).same(view)
    servers.send("GET", path("StyleLoRA", ns, "st", "status")).same(view)
    servers.send("GET", path("StyleLoRA", ns, "st", "scale")).same(status_view)  # no such subresource
    servers.send("GET", path("ConfigMap", ns, "none", "status")).same(status_codes)


# --- selectors --------------------------------------------------------------------------------------------------------


def test_label_and_field_selectors_on_lists(servers: Pair, ns: str) -> None:
    for name, labels in (("a", {"app": "x", "tier": "gpu"}), ("b", {"app": "x", "tier": "cpu"}), ("c", {"app": "y"})):
        servers.send("POST", path("ConfigMap", ns), configmap(name, labels=labels))
    servers.send("POST", path("StyleLoRA", ns), stylelora("a"))
    for selector in ("app=x", "app==x,tier!=gpu", "tier in (cpu,gpu)", "app notin (x)", "tier", "!tier"):
        servers.send("GET", path("ConfigMap", ns, query=f"labelSelector={quote(selector)}")).same(names)
    for selector in ("metadata.name=b", "metadata.name!=b", f"metadata.namespace={ns}"):
        servers.send("GET", path("ConfigMap", ns, query=f"fieldSelector={selector}")).same(names)
    servers.send("GET", path("StyleLoRA", ns, query="fieldSelector=metadata.name=a")).same(names)
    # Only the fields a kind's registry indexes: anything else is refused, in the registry's words.
    servers.send("GET", path("ConfigMap", ns, query="fieldSelector=data.a=1")).same(status_view)
    servers.send("GET", path("StyleLoRA", ns, query="fieldSelector=status.phase=Running")).same(status_view)
    servers.send("GET", path("Job", ns, query="fieldSelector=spec.suspend=true")).same(status_view)
    servers.send("GET", path("Pod", ns, query="fieldSelector=spec.nodeName=node-a")).same(names)
    servers.send("GET", path("ConfigMap", ns, query="labelSelector=app=(x")).same(status_codes)


# --- watches ----------------------------------------------------------------------------------------------------------


def _story(body: Any) -> list[tuple[Any, ...]]:
    return [(e["type"], e["object"]["metadata"]["name"], (e["object"].get("spec") or {}).get("variant")) for e in body]


def test_watch_from_a_resource_version_sends_every_change_in_order(servers: Pair, ns: str) -> None:
    def story(server: Server) -> Any:
        since = server.send("POST", path("StyleLoRA", ns), stylelora("w")).body["metadata"]["resourceVersion"]
        server.send("PATCH", path("StyleLoRA", ns, "w"), {"spec": {"variant": "GEM+B"}}, content_type=MERGE)
        server.send("PATCH", path("StyleLoRA", ns, "w", "status"), {"status": {"phase": "Running"}}, content_type=MERGE)
        server.send("POST", path("StyleLoRA", ns), stylelora("w2"))
        server.send("DELETE", path("StyleLoRA", ns, "w"))
        return server.watch(path("StyleLoRA", ns, query=f"resourceVersion={since}"), events=4, seconds=2)

    assert servers.each(story).same(_story) == [
        ("MODIFIED", "w", "GEM+B"),
        ("MODIFIED", "w", "GEM+B"),
        ("ADDED", "w2", "auto"),
        ("DELETED", "w", "GEM+B"),
    ]
    # From no version: the objects there now, as ADDED; a selector that matches none: nothing.
    assert servers.watch(path("StyleLoRA", ns), events=1).same(_story) == [("ADDED", "w2", "auto")]
    assert (
        servers.watch(path("StyleLoRA", ns, query="labelSelector=none=here"), events=1, seconds=0.5).same(_story) == []
    )


def test_watch_from_too_old_a_resource_version_is_410_gone(servers: Pair, ns: str) -> None:
    # Each server's history of a custom kind starts with its CRD: version 1 is older than either reaches back (no
    # etcd compaction needed; the real server's watch cache for the kind began after the CRD was established).
    gone = servers.watch(path("StyleLoRA", ns, query="resourceVersion=1"), events=1, seconds=5)

    def error(body: Any) -> Any:
        [event] = body
        view = status_view(event["object"])
        return event["type"], view | {"message": re.sub(r"\d+", "N", view["message"])}

    kind, status = gone.same(error)
    assert (kind, status["code"], status["reason"], status["message"]) == (
        "ERROR",
        410,
        "Expired",
        "too old resource version: N (N)",
    )


# --- errors -----------------------------------------------------------------------------------------------------------


def test_errors_are_the_api_servers_statuses(servers: Pair, ns: str) -> None:
    servers.send("GET", path("StyleLoRA", ns, "absent")).same(status_view)
    servers.send("GET", path("ConfigMap", ns, "absent")).same(status_view)
    servers.send("POST", path("StyleLoRA", ns), stylelora("e"))
    servers.send("POST", path("StyleLoRA", ns), stylelora("e")).same(status_view)
    servers.send("POST", path("StyleLoRA", ns), stylelora("bad", training={"rank": 48})).same(status_view)
    # Several schema errors: the same causes, listed in another order (a known difference of the offline admission).
    invalid = stylelora("bad", training={"rank": 48, "learningRate": 0})
    servers.send("POST", path("StyleLoRA", ns), invalid).same(status_codes)
    servers.send("POST", path("StyleLoRA", ns, query="fieldValidation=Strict"), stylelora("x", bogus=1)).same(
        status_view
    )
    servers.send("POST", path("ConfigMap", ns), configmap("Bad_Name")).same(status_codes)
    servers.send("POST", path("ConfigMap", ns), configmap("l", labels={"a": "b c"})).same(status_codes)
    servers.send("POST", path("ConfigMap", ns), {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}).same(
        status_view
    )
    for malformed in (b'{"apiVersion": "v1", "kind": ', b"[1, 2]"):
        servers.send("POST", path("ConfigMap", ns), raw=malformed).same(status_codes)
        servers.send("POST", path("StyleLoRA", ns), raw=malformed).same(status_codes)
    servers.send("PATCH", path("ConfigMap", ns, "absent"), raw=b'{"data": ', content_type=MERGE).same(status_codes)
    # The body must be of the kind the URL names.
    servers.send("POST", path("StyleLoRA", ns), stylelora("k") | {"kind": "StyleBoard"}).same(status_view)
    servers.send("POST", path("StyleLoRA", ns), stylelora("k") | {"apiVersion": "kleinstyle.dev/v1"}).same(status_view)
    servers.send("POST", path("ConfigMap", ns), configmap("k") | {"kind": "Secret"}).same(status_codes)
    elsewhere = configmap("k", namespace="elsewhere")
    servers.send("POST", path("ConfigMap", ns), elsewhere).same(status_view)
    servers.send("PUT", path("StyleLoRA", ns, "other"), stylelora("e")).same(status_view)
    renamed = {"metadata": {"name": "renamed"}}
    servers.send("PATCH", path("StyleLoRA", ns, "e"), renamed, content_type=MERGE).same(status_view)


# --- deletion ---------------------------------------------------------------------------------------------------------


def test_finalizers_hold_deletion_until_removed(servers: Pair, ns: str) -> None:
    view = fields("metadata.deletionTimestamp", "metadata.finalizers", "metadata.generation")
    held = stylelora("f") | {"metadata": {"name": "f", "finalizers": ["example.dev/hold"]}}
    servers.send("POST", path("StyleLoRA", ns), held)
    marked = servers.send("DELETE", path("StyleLoRA", ns, "f")).same(view)
    assert marked["metadata.deletionTimestamp"] and marked["metadata.generation"] == 2
    servers.send("GET", path("StyleLoRA", ns, "f")).same(view)
    servers.send("DELETE", path("StyleLoRA", ns, "f")).same(view)
    more = {"metadata": {"finalizers": ["example.dev/hold", "example.dev/late"]}}
    servers.send("PATCH", path("StyleLoRA", ns, "f"), more, content_type=MERGE).same(status_view)
    servers.send("PATCH", path("StyleLoRA", ns, "f"), {"spec": {"variant": "GEM+B"}}, content_type=MERGE).same(view)
    servers.send("PATCH", path("StyleLoRA", ns, "f"), {"metadata": {"finalizers": None}}, content_type=MERGE).same(
        fields("metadata.deletionTimestamp", "metadata.finalizers")
    )
    servers.send("GET", path("StyleLoRA", ns, "f")).same(status_view)


def test_deleting_an_owner_collects_its_dependents(servers: Pair, ns: str) -> None:
    # The owner is a built-in kind: the real garbage collector learns a new CRD's kind only at its next discovery
    # sync (30 s), and the session's CRDs may be seconds old here.
    def cascade(server: Server, policy: str) -> tuple[int, Any]:
        owner = server.send("POST", path("ConfigMap", ns), configmap(f"owner-{policy.lower()}"))
        name = f"child-{policy.lower()}"
        server.send("POST", path("ConfigMap", ns), configmap(name, ownerReferences=owned_by(owner)))
        options = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": policy}
        server.send("DELETE", path("ConfigMap", ns, owner["metadata.name"]), options)

        def settled() -> Any:  # the real garbage collector acts a moment later
            child = server.send("GET", path("ConfigMap", ns, name))
            owned = child.status == 200 and child["metadata.ownerReferences"]
            return (child.status, child["metadata.ownerReferences"]) if not owned else None

        return wait_for(f"{server.name}: {policy} deletion of the owner", settled)

    assert [cascade(server, "Background") for server in servers] == [(404, None)] * 2
    assert [cascade(server, "Orphan") for server in servers] == [(200, None)] * 2


# --- known differences ------------------------------------------------------------------------------------------------


def test_known_namespaces_appear_on_first_use_in_the_emulator(servers: Pair) -> None:
    answers = servers.send("POST", path("ConfigMap", "conformance-never-created"), configmap("c"))
    assert (answers.real.status, answers.emulator.status) == (404, 201)


def test_known_built_in_kinds_have_no_schema_in_the_emulator(servers: Pair, ns: str) -> None:
    unknown = servers.send("POST", path("ConfigMap", ns, query="fieldValidation=Strict"), configmap("u") | {"x": 1})
    assert (unknown.real.status, unknown.emulator.status) == (400, 201)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}}
    defaults = servers.send("POST", path("Pod", ns), pod)  # (no image: the real server refuses it)
    assert (defaults.real.status, defaults.emulator.status) == (422, 201)
    binding = CORE["RoleBinding"][0]
    servers.send("POST", path("RoleBinding", ns), binding)
    moved = {"roleRef": {"name": "another"}}
    immutable = servers.send("PATCH", path("RoleBinding", ns, "crud"), moved, content_type=MERGE)
    assert (immutable.real.status, immutable.emulator.status) == (422, 200)


def test_known_status_writes_are_not_checked_against_the_status_schema(servers: Pair, ns: str) -> None:
    servers.send("POST", path("StyleLoRA", ns), stylelora("s"))
    wrong = {"status": {"phase": 5}}
    answers = servers.send("PATCH", path("StyleLoRA", ns, "s", "status"), wrong, content_type=MERGE)
    assert (answers.real.status, answers.emulator.status) == (422, 200)


def test_known_strategic_merge_patches_merge_lists_whole(servers: Pair, ns: str) -> None:
    containers = [{"name": "a", "image": "one"}, {"name": "b", "image": "two"}]
    servers.send(
        "POST",
        path("Pod", ns),
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": containers}},
    )
    patch = {"spec": {"containers": [{"name": "b", "image": "three"}]}}
    answers = servers.send("PATCH", path("Pod", ns, "p"), patch, content_type=STRATEGIC)
    images = [[c["image"] for c in reply["spec.containers"]] for reply in answers]
    assert images == [["one", "three"], ["three"]]


def test_known_deletion_is_not_staged_in_the_emulator(servers: Pair, ns: str) -> None:
    servers.send("POST", path("Job", ns), job("j"))
    answers = servers.send("DELETE", path("Job", ns, "j"))  # batch/v1 defaults to orphaning the Job's pods
    assert (answers.real["metadata.finalizers"], answers.emulator["kind"]) == (["orphan"], "Status")
    for server in servers:
        wait_for(
            f"{server.name}: the Job goes", lambda server=server: server.send("GET", path("Job", ns, "j")).status == 404
        )


def test_known_dangling_owner_references_stay_in_the_emulator(servers: Pair, ns: str) -> None:
    ghost = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "ghost", "uid": "00000000-0000-4000-8000-000000000000"}]
    servers.send("POST", path("ConfigMap", ns), configmap("dangling", ownerReferences=ghost))
    wait_for(
        "the real garbage collector", lambda: servers.real.send("GET", path("ConfigMap", ns, "dangling")).status == 404
    )
    assert servers.emulator.send("GET", path("ConfigMap", ns, "dangling")).status == 200


def test_known_a_watch_from_the_future_is_gone_in_the_emulator(servers: Pair, ns: str) -> None:
    answers = servers.watch(path("ConfigMap", ns, query="resourceVersion=999999999"), events=1, seconds=1)
    assert answers.real.body == []
    assert [e["object"]["code"] for e in answers.emulator.body] == [410]


def test_known_dry_run_is_refused_by_the_emulator(servers: Pair, ns: str) -> None:
    answers = servers.send("POST", path("ConfigMap", ns, query="dryRun=All"), configmap("dry"))
    assert (answers.real.status, answers.emulator.status) == (201, 400)
    servers.send("GET", path("ConfigMap", ns, "dry")).same(status_view)  # nothing was written


def test_known_no_controllers_fill_a_namespace_in_the_emulator(servers: Pair, ns: str) -> None:
    wait_for(
        "kube-root-ca.crt", lambda: servers.real.send("GET", path("ConfigMap", ns, "kube-root-ca.crt")).status == 200
    )
    assert servers.emulator.send("GET", path("ConfigMap", ns, "kube-root-ca.crt")).status == 404


def test_known_wording_and_a_non_numeric_resource_version(servers: Pair, ns: str) -> None:
    answers = servers.send("POST", path("ConfigMap", ns), configmap("Bad_Name"))
    assert "regex used for validation" in answers.real.body["message"]
    assert "regex used for validation" not in answers.emulator.body["message"]
    version = servers.watch(path("ConfigMap", ns, query="resourceVersion=abc"), events=1, seconds=1)
    assert (version.real.status, version.emulator.status) == (500, 400)


def test_known_discovery_lacks_the_groups_no_operator_uses(servers: Pair) -> None:
    served = [{g["name"] for g in reply.body["groups"]} for reply in servers.send("GET", "/apis")]
    assert served[0] - served[1] == {
        "authentication.k8s.io",
        "authorization.k8s.io",
        "resource.k8s.io",
        "storagemigration.k8s.io",
    }
    assert served[1] <= served[0]
    unknown = servers.send("GET", "/apis/nothing.example/v1/namespaces/default/things")
    assert (unknown.real.status, unknown.emulator.status) == (404, 404)
    assert isinstance(unknown.real.body, str) and unknown.emulator.body["kind"] == "Status"
