"""The cluster tier: one real control plane on loopback (`RealCluster`) for the whole session.

Its binaries come from `make controlplane` (docs/real-cluster.md); where they are not built every test here skips,
saying how to build them, so `make test` passes on a machine without them. tests/conftest.py gives every
test here the `cluster` tier.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kleinstyle.devcluster.controlplane import KUBE_VERSION, RealCluster, cache_dir, find_bin_dir

from .rbac import (
    OperatorProcess,
    Release,
    Tenant,
    bind,
    ensure_namespace,
    install_chart,
    service_account,
    user,
    wait_for,
)

REPO = Path(__file__).parents[2]
CRDS = REPO / "crds"


@pytest.fixture(scope="session")
def real_cluster() -> Iterator[RealCluster]:
    yield from started_cluster()


def started_cluster(helm: bool = False) -> Iterator[RealCluster]:
    """A control plane of its own for a fixture to yield (`helm`: the test needs helm too); the test skips, saying
    how to build them, where the binaries are not built."""
    bin_dir = find_bin_dir()
    if bin_dir is None or (helm and not (bin_dir / "helm").is_file()):
        pytest.skip(
            f"no real control plane{' and helm' if helm else ''}: `make controlplane` builds Kubernetes "
            f"{KUBE_VERSION}{' and helm' if helm else ''} into {cache_dir() / 'controlplane' / KUBE_VERSION / 'bin'} "
            "(once per machine; docs/real-cluster.md)"
        )
    with RealCluster(bin_dir) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def crds_applied(real_cluster: RealCluster) -> RealCluster:
    """The repository's CRDs, applied as a user would (server-side) and Established."""
    real_cluster.kubectl("apply", "--server-side", "-f", str(CRDS))
    real_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRDS))
    return real_cluster


@pytest.fixture(scope="session")
def resources() -> dict[str, dict[str, str]]:
    """Each kind's group, served version and plural, read from crds/: where a kind's objects are POSTed."""
    found = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        (version,) = [v["name"] for v in crd["spec"]["versions"] if v.get("storage")]
        names = crd["spec"]["names"]
        found[names["kind"]] = {"group": crd["spec"]["group"], "version": version, "plural": names["plural"]}
    return found


_serial = itertools.count()


@pytest.fixture(scope="session")
def make_namespace(real_cluster: RealCluster) -> Callable[..., str]:
    """Create a namespace (a fresh name unless one is given; an existing one is kept) and return its name."""

    def make(name: str | None = None) -> str:
        name = name or f"t{next(_serial)}"
        status, body = real_cluster.api("GET", f"/api/v1/namespaces/{name}")
        if status == 404:
            namespace: dict[str, Any] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            status, body = real_cluster.api("POST", "/api/v1/namespaces", namespace)
            assert status == 201, body
        return name

    return make


# --- the chart installed with the built helm, its operator as its ServiceAccount, tenants as users (issue 18) -------

CHART = REPO / "charts" / "kleinstyle"
RELEASE, RELEASE_NAMESPACE = "kleinstyle", "kleinstyle-system"
# What a platform team passes: its own registry, a GPU pool of its own, caps for a shared cluster.
PLATFORM_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/platform/kleinstyle-operator", "tag": "0.1.0"},
    "podLabels": {"team": "platform"},
    "config": {
        "runtimeImage": "registry.example.com/platform/kleinstyle-runtime:0.1.0",
        "nodePools": {
            "h100": {
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            }
        },
        "defaultNodePool": "h100",
        "trainingLimits": {"maxSteps": 2000, "maxResolution": 1024},
        "activeDeadlineSeconds": 7200,
    },
}
# user: (namespace, the ClusterRole bound to them there)
TENANTS = {"alice": ("team-a", "edit"), "bob": ("team-b", "edit"), "carol": ("team-a", "view")}


@pytest.fixture(scope="session")
def chart_cluster() -> Iterator[RealCluster]:
    """A control plane for the chart alone. The chart is cluster-wide (CRDs, ClusterRoles aggregated into
    admin/edit/view, an operator that watches every namespace and puts its finalizer on every kleinstyle object), so
    it gets a cluster where no other test's objects are reconciled and no other test's node runs its pods."""
    yield from started_cluster(helm=True)


@pytest.fixture(scope="session")
def chart_release(chart_cluster: RealCluster, tmp_path_factory: pytest.TempPathFactory) -> Release:
    """The chart installed by `helm install --create-namespace` with PLATFORM_VALUES, its CRDs Established and its
    tenant roles aggregated into edit and view (the controller-manager does that a moment after the install)."""
    release = install_chart(
        chart_cluster,
        CHART,
        PLATFORM_VALUES,
        tmp_path_factory.mktemp("helm"),
        name=RELEASE,
        namespace=RELEASE_NAMESPACE,
    )
    chart_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRDS))

    def aggregated(role: str) -> bool:
        _, body = chart_cluster.api("GET", f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{role}")
        return any("kleinstyle.dev" in rule.get("apiGroups", []) for rule in body.get("rules") or [])

    for role in ("admin", "edit", "view"):
        wait_for(f"the chart's tenant roles aggregated into {role}", lambda role=role: aggregated(role))
    return release


@pytest.fixture(scope="session")
def tenants(chart_release: Release, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tenant]:
    """TENANTS: each user, signing in with a client certificate of the cluster's CA, bound by one RoleBinding to
    Kubernetes' own edit or view in one namespace, and holding nothing more."""
    cluster, folder = chart_release.cluster, tmp_path_factory.mktemp("tenants")
    found = {}
    for name, (namespace, role) in TENANTS.items():
        ensure_namespace(cluster, namespace)
        bind(cluster, namespace, role, name)
        found[name] = Tenant(user(cluster, name, namespace, folder), namespace, role)
    for t in found.values():  # RBAC's cache takes the bindings a moment later
        wait_for(f"{t.who.name}'s binding", lambda t=t: t.who.can_i("get", "StyleBoard", t.namespace))
    return found


@pytest.fixture
def chart_operator(chart_release: Release, tmp_path: Path) -> Iterator[OperatorProcess]:
    """The operator as the chart's Deployment runs it, with a token of the chart's ServiceAccount as its only
    credential; stopped after the test. It watches the whole cluster, as the chart's default values say."""
    account = service_account(chart_release.cluster, chart_release.namespace, chart_release.fullname, tmp_path)
    operator = OperatorProcess(chart_release, account, tmp_path).start()
    try:
        yield operator
    finally:
        operator.stop()
