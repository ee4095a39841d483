"""The fault proxy in front of a real kube-apiserver, with the real kubernetes client behind a token kubeconfig: it
forwards (watches too), and deals each fault as the server would have answered it, or loses the answer of a write
that was done. The chaos run (bench/chaos.py) trusts it to be exact about what reached the server."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kleinstyle.devcluster.controlplane import RealCluster, free_port, token_kubeconfig
from kleinstyle.devcluster.fault_proxy import FaultProxy, Rates, choose_fault, eligible, is_watch, status_body
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from .rbac import mint_token

ACCOUNT = "fault-proxy-client"


@pytest.fixture(scope="module")
def proxied(real_cluster: RealCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FaultProxy, str]]:
    """The proxy before the session's cluster, and a namespace whose ServiceAccount may do anything in it."""
    namespace = "fault-proxy"
    real_cluster.api("POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
    real_cluster.api("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": ACCOUNT}})
    binding = {
        "metadata": {"name": ACCOUNT},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
        "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": namespace}],
    }
    real_cluster.api("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings", binding)
    with FaultProxy(real_cluster, seed=3) as proxy:
        yield proxy, namespace


@pytest.fixture
def api(real_cluster: RealCluster, proxied: tuple[FaultProxy, str], tmp_path: Path) -> client.CoreV1Api:
    proxy, namespace = proxied
    return client_of(real_cluster, proxy.url, namespace, tmp_path)


def client_of(cluster: RealCluster, url: str, namespace: str, folder: Path) -> client.CoreV1Api:
    """The kubernetes client as the namespace's ServiceAccount, at `url` (the proxy's), with no retries of its own:
    what the proxy dealt is what the test sees."""
    path = folder / "kubeconfig"
    path.write_text(token_kubeconfig(url, cluster.ca_file, mint_token(cluster, namespace, ACCOUNT), ACCOUNT))
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=configuration)
    configuration.retries = False
    return client.CoreV1Api(client.ApiClient(configuration))


def configmap(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "data": {"k": "v"}}


def exists(cluster: RealCluster, namespace: str, name: str) -> bool:
    status, _ = cluster.api("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}")
    return status == 200


def refused(call: Callable[[], Any]) -> ApiException:
    with pytest.raises(ApiException) as caught:
        call()
    return caught.value


@pytest.mark.unit
def test_faults_are_dealt_only_where_a_server_could_answer_them() -> None:
    assert eligible("409", "PATCH") and eligible("409", "PUT") and not eligible("409", "POST")
    assert eligible("reset", "POST") and eligible("reset", "DELETE") and not eligible("reset", "GET")
    assert eligible("429", "GET") and eligible("500", "GET") and not eligible("418", "GET")
    rates = Rates(throttle=0.25, error=0.25, conflict=0.25, reset=0.25)
    assert [choose_fault(draw, "PATCH", rates) for draw in (0.1, 0.3, 0.6, 0.9)] == ["429", "500", "409", "reset"]
    assert [choose_fault(draw, "GET", rates) for draw in (0.1, 0.3, 0.6, 0.9)] == ["429", "500", None, None]
    assert choose_fault(0.99, "GET", Rates(throttle=0.5)) is None
    draws = random.Random(7)
    first = [choose_fault(draws.random(), "PATCH", rates) for _ in range(20)]
    draws = random.Random(7)
    assert [choose_fault(draws.random(), "PATCH", rates) for _ in range(20)] == first  # the seed decides
    assert is_watch("GET", "/api/v1/pods", {"watch": "true"}) and is_watch("GET", "/api/v1/watch/pods", {})
    assert not is_watch("POST", "/api/v1/pods", {"watch": "true"})
    code, headers, status = status_body("429", "GET", "/api/v1/pods")
    assert (code, headers["Retry-After"], status["reason"], status["details"]["retryAfterSeconds"]) == (
        429,
        "1",
        "TooManyRequests",
        1,
    )


def test_requests_pass_through_as_the_clients_own(
    api: client.CoreV1Api, proxied: tuple[FaultProxy, str], real_cluster: RealCluster
) -> None:
    proxy, namespace = proxied
    before = proxy.forwarded
    api.create_namespaced_config_map(namespace, configmap("passes"))
    listed = api.list_namespaced_config_map(namespace)
    assert "passes" in [item.metadata.name for item in listed.items]
    assert exists(real_cluster, namespace, "passes")
    assert proxy.forwarded - before == 2
    # The server knew the client as itself: what it may not do is refused by RBAC, not by the proxy.
    assert refused(lambda: api.list_namespaced_config_map("kube-system")).status == 403


