"""A small real kopf operator against the dev cluster: create, update, restart without duplicates, delete."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import kopf
import kubernetes
import pytest
from kleinstyle.devcluster import DevCluster, configure_kopf_for_emulator, emulator_connection

pytestmark = pytest.mark.emulator


def widget_operator(cluster_url: list[str], deleted: list[str], login_via: str) -> kopf.OperatorRegistry:
    """Widgets get a ConfigMap `{name}-data` holding their size; deletions are recorded through a finalizer."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        if login_via == "kubeconfig":  # what kopf's default registry does: the kubernetes client's configuration
            return kopf.login_via_client(**kwargs)
        return emulator_connection(cluster_url[0])

    @kopf.on.create("example.dev", "v1", "widgets", id="create_data", registry=registry)
    def create_data(body: kopf.Body, spec: kopf.Spec, name: str, namespace: str, **_: Any) -> dict[str, str]:
        configmap = {"metadata": {"name": f"{name}-data"}, "data": {"size": str(spec["size"])}}
        kopf.adopt(configmap, owner=body)
        try:
            kubernetes.client.CoreV1Api().create_namespaced_config_map(namespace, configmap)
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:  # an existing child is adopted, never duplicated
                raise
        return {"configmap": f"{name}-data"}

    @kopf.on.update("example.dev", "v1", "widgets", field="spec.size", registry=registry)
    def resize(name: str, namespace: str, new: Any, **_: Any) -> None:
        patch = {"data": {"size": str(new)}}
        kubernetes.client.CoreV1Api().patch_namespaced_config_map(f"{name}-data", namespace, patch)

    @kopf.on.delete("example.dev", "v1", "widgets", registry=registry)
    def forget(name: str, **_: Any) -> None:
        deleted.append(name)

    return registry


@pytest.mark.parametrize("login_via", ["kubeconfig", "connection-info"])
async def test_a_kopf_operator_runs_restarts_and_deletes(
    tmp_path: Path, widget_crd, new_widget, login_via: str
) -> None:
    url: list[str] = []
    deleted: list[str] = []
    registry = widget_operator(url, deleted, login_via)
    stop_times: list[float] = []

    async def run_operator(stop: asyncio.Event) -> None:
        settings = configure_kopf_for_emulator(kopf.OperatorSettings())
        await kopf.operator(registry=registry, settings=settings, namespaces=["default"], stop_flag=stop)

    cluster = DevCluster(tmp_path, crds=[widget_crd], run_jobs=False)
    async with cluster:
        url.append(cluster.url)
        await cluster.start_operator(run_operator)
        api = cluster.emulator

        await cluster.apply([new_widget("a", {"size": 1})])
        data = await cluster.wait_for(lambda: api.get("configmaps", "default", "a-data"), timeout=15)
        assert data["data"] == {"size": "1"}
        assert data["metadata"]["ownerReferences"][0]["name"] == "a"
        widget = await cluster.wait_for(
            lambda: (api.get("widgets", "default", "a").get("status") or {}).get("create_data")
        )
        assert widget == {"configmap": "a-data"}

        await cluster.apply([new_widget("a", {"size": 2})])
        await cluster.wait_for(lambda: api.get("configmaps", "default", "a-data")["data"] == {"size": "2"}, timeout=15)

        started = time.monotonic()
        await cluster.restart_operator()
        stop_times.append(time.monotonic() - started)
        await cluster.apply([new_widget("b", {"size": 3})])
        await cluster.wait_for(lambda: api.get("configmaps", "default", "b-data"), timeout=15)
        assert api.count_creates("configmaps", "a-data", attempts=True) == 1, "the restart re-ran nothing"
        assert api.get("configmaps", "default", "a-data")["data"] == {"size": "2"}

        await cluster.delete("widgets", "default", "a")
        await cluster.wait_for(lambda: api.get("widgets", "default", "a") is None, timeout=15)
        assert deleted == ["a"]
        assert api.get("configmaps", "default", "a-data") is None, "the child went with its owner"

        started = time.monotonic()
        await cluster.stop_operator()
        stop_times.append(time.monotonic() - started)
    assert max(stop_times) < 5, f"kopf should stop promptly against the emulator, took {stop_times}"


async def test_stopping_kopf_leaves_running_jobs_and_the_callers_tasks_alone(tmp_path: Path, widget_crd) -> None:
    url: list[str] = []
    registry = widget_operator(url, [], "connection-info")

    async def run_operator(stop: asyncio.Event) -> None:
        settings = configure_kopf_for_emulator(kopf.OperatorSettings())
        await kopf.operator(registry=registry, settings=settings, namespaces=["default"], stop_flag=stop)

    script = "import time; time.sleep(8)"
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "long"},
        "spec": {
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "command": ["python", "-c", script]}]}
            }
        },
    }
    async with DevCluster(tmp_path, crds=[widget_crd]) as cluster:
        url.append(cluster.url)
        await cluster.start_operator(run_operator)
        await cluster.apply([job])
        running = await cluster.wait_for(
            lambda: cluster.emulator.get("jobs", "default", "long").get("status", {}).get("active")
        )
        assert running == 1
        bystander = asyncio.create_task(asyncio.sleep(10))

        await cluster.restart_operator()
        # The restart did not wait for the Job: it is still running (a timing bound would flake on a busy machine).
        assert not cluster.emulator.get("jobs", "default", "long").get("status", {}).get("succeeded")

        done = await cluster.wait_for(
            lambda: cluster.emulator.get("jobs", "default", "long").get("status", {}).get("succeeded"), timeout=30
        )
        assert done == 1
        assert len(cluster.emulator.list("pods", "default")) == 1, "the running pod was not interrupted"
        assert not bystander.done()
        bystander.cancel()
