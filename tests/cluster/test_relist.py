"""A run's Job deleted while the operator's watches could not resume (410 Gone, as after a kube-apiserver restart
that lost its watch cache) is made again: kopf lists again and never hears of that deletion, so without
relists.py its index keeps the Job for good and the run waits on it for ever (the chaos run found this).

The chart's operator, under its ServiceAccount's token, reaches the real kube-apiserver through the fault proxy;
while the proxy answers every watch with 410, the Job is deleted; the operator must notice and make it again.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kleinstyle.devcluster.controlplane import token_kubeconfig
from kleinstyle.devcluster.fault_proxy import FaultProxy

from .rbac import Identity, OperatorProcess, Release, ensure_namespace, path, service_account, wait_for
from .test_chart_install import apply, get, status_of

EXPIRED_S = 6.0


@pytest.fixture
def proxied_operator(chart_release: Release, tmp_path: Path) -> Iterator[tuple[OperatorProcess, FaultProxy]]:
    """The chart's operator whose only way to the API is the fault proxy (its ServiceAccount's token)."""
    cluster = chart_release.cluster
    with FaultProxy(cluster, seed=11) as proxy:
        account = service_account(cluster, chart_release.namespace, chart_release.fullname, tmp_path)
        assert account.token is not None
        kubeconfig = tmp_path / "operator-via-proxy.kubeconfig"
        kubeconfig.write_text(token_kubeconfig(proxy.url, cluster.ca_file, account.token, account.name))
        via_proxy = Identity(cluster, account.name, account.token, kubeconfig=kubeconfig)
        operator = OperatorProcess(chart_release, via_proxy, tmp_path).start()
        try:
            yield operator, proxy
        finally:
            operator.stop()


def job_named(cluster: Any, namespace: str, name: str) -> dict[str, Any] | None:
    status, body = cluster.api("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
    return body if status == 200 else None


def test_a_job_deleted_while_the_watches_must_relist_is_made_again(
    proxied_operator: tuple[OperatorProcess, FaultProxy],
) -> None:
    operator, proxy = proxied_operator
    cluster = operator.release.cluster
    ns = ensure_namespace(cluster, "studio-relist")
    apply(cluster, ns, "styleboard.yaml")
    name = wait_for("the board's Job", lambda: status_of(cluster, "StyleBoard", ns, "bd9").get("jobName"))
    first = wait_for("the Job", lambda: job_named(cluster, ns, name))

    assert proxy.expire_watches(EXPIRED_S) > 0  # every watch of the operator's cut, and answered 410 for a while
    status, answer = cluster.api(
        "DELETE", f"/apis/batch/v1/namespaces/{ns}/jobs/{name}", {"propagationPolicy": "Background"}
    )
    assert status == 200, answer

    def made_again() -> dict[str, Any] | None:
        found = job_named(cluster, ns, name)
        return found if found and found["metadata"]["uid"] != first["metadata"]["uid"] else None

    try:
        wait_for("the Job made again", made_again, timeout=EXPIRED_S + 30)
    except AssertionError as missing:
        raise AssertionError(f"{missing}\noperator log (tail):\n{operator.tail()}") from None
    assert proxy.injected["watch-expired"] > 0
    assert "was deleted while a watch was away" in operator.text()
    # The audit's summary comes once its last list is done, a moment after the Job was made again.
    summary = re.compile(r"after a relist, checked \d+ indexed objects in \d+ lists: [1-9]\d* gone")
    wait_for("the audit's summary", lambda: summary.search(operator.text()), timeout=30)
    assert get(cluster, "StyleBoard", ns, "bd9") is not None
    cluster.api("DELETE", path("StyleBoard", ns, "bd9"))
