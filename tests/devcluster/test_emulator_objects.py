"""The emulator's object semantics, through HTTP: metadata, status isolation, selectors, conflicts."""

from __future__ import annotations

import pytest
from kleinstyle.devcluster import ApiError, Emulator, KubeClient

pytestmark = pytest.mark.emulator

WIDGETS = "widgets"


async def test_create_stamps_uid_generation_timestamp_and_version(client: KubeClient, new_widget) -> None:
    created = await client.create(WIDGETS, new_widget("a"))
    meta = created["metadata"]
    assert len(meta["uid"]) == 36
    assert meta["generation"] == 1
    assert meta["creationTimestamp"].endswith("Z")
    assert int(meta["resourceVersion"]) > 0
    other = await client.create(WIDGETS, new_widget("b"))
    assert other["metadata"]["uid"] != meta["uid"]
    assert int(other["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])


async def test_generation_moves_only_with_spec(client: KubeClient, new_widget) -> None:
    created = await client.create(WIDGETS, new_widget("a", {"size": 1}))
    rv0 = created["metadata"]["resourceVersion"]

    labelled = await client.patch(WIDGETS, "default", "a", {"metadata": {"labels": {"team": "x"}}})
    assert labelled["metadata"]["generation"] == 1
    assert labelled["metadata"]["resourceVersion"] != rv0

    status = await client.patch(WIDGETS, "default", "a", {"status": {"phase": "Ready"}}, subresource="status")
    assert status["metadata"]["generation"] == 1
    assert status["status"] == {"phase": "Ready"}

    resized = await client.patch(WIDGETS, "default", "a", {"spec": {"size": 2}})
    assert resized["metadata"]["generation"] == 2
    assert resized["status"] == {"phase": "Ready"}

    again = await client.patch(WIDGETS, "default", "a", {"spec": {"size": 2}})
    assert again["metadata"]["resourceVersion"] == resized["metadata"]["resourceVersion"], "a no-op keeps the version"
    assert again["metadata"]["generation"] == 2


async def test_status_is_isolated_from_spec_writes(client: KubeClient, new_widget) -> None:
    body = new_widget("a") | {"status": {"phase": "Forged"}}
    created = await client.create(WIDGETS, body)
    assert "status" not in created, "status is dropped on create"

    await client.patch(WIDGETS, "default", "a", {"status": {"phase": "Ready"}}, subresource="status")
    main = await client.patch(WIDGETS, "default", "a", {"spec": {"size": 3}, "status": {"phase": "Forged"}})
    assert main["status"] == {"phase": "Ready"}

    via_status = await client.patch(
        WIDGETS, "default", "a", {"spec": {"size": 9}, "status": {"phase": "Done"}}, subresource="status"
    )
    assert via_status["spec"] == {"size": 3}
    assert via_status["status"] == {"phase": "Done"}


async def test_put_replaces_and_checks_resource_version(client: KubeClient, new_widget) -> None:
    created = await client.create(WIDGETS, new_widget("a", {"size": 1, "colour": "red"}))
    replaced = dict(created, spec={"size": 5})
    path = client.path(client.kind(WIDGETS), "default", "a")
    result = await client.request("PUT", path, body=replaced)
    assert result["spec"] == {"size": 5}
    assert result["metadata"]["generation"] == 2

    with pytest.raises(ApiError) as stale:
        await client.request("PUT", path, body=replaced)  # still carries the old resourceVersion
    assert stale.value.code == 409
    assert stale.value.reason == "Conflict"


async def test_json_patch_test_operation_guards_the_resource_version(client: KubeClient, new_widget) -> None:
    await client.create(WIDGETS, new_widget("a"))
    current = await client.get(WIDGETS, "default", "a")
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": current["metadata"]["resourceVersion"]},
        {"op": "add", "path": "/metadata/finalizers", "value": ["example.dev/guard"]},
    ]
    patched = await client.patch(WIDGETS, "default", "a", ops, content_type="application/json-patch+json")
    assert patched["metadata"]["finalizers"] == ["example.dev/guard"]
    with pytest.raises(ApiError) as failed:
        await client.patch(WIDGETS, "default", "a", ops, content_type="application/json-patch+json")
    assert failed.value.code == 422


async def test_create_conflicts_and_missing_objects(client: KubeClient, new_widget) -> None:
    await client.create(WIDGETS, new_widget("a"))
    with pytest.raises(ApiError) as exists:
        await client.create(WIDGETS, new_widget("a"))
    assert (exists.value.code, exists.value.reason) == (409, "AlreadyExists")
    with pytest.raises(ApiError) as missing:
        await client.get(WIDGETS, "default", "nope")
    assert missing.value.code == 404
    assert missing.value.message == 'widgets.example.dev "nope" not found'


async def test_generate_name_and_name_validation(client: KubeClient) -> None:
    event = {"metadata": {"generateName": "demo.", "namespace": "default"}, "reason": "Tested", "message": "m"}
    created = await client.create("v1/events", event)
    assert created["metadata"]["name"].startswith("demo.")
    assert len(created["metadata"]["name"]) == len("demo.") + 5

    job = {"metadata": {"name": "x" * 64}, "spec": {"template": {"spec": {"containers": []}}}}
    with pytest.raises(ApiError) as too_long:
        await client.create("batch/v1/jobs", job, "default")
    assert too_long.value.code == 422
    assert "must be no more than 63 characters" in too_long.value.message


async def test_label_selectors_filter_lists(client: KubeClient, new_widget) -> None:
    await client.create(WIDGETS, new_widget("a", labels={"app": "x", "tier": "gpu"}))
    await client.create(WIDGETS, new_widget("b", labels={"app": "x", "tier": "cpu"}))
    await client.create(WIDGETS, new_widget("c", labels={"app": "y"}))

    async def names(selector: str) -> list[str]:
        items = await client.list(WIDGETS, "default", label_selector=selector)
        return [item["metadata"]["name"] for item in items]

    assert await names("app=x") == ["a", "b"]
    assert await names("app=x,tier=gpu") == ["a"]
    assert await names("app==x,tier!=gpu") == ["b"]
    assert await names("tier in (cpu, gpu)") == ["a", "b"]
    assert await names("!tier") == ["c"]
    assert await names("tier") == ["a", "b"]
    with pytest.raises(ApiError) as bad:
        await names("app=(x")
    assert bad.value.code == 400


async def test_lists_carry_kind_and_resource_version(client: KubeClient, new_widget) -> None:
    await client.create(WIDGETS, new_widget("a"))
    listing = await client.request("GET", client.path(client.kind(WIDGETS), "default"))
    assert listing["kind"] == "WidgetList"
    assert listing["apiVersion"] == "example.dev/v1"
    assert listing["items"][0]["kind"] == "Widget"
    assert int(listing["metadata"]["resourceVersion"]) >= int(listing["items"][0]["metadata"]["resourceVersion"])


async def test_secret_string_data_is_encoded(client: KubeClient) -> None:
    secret = {"metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}}
    created = await client.create("v1/secrets", secret, "default")
    assert created["data"] == {"token": "czNjcmV0"}
    assert "stringData" not in created


async def test_crds_applied_over_http_are_served(client: KubeClient, widget_crd) -> None:
    gadgets = widget_crd | {"metadata": {"name": "gadgets.example.dev"}}
    gadgets["spec"] = gadgets["spec"] | {"names": {"plural": "gadgets", "kind": "Gadget"}}
    await client.apply(gadgets)
    created = await client.create("gadgets", {"metadata": {"name": "g"}, "spec": {}}, "default")
    assert created["kind"] == "Gadget"
    discovery = await client.request("GET", "/apis/example.dev/v1")
    assert {"gadgets", "gadgets/status", "widgets"} <= {r["name"] for r in discovery["resources"]}


async def test_namespaces_appear_on_first_use(client: KubeClient, new_widget) -> None:
    await client.create(WIDGETS, new_widget("a") | {"metadata": {"name": "a", "namespace": "team-a"}})
    namespaces = await client.request("GET", "/api/v1/namespaces")
    assert "team-a" in {item["metadata"]["name"] for item in namespaces["items"]}


async def test_request_log_counts_creates(api: Emulator, client: KubeClient, new_widget) -> None:
    await client.create(WIDGETS, new_widget("a"))
    with pytest.raises(ApiError):
        await client.create(WIDGETS, new_widget("a"))
    assert api.count_creates("widgets", "a") == 1
    assert api.count_creates("Widget", "a", attempts=True) == 2
    posts = [r for r in api.requests() if r.method == "POST"]
    assert posts[0].path == "/apis/example.dev/v1/namespaces/default/widgets"
    assert posts[0].body["metadata"]["name"] == "a"


async def test_the_kubernetes_client_works_against_it(api: Emulator, tmp_path) -> None:
    import kubernetes

    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(
        config_file=str(api.kubeconfig(tmp_path / "kubeconfig")), client_configuration=config
    )
    with kubernetes.client.ApiClient(config) as http:
        core = kubernetes.client.CoreV1Api(http)
        core.create_namespaced_config_map(
            "default", {"metadata": {"name": "cm", "labels": {"a": "b"}}, "data": {"k": "v"}}
        )
        core.patch_namespaced_config_map("cm", "default", {"data": {"k": "w"}})
        found = core.list_namespaced_config_map("default", label_selector="a=b")
        assert [item.data for item in found.items] == [{"k": "w"}]
        custom = kubernetes.client.CustomObjectsApi(http)
        custom.create_namespaced_custom_object(
            "example.dev",
            "v1",
            "default",
            "widgets",
            {
                "apiVersion": "example.dev/v1",
                "kind": "Widget",
                "metadata": {"name": "w"},
                "spec": {"size": 1},
            },
        )
        custom.patch_namespaced_custom_object_status(
            "example.dev", "v1", "default", "widgets", "w", {"status": {"ok": True}}
        )
        assert api.get("widgets", "default", "w")["status"] == {"ok": True}
        with pytest.raises(kubernetes.client.ApiException) as missing:
            core.read_namespaced_secret("absent", "default")
        assert missing.value.status == 404
