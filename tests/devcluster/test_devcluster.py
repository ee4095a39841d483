"""DevCluster: kubectl-like apply, client wiring, and an operator that can be stopped and started again."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import pytest
from kleinstyle.devcluster import ApiError, DevCluster, KubeClient

pytestmark = pytest.mark.emulator


class Invalid(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def admit(obj: dict[str, Any]) -> dict[str, Any]:
    if "size" not in obj.get("spec", {}):
        raise Invalid(f'Widget.example.dev "{obj["metadata"]["name"]}" is invalid: spec.size: Required value')
    return obj


async def test_apply_creates_then_patches_like_kubectl(tmp_path: Path, widget_crd, new_widget) -> None:
    async with DevCluster(tmp_path, crds=[widget_crd], run_jobs=False) as cluster:
        [created] = await cluster.apply([new_widget("a", {"size": 1, "colour": "red"}, labels={"team": "x"})])
        assert created["metadata"]["generation"] == 1
        await cluster.client.patch("widgets", "default", "a", {"metadata": {"annotations": {"seen-by": "operator"}}})

        [updated] = await cluster.apply([new_widget("a", {"size": 2})])
        assert updated["spec"] == {"size": 2}, "a field dropped from the applied document is removed"
        assert updated["metadata"]["generation"] == 2
        assert "labels" not in updated["metadata"]
        assert updated["metadata"]["annotations"]["seen-by"] == "operator", "fields others wrote survive"

        assert cluster.emulator.count_creates("widgets", "a") == 1
        assert (await cluster.get("wd", "default", "a"))["spec"] == {"size": 2}
        assert await cluster.get("widgets", "default", "absent") is None


async def test_apply_surfaces_the_servers_422_message(tmp_path: Path, widget_crd, new_widget) -> None:
    async with DevCluster(tmp_path, crds=[widget_crd], admit=admit, run_jobs=False) as cluster:
        with pytest.raises(ApiError) as refused:
            await cluster.apply([new_widget("a", {})])
        assert refused.value.code == 422
        assert refused.value.message == 'Widget.example.dev "a" is invalid: spec.size: Required value'


async def test_clients_point_at_the_emulator_while_it_runs(tmp_path: Path) -> None:
    import kubernetes

    before = os.environ.get("KUBECONFIG")
    async with DevCluster(tmp_path, run_jobs=False) as cluster:
        assert os.environ["KUBECONFIG"] == str(cluster.kubeconfig_path)
        assert str(cluster.kubeconfig_path) == kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION
        core = kubernetes.client.CoreV1Api()
        await asyncio.to_thread(core.create_namespaced_config_map, "default", {"metadata": {"name": "from-client"}})
        assert cluster.emulator.get("configmaps", "default", "from-client") is not None
    assert os.environ.get("KUBECONFIG") == before


async def test_the_operator_restarts_while_the_objects_stay(tmp_path: Path, widget_crd, new_widget) -> None:
    starts: list[int] = []

    async def operator(stop: asyncio.Event) -> None:
        """A fake operator: counts its starts, then mirrors every widget into a ConfigMap until stopped."""
        starts.append(len(starts) + 1)
        async with KubeClient(cluster.url, cluster.emulator.kinds) as client:
            while not stop.is_set():
                for item in await client.list("widgets", "default"):
                    name = f"{item['metadata']['name']}-mirror"
                    if await client.get_or_none("configmaps", "default", name) is None:
                        await client.create("configmaps", {"metadata": {"name": name}}, "default")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.05)

    cluster = DevCluster(tmp_path, crds=[widget_crd], operator=operator, run_jobs=False)
    async with cluster:
        await cluster.apply([new_widget("a")])
        await cluster.wait_for(lambda: cluster.emulator.get("configmaps", "default", "a-mirror"))
        await cluster.restart_operator()
        assert cluster.operator_running
        await cluster.apply([new_widget("b")])
        await cluster.wait_for(lambda: cluster.emulator.get("configmaps", "default", "b-mirror"))
        assert cluster.emulator.count_creates("configmaps", "a-mirror") == 1
    assert starts == [1, 2]


async def test_a_crashed_operator_fails_waits_fast(tmp_path: Path) -> None:
    async def operator(stop: asyncio.Event) -> None:
        raise RuntimeError("cannot start")

    with pytest.raises(RuntimeError, match="cannot start"):
        async with DevCluster(tmp_path, operator=operator, run_jobs=False) as cluster:
            with pytest.raises(TimeoutError) as waited:
                await cluster.wait_for(lambda: False, timeout=30)
            assert isinstance(waited.value.__cause__, RuntimeError)