def test_429_500_and_409_are_answered_for_the_server_and_never_reach_it(
    api: client.CoreV1Api, proxied: tuple[FaultProxy, str], real_cluster: RealCluster
) -> None:
    proxy, namespace = proxied
    proxy.inject("429")
    throttled = refused(lambda: api.create_namespaced_config_map(namespace, configmap("throttled")))
    assert (throttled.status, throttled.headers["Retry-After"]) == (429, "1")
    assert '"reason":"TooManyRequests"' in throttled.body.replace(" ", "")
    proxy.inject("500")
    assert refused(lambda: api.create_namespaced_config_map(namespace, configmap("errored"))).status == 500
    assert not exists(real_cluster, namespace, "throttled") and not exists(real_cluster, namespace, "errored")

    proxy.inject("409")  # no create is eligible: the next update gets it
    api.create_namespaced_config_map(namespace, configmap("updated"))
    conflict = refused(lambda: api.patch_namespaced_config_map("updated", namespace, {"data": {"k": "w"}}))
    assert conflict.status == 409 and "the object has been modified" in conflict.body
    assert api.read_namespaced_config_map("updated", namespace).data == {"k": "v"}  # the patch never happened
    api.patch_namespaced_config_map("updated", namespace, {"data": {"k": "w"}})
    assert api.read_namespaced_config_map("updated", namespace).data == {"k": "w"}
    assert proxy.injected["429"] >= 1 and proxy.injected["500"] >= 1 and proxy.injected["409"] >= 1


def test_a_reset_write_is_done_though_its_answer_is_lost(
    api: client.CoreV1Api, proxied: tuple[FaultProxy, str], real_cluster: RealCluster
) -> None:
    proxy, namespace = proxied
    proxy.inject("reset")
    with pytest.raises(urllib3.exceptions.HTTPError):
        api.create_namespaced_config_map(namespace, configmap("reset"))
    assert exists(real_cluster, namespace, "reset")
    # Sent again, as a client that cannot tell does: the server says it is there.
    assert refused(lambda: api.create_namespaced_config_map(namespace, configmap("reset"))).status == 409


def test_a_storm_deals_faults_while_it_lasts(api: client.CoreV1Api, proxied: tuple[FaultProxy, str]) -> None:
    proxy, namespace = proxied
    proxy.storm(Rates(throttle=1.0), seconds=30)
    assert refused(lambda: api.list_namespaced_config_map(namespace)).status == 429
    proxy.calm()
    api.list_namespaced_config_map(namespace)


def test_watches_stream_through_and_are_cut_mid_stream(
    api: client.CoreV1Api, proxied: tuple[FaultProxy, str], real_cluster: RealCluster
) -> None:
    proxy, namespace = proxied
    seen: list[str] = []
    ended: list[BaseException | None] = []

    def follow() -> None:
        try:
            for event in watch.Watch().stream(api.list_namespaced_config_map, namespace, timeout_seconds=60):
                seen.append(f"{event['type']} {event['object'].metadata.name}")
            ended.append(None)
        except Exception as exc:  # whatever the client raises when its stream breaks
            ended.append(exc)

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    deadline = time.monotonic() + 20
    while not any("watched" in line for line in seen) and time.monotonic() < deadline:
        real_cluster.api("POST", f"/api/v1/namespaces/{namespace}/configmaps", configmap("watched"))
        time.sleep(0.5)
    assert "ADDED watched" in seen
    assert proxy.cut_watches() >= 1
    watcher.join(timeout=20)
    assert ended, "the watch went on after the cut"
    assert proxy.injected["watch-cut"] >= 1
    # The next watch goes through.
    events = watch.Watch().stream(api.list_namespaced_config_map, namespace, timeout_seconds=2)
    assert any(event["object"].metadata.name == "watched" for event in events)


def test_a_server_that_is_away_drops_the_clients_connection_rather_than_answering(
    real_cluster: RealCluster, proxied: tuple[FaultProxy, str], tmp_path: Path
) -> None:
    """Through a TCP load balancer, a restarting API server is a connection that ends, never an answer it did not
    give (a 500 from the proxy itself made the operator exit on start: a 500 reads as the server's)."""

    class Away:
        server = f"https://127.0.0.1:{free_port()}"  # nothing listens there
        ca_file = real_cluster.ca_file

        def serving_certificate(self, name: str, ips: Sequence[str]) -> tuple[Path, Path]:
            return real_cluster.serving_certificate(name, ips)

    with FaultProxy(Away()) as away:
        api = client_of(real_cluster, away.url, proxied[1], tmp_path)
        with pytest.raises(urllib3.exceptions.HTTPError):
            api.list_namespaced_config_map(proxied[1])
