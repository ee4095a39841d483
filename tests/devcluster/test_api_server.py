"""The emulator answers what kubectl and client-go ask as a real API server does: discovery, OpenAPI, Tables,
protobuf bodies, watch framing, pod logs, Job defaults, events.k8s.io, the body limit, server-side apply's field
managers. Raw HTTP here; tests/devcluster/test_kubectl.py drives the same with kubectl itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kleinstyle.devcluster import Emulator, KubeClient

from .conftest import crd

pytestmark = pytest.mark.emulator

# `kubectl create secret generic s1 --from-literal=a=b --type=foo/bar` and `kubectl create namespace n1`, as
# kubectl 1.37 sends them (protobuf).
SECRET_PB = bytes.fromhex(
    "6b3873000a0c0a027631120653656372657412250a120a02733112001a0022002a0032003800420012060a01611201621a07666f6f2f"
    "6261721a002200"
)
NAMESPACE_PB = bytes.fromhex(
    "6b3873000a0f0a02763112094e616d657370616365121a0a120a026e3112001a0022002a0032003800420012001a020a001a002200"
)
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"


def printed_crd() -> dict[str, Any]:
    """The test kind with printer columns and a list map, as a kleinstyle CRD has them."""
    doc = crd()
    version = doc["spec"]["versions"][0]
    version["additionalPrinterColumns"] = [
        {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    version["schema"]["openAPIV3Schema"] = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "description": "What the widget is.",
                "properties": {
                    "size": {"type": "integer", "description": "How big."},
                    "parts": {
                        "type": "array",
                        "x-kubernetes-list-type": "map",
                        "x-kubernetes-list-map-keys": ["name"],
                        "items": {
                            "type": "object",
                            "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
                        },
                    },
                },
            },
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }
    doc["spec"]["names"]["categories"] = ["toys"]
    return doc


@pytest.fixture
async def server(tmp_path: Path):
    async with Emulator([printed_crd()], logs_dir=tmp_path / "logs") as api:
        yield api


async def call(
    api: Emulator, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    sent = {"Content-Type": "application/json", **(headers or {})}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, api.url + path, data=data, headers=sent) as r,
    ):
        text = await r.text()
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            payload = text
        return r.status, dict(r.headers), payload


WIDGETS = "/apis/example.dev/v1/namespaces/default/widgets"


def widget(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}


async def test_discovery_names_the_core_group_v1_and_keeps_short_names_off_subresources(server: Emulator):
    _, _, core = await call(server, "GET", "/api/v1")
    assert core["groupVersion"] == "v1"
    names = {r["name"]: r for r in core["resources"]}
    assert {"configmaps", "secrets", "pods", "pods/log", "namespaces"} <= set(names)
    assert names["pods/log"]["verbs"] == ["get"] and "shortNames" not in names["pods/log"]
    _, _, groups = await call(server, "GET", "/apis")
    order = [g["name"] for g in groups["groups"]]
    assert order.index("batch") < order.index("example.dev")  # built-in groups first, custom after
    _, _, widgets = await call(server, "GET", "/apis/example.dev/v1")
    by_name = {r["name"]: r for r in widgets["resources"]}
    assert by_name["widgets"]["shortNames"] == ["wd"] and by_name["widgets"]["categories"] == ["toys"]
    assert "shortNames" not in by_name["widgets/status"] and by_name["widgets/status"]["verbs"] == [
        "get",
        "patch",
        "update",
    ]
    status, _, missing = await call(server, "GET", "/apis/nothing.dev/v1")
    assert status == 404 and missing["kind"] == "Status"


async def test_openapi_v3_describes_custom_kinds_and_offers_server_side_field_validation(server: Emulator):
    _, _, root = await call(server, "GET", "/openapi/v3")
    url = root["paths"]["apis/example.dev/v1"]["serverRelativeURL"]
    assert url.startswith("/openapi/v3/apis/example.dev/v1?hash=")
    _, _, doc = await call(server, "GET", url)
    schema = doc["components"]["schemas"]["dev.example.v1.Widget"]
    assert schema["x-kubernetes-group-version-kind"] == [{"group": "example.dev", "version": "v1", "kind": "Widget"}]
    assert schema["properties"]["spec"]["properties"]["size"]["description"] == "How big."
    patch = doc["paths"]["/apis/example.dev/v1/namespaces/{namespace}/widgets/{name}"]["patch"]
    assert "fieldValidation" in [p["name"] for p in patch["parameters"]]
    _, _, v2 = await call(server, "GET", "/openapi/v2")
    assert v2["swagger"] == "2.0" and "dev.example.v1.Widget" in v2["definitions"]


async def test_tables_print_the_crds_columns_and_built_in_printers(server: Emulator, new_widget):
    await call(server, "POST", WIDGETS, widget("w1", size=3))
    _, _, table = await call(server, "GET", WIDGETS, headers={"Accept": TABLE})
    assert table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Size", "Age"]
    assert table["rows"][0]["cells"][:2] == ["w1", 3] and table["rows"][0]["cells"][2].endswith("s")
    assert table["rows"][0]["object"]["kind"] == "PartialObjectMetadata"
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "v"}}
    await call(server, "POST", "/api/v1/namespaces/default/secrets", secret)
    _, _, secrets = await call(server, "GET", "/api/v1/namespaces/default/secrets", headers={"Accept": TABLE})
    assert [c["name"] for c in secrets["columnDefinitions"]] == ["Name", "Type", "Data", "Age"]
    assert secrets["rows"][0]["cells"][:3] == ["s", "Opaque", 1]
    _, _, plain = await call(server, "GET", WIDGETS)  # without asking: the list itself
    assert plain["kind"] == "WidgetList"


async def test_watch_streams_json_lines(server: Emulator):
    await call(server, "POST", WIDGETS, widget("w1", size=1))
    async with aiohttp.ClientSession() as session:
        url = f"{server.url}{WIDGETS}?watch=true&timeoutSeconds=1"
        async with session.get(url) as response:
            assert response.headers["Content-Type"].startswith("application/json")
            lines = (await response.read()).splitlines()
    events = [json.loads(line) for line in lines if line]
    assert events[0]["type"] == "ADDED" and events[0]["object"]["metadata"]["name"] == "w1"


async def test_kubectls_protobuf_creates_are_read(server: Emulator):
    pb = {"Content-Type": "application/vnd.kubernetes.protobuf", "Accept": "application/json"}
    status, _, secret = await call(server, "POST", "/api/v1/namespaces/default/secrets", SECRET_PB, headers=pb)
    assert status == 201 and (secret["metadata"]["name"], secret["type"], secret["data"]) == (
        "s1",
        "foo/bar",
        {"a": "Yg=="},
    )
    status, _, namespace = await call(server, "POST", "/api/v1/namespaces", NAMESPACE_PB, headers=pb)
    assert status == 201 and namespace["metadata"]["name"] == "n1"


async def test_jobs_get_their_selector_and_pods_serve_their_logs(server: Emulator, tmp_path: Path):
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "j"},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}},
    }
    _, _, created = await call(server, "POST", "/apis/batch/v1/namespaces/default/jobs", job)
    uid = created["metadata"]["uid"]
    assert created["spec"]["selector"] == {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    assert created["spec"]["template"]["metadata"]["labels"]["job-name"] == "j"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "j-abc"}, "spec": job["spec"]["template"]["spec"]}
    await call(server, "POST", "/api/v1/namespaces/default/pods", pod)
    (tmp_path / "logs" / "default").mkdir(parents=True)
    (tmp_path / "logs" / "default" / "j-abc.log").write_text("one\ntwo\nthree\n")
    status, headers, text = await call(server, "GET", "/api/v1/namespaces/default/pods/j-abc/log?tailLines=2")
    assert (status, text) == (200, "two\nthree\n") and headers["Content-Type"].startswith("text/plain")
    status, _, _ = await call(server, "GET", "/api/v1/namespaces/default/pods/nope/log")
    assert status == 404


async def test_events_k8s_io_shows_the_core_events(server: Emulator):
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "e1"},
        "involvedObject": {"kind": "Widget", "name": "w1", "namespace": "default"},
        "reason": "Done",
        "message": "it is done",
        "type": "Normal",
        "source": {"component": "kopf"},
        "count": 2,
    }
    await call(server, "POST", "/api/v1/namespaces/default/events", event)
    _, _, listed = await call(server, "GET", "/apis/events.k8s.io/v1/namespaces/default/events")
    (newer,) = listed["items"]
    assert (newer["apiVersion"], newer["note"], newer["regarding"]["name"]) == ("events.k8s.io/v1", "it is done", "w1")
    assert (newer["reportingController"], newer["deprecatedCount"]) == ("kopf", 2)


async def test_a_body_over_the_limit_gets_the_api_servers_status(server: Emulator):
    huge = widget("big", blob="x" * (3 * 1024 * 1024))
    status, _, answer = await call(server, "POST", WIDGETS, huge)
    assert status == 413 and answer["reason"] == "RequestEntityTooLarge" and "3145728" in answer["message"]


async def test_server_side_apply_tracks_managers_and_refuses_conflicts(server: Emulator):
    apply = {"Content-Type": "application/apply-patch+yaml"}
    config = {**widget("w", size=1, parts=[{"name": "a", "n": 1}])}
    status, _, created = await call(server, "PATCH", f"{WIDGETS}/w?fieldManager=alice", config, headers=apply)
    assert status == 201 or status == 200
    assert [(m["manager"], m["operation"]) for m in created["metadata"]["managedFields"]] == [("alice", "Apply")]
    # Bob applies another list item: list maps merge by key, both keep theirs.
    bob = widget("w", parts=[{"name": "b", "n": 2}])
    _, _, merged = await call(server, "PATCH", f"{WIDGETS}/w?fieldManager=bob", bob, headers=apply)
    assert [p["name"] for p in merged["spec"]["parts"]] == ["a", "b"] and merged["spec"]["size"] == 1
    # Bob changing Alice's field is a conflict naming it, unless forced (his config keeps his item: what an
    # apply leaves out of its config is no longer its own).
    status, _, refused = await call(
        server, "PATCH", f"{WIDGETS}/w?fieldManager=bob", widget("w", size=2), headers=apply
    )
    assert status == 409 and refused["details"]["causes"][0]["field"] == ".spec.size"
    assert 'conflict with "alice"' in refused["message"]
    status, _, forced = await call(
        server,
        "PATCH",
        f"{WIDGETS}/w?fieldManager=bob&force=true",
        {**bob, "spec": {**bob["spec"], "size": 2}},
        headers=apply,
    )
    assert status == 200 and forced["spec"]["size"] == 2
    # Alice drops her list item from her config: it goes; Bob's stays.
    _, _, dropped = await call(server, "PATCH", f"{WIDGETS}/w?fieldManager=alice", widget("w"), headers=apply)
    assert [p["name"] for p in dropped["spec"]["parts"]] == ["b"]
    # A plain update is recorded as an Update by its manager.
    _, _, patched = await call(
        server,
        "PATCH",
        f"{WIDGETS}/w?fieldManager=carol",
        {"metadata": {"labels": {"team": "a"}}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    carol = next(m for m in patched["metadata"]["managedFields"] if m["manager"] == "carol")
    assert carol["operation"] == "Update" and carol["fieldsV1"] == {"f:metadata": {"f:labels": {"f:team": {}}}}


async def test_the_dev_client_still_reads_plain_json(server: Emulator):
    async with KubeClient(server.url, server.kinds) as client:
        await client.apply(widget("w2", size=5), namespace="default")
        assert (await client.get("widgets", "default", "w2"))["spec"]["size"] == 5
