"""Deletion with finalizers, garbage collection, admission, and watches that resume."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from kleinstyle.devcluster import ApiError, Emulator, KubeClient

pytestmark = pytest.mark.emulator

WIDGETS = "widgets"


def owned_by(owner: dict[str, Any]) -> list[dict[str, Any]]:
    meta = owner["metadata"]
    return [{"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"], "uid": meta["uid"]}]


async def test_finalizers_hold_deletion_until_emptied(api: Emulator, client: KubeClient, new_widget) -> None:
    await client.create(WIDGETS, new_widget("a", finalizers=["example.dev/cleanup"]))
    marked = await client.delete(WIDGETS, "default", "a")
    assert marked["metadata"]["deletionTimestamp"]
    assert api.get(WIDGETS, "default", "a")["metadata"]["deletionTimestamp"]

    await client.delete(WIDGETS, "default", "a")  # a second delete changes nothing
    with pytest.raises(ApiError) as refused:
        await client.patch(WIDGETS, "default", "a", {"metadata": {"finalizers": ["example.dev/cleanup", "x.dev/more"]}})
    assert refused.value.code == 422

    await client.patch(WIDGETS, "default", "a", {"metadata": {"finalizers": None}})
    assert api.get(WIDGETS, "default", "a") is None


async def test_deletion_cascades_through_owner_references(api: Emulator, client: KubeClient, new_widget) -> None:
    owner = await client.create(WIDGETS, new_widget("parent"))
    job = await client.create(
        "batch/v1/jobs",
        {"metadata": {"name": "child", "ownerReferences": owned_by(owner)}, "spec": {"template": {"spec": {}}}},
        "default",
    )
    await client.create("v1/pods", {"metadata": {"name": "grandchild", "ownerReferences": owned_by(job)}}, "default")
    await client.create("v1/configmaps", {"metadata": {"name": "unrelated"}}, "default")
    held = {"name": "held", "ownerReferences": owned_by(job), "finalizers": ["example.dev/keep"]}
    await client.create("v1/configmaps", {"metadata": held}, "default")

    await client.delete(WIDGETS, "default", "parent")

    assert api.get("jobs", "default", "child") is None
    assert api.get("pods", "default", "grandchild") is None
    assert api.get("configmaps", "default", "unrelated") is not None
    assert api.get("configmaps", "default", "held")["metadata"]["deletionTimestamp"]


async def test_orphan_propagation_keeps_dependents(api: Emulator, client: KubeClient, new_widget) -> None:
    owner = await client.create(WIDGETS, new_widget("parent"))
    await client.create("v1/configmaps", {"metadata": {"name": "kept", "ownerReferences": owned_by(owner)}}, "default")
    await client.delete(WIDGETS, "default", "parent", propagation="Orphan")
    kept = api.get("configmaps", "default", "kept")
    assert kept is not None
    assert not kept["metadata"].get("ownerReferences")


class Rejected(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def admit(obj: dict[str, Any]) -> dict[str, Any]:
    """Default `spec.size` to 1, prune unknown spec fields, refuse negative sizes."""
    spec = obj.setdefault("spec", {})
    spec.setdefault("size", 1)
    if spec["size"] < 0:
        raise Rejected(f'Widget.example.dev "{obj["metadata"]["name"]}" is invalid: spec.size: must be >= 0')
    obj["spec"] = {key: value for key, value in spec.items() if key in ("size", "colour")}
    return obj


async def test_admission_defaults_prunes_and_rejects_with_422(widget_crd, new_widget) -> None:
    async with Emulator([widget_crd], admit=admit) as api, KubeClient(api.url, api.kinds) as client:
        created = await client.create(WIDGETS, new_widget("a", {"colour": "red", "junk": True}))
        assert created["spec"] == {"colour": "red", "size": 1}

        session = aiohttp.ClientSession()
        async with session:
            url = f"{api.url}/apis/example.dev/v1/namespaces/default/widgets"
            async with session.post(url, json=new_widget("b", {"size": -1})) as response:
                assert response.status == 422
                status = await response.json()
        assert status["kind"] == "Status"
        assert status["apiVersion"] == "v1"
        assert status["status"] == "Failure"
        assert status["reason"] == "Invalid"
        assert status["code"] == 422
        assert status["message"] == 'Widget.example.dev "b" is invalid: spec.size: must be >= 0'

        with pytest.raises(ApiError) as patched:
            await client.patch(WIDGETS, "default", "a", {"spec": {"size": -5}})
        assert "spec.size: must be >= 0" in patched.value.message
        assert api.get(WIDGETS, "default", "a")["spec"]["size"] == 1

        # Status writes are not the spec hook's business (the hook would refuse this object's spec otherwise).
        await client.patch(WIDGETS, "default", "a", {"status": {"size": -1}}, subresource="status")
        assert api.get(WIDGETS, "default", "a")["status"] == {"size": -1}
        # Built-in kinds are not admitted by the hook.
        await client.create("v1/configmaps", {"metadata": {"name": "cm"}, "data": {"size": "-1"}}, "default")


async def _watch(api: Emulator, params: str, count: int) -> list[dict[str, Any]]:
    events = []
    async with aiohttp.ClientSession() as session:
        url = f"{api.url}/apis/example.dev/v1/namespaces/default/widgets?watch=true&{params}"
        async with session.get(url) as response:
            async for line in response.content:
                events.append(json.loads(line))
                if len(events) == count:
                    break
    return events


async def test_watch_resumes_from_a_resource_version(api: Emulator, client: KubeClient, new_widget) -> None:
    first = await client.create(WIDGETS, new_widget("a"))
    await client.patch(WIDGETS, "default", "a", {"spec": {"size": 2}})
    await client.create(WIDGETS, new_widget("b"))
    await client.delete(WIDGETS, "default", "a")

    since = first["metadata"]["resourceVersion"]
    events = await asyncio.wait_for(_watch(api, f"resourceVersion={since}", 3), 5)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("MODIFIED", "a"),
        ("ADDED", "b"),
        ("DELETED", "a"),
    ]
    replay = await asyncio.wait_for(_watch(api, "", 1), 5)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in replay] == [("ADDED", "b")]


async def test_filtered_watch_sees_objects_enter_and_leave(api: Emulator, client: KubeClient, new_widget) -> None:
    start = (await client.create(WIDGETS, new_widget("a")))["metadata"]["resourceVersion"]
    watching = asyncio.create_task(_watch(api, f"resourceVersion={start}&labelSelector=team%3Dx", 2))
    await client.patch(WIDGETS, "default", "a", {"metadata": {"labels": {"team": "x"}}})
    await client.patch(WIDGETS, "default", "a", {"metadata": {"labels": {"team": "y"}}})
    events = await asyncio.wait_for(watching, 5)
    assert [e["type"] for e in events] == ["ADDED", "DELETED"]


async def test_watch_sends_bookmarks_and_ends_at_its_timeout(widget_crd) -> None:
    async with Emulator([widget_crd], bookmark_interval=0.1) as api:
        events = await asyncio.wait_for(_watch(api, "allowWatchBookmarks=true&timeoutSeconds=1", 1), 5)
        assert events[0]["type"] == "BOOKMARK"
        assert events[0]["object"]["metadata"]["resourceVersion"]
        ended = await asyncio.wait_for(_watch(api, "timeoutSeconds=1", 99), 5)
        assert ended == []


async def test_watch_from_an_unknown_version_asks_the_client_to_relist(api: Emulator) -> None:
    [event] = await asyncio.wait_for(_watch(api, "resourceVersion=999999", 1), 5)
    assert event["type"] == "ERROR"
    assert event["object"]["code"] == 410
