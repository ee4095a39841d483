"""What tests/cluster/test_conformance.py showed the emulator answered differently from kube-apiserver 1.37, pinned in
the emulator tier too: the conformance test needs the real control plane, and these must hold without it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
import yaml
from kleinstyle.devcluster import Emulator

pytestmark = pytest.mark.emulator

WIDGETS = "/apis/example.dev/v1/namespaces/default/widgets"
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
APPLY = "application/apply-patch+yaml"


async def call(api: Emulator, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, api.url + path, data=data, headers={"Content-Type": content_type}) as response,
    ):
        return response.status, json.loads(await response.text() or "null")


async def test_deletes_answer_a_status_unless_held_or_a_kind_that_returns_the_object(api: Emulator, new_widget) -> None:
    await call(api, "POST", WIDGETS, new_widget("w"))
    status, gone = await call(api, "DELETE", f"{WIDGETS}/w")
    assert (status, gone["kind"], gone["status"]) == (200, "Status", "Success")
    assert {k: gone["details"][k] for k in ("name", "group", "kind")} == {
        "name": "w",
        "group": "example.dev",
        "kind": "widgets",
    }
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa"}}
    await call(api, "POST", "/api/v1/namespaces/default/serviceaccounts", account)
    _, answered = await call(api, "DELETE", "/api/v1/namespaces/default/serviceaccounts/sa")
    assert answered["kind"] == "ServiceAccount"
    status, missing = await call(api, "GET", f"{WIDGETS}/w")
    assert (status, missing["details"]) == (404, {"name": "w", "group": "example.dev", "kind": "widgets"})


async def test_generation_only_on_kinds_that_have_one_and_moved_by_deletion(api: Emulator, new_widget) -> None:
    _, configmap = await call(api, "POST", CONFIGMAPS, {"metadata": {"name": "c"}})
    assert "generation" not in configmap["metadata"]
    await call(api, "POST", WIDGETS, new_widget("w", finalizers=["example.dev/hold"]))
    _, marked = await call(api, "DELETE", f"{WIDGETS}/w")
    assert marked["metadata"]["generation"] == 2


async def test_a_put_of_a_custom_resource_needs_its_resource_version(api: Emulator, new_widget) -> None:
    _, created = await call(api, "POST", WIDGETS, new_widget("w"))
    del created["metadata"]["resourceVersion"]
    status, refused = await call(api, "PUT", f"{WIDGETS}/w", created)
    assert status == 422 and refused["details"]["causes"][0]["field"] == "metadata.resourceVersion"
    status, renamed = await call(api, "PUT", f"{WIDGETS}/other", created)
    assert (
        status == 400 and renamed["message"] == "the name of the object (w) does not match the name on the URL (other)"
    )


async def test_bodies_that_do_not_decode_or_name_another_kind_are_refused(api: Emulator, new_widget) -> None:
    assert (await call(api, "POST", WIDGETS, b'{"kind": '))[0] == 400
    assert (await call(api, "POST", WIDGETS, {"metadata": {"name": "w"}}))[0] == 400  # no kind, no apiVersion
    assert (await call(api, "POST", WIDGETS, new_widget("w") | {"kind": "Gadget"}))[0] == 422
    assert (await call(api, "POST", CONFIGMAPS, {"kind": "Secret", "metadata": {"name": "s"}}))[0] == 400
    await call(api, "POST", WIDGETS, new_widget("w"))
    strategic = "application/strategic-merge-patch+json"
    assert (await call(api, "PATCH", f"{WIDGETS}/w", {"spec": {}}, strategic))[0] == 415
    assert (await call(api, "PATCH", f"{WIDGETS}/w", {"spec": {}}, "application/json-patch+json"))[0] == 400
    assert (await call(api, "GET", f"{WIDGETS}/w/scale"))[0] == 404


async def test_field_selectors_only_on_indexed_fields(api: Emulator) -> None:
    status, refused = await call(api, "GET", f"{CONFIGMAPS}?fieldSelector=data.a%3D1")
    assert status == 400
    assert refused["message"] == '"data.a" is not a known field selector: only "metadata.name", "metadata.namespace"'
    assert (await call(api, "GET", f"{WIDGETS}?fieldSelector=spec.size%3D1"))[1]["message"] == (
        "field label not supported: spec.size"
    )
    assert (await call(api, "GET", "/api/v1/namespaces/default/pods?fieldSelector=spec.nodeName%3Dn"))[0] == 200
    event = {"metadata": {"name": "e"}, "involvedObject": {"kind": "Widget", "name": "w"}, "reason": "R"}
    await call(api, "POST", "/api/v1/namespaces/default/events", event)
    _, found = await call(
        api, "GET", "/apis/events.k8s.io/v1/namespaces/default/events?fieldSelector=regarding.name%3Dw"
    )
    assert [item["metadata"]["name"] for item in found["items"]] == ["e"]


async def test_server_side_apply_creates_with_201_names_its_manager_and_shares_equal_values(
    api: Emulator, new_widget
) -> None:
    config = yaml.safe_dump(new_widget("w", {"size": 1})).encode()
    assert (await call(api, "PATCH", f"{WIDGETS}/w?fieldManager=alice", config, APPLY))[0] == 201
    status, refused = await call(api, "PATCH", f"{WIDGETS}/w", config, APPLY)
    assert status == 422 and refused["details"]["kind"] == "PatchOptions"
    _, shared = await call(api, "PATCH", f"{WIDGETS}/w?fieldManager=bob", config, APPLY)
    assert sorted(m["manager"] for m in shared["metadata"]["managedFields"]) == ["alice", "bob"]
    await call(api, "PATCH", f"{WIDGETS}/w?fieldManager=kopf", {"spec": {"size": 2}}, "application/merge-patch+json")
    status, conflict = await call(api, "PATCH", f"{WIDGETS}/w?fieldManager=alice", config, APPLY)
    assert status == 409
    assert conflict["message"] == 'Apply failed with 1 conflict: conflict with "kopf" using example.dev/v1: .spec.size'


async def test_a_batch_v1_job_orphans_its_pods_unless_told_otherwise(api: Emulator) -> None:
    _, job = await call(api, "POST", "/apis/batch/v1/namespaces/default/jobs", {"metadata": {"name": "j"}, "spec": {}})
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": job["metadata"]["uid"]}
    pod = {"metadata": {"name": "p", "ownerReferences": [owner]}, "spec": {"containers": []}}
    await call(api, "POST", "/api/v1/namespaces/default/pods", pod)
    await call(api, "DELETE", "/apis/batch/v1/namespaces/default/jobs/j")
    _, kept = await call(api, "GET", "/api/v1/namespaces/default/pods/p")
    assert "ownerReferences" not in kept["metadata"]


async def test_a_watch_from_before_its_crd_is_gone(api: Emulator, widget_crd) -> None:
    await call(api, "POST", CONFIGMAPS, {"metadata": {"name": "before"}})
    gadgets = widget_crd | {"metadata": {"name": "gadgets.example.dev"}}
    gadgets["spec"] = gadgets["spec"] | {"names": {"plural": "gadgets", "kind": "Gadget"}}
    await call(api, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", gadgets)
    url = f"{api.url}/apis/example.dev/v1/namespaces/default/gadgets?watch=true&resourceVersion=1&timeoutSeconds=1"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        event = json.loads(await asyncio.wait_for(response.content.readline(), 5))
    assert (event["type"], event["object"]["code"]) == ("ERROR", 410)
