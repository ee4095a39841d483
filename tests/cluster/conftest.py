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

REPO = Path(__file__).parents[2]
CRDS = REPO / "crds"


@pytest.fixture(scope="session")
def real_cluster() -> Iterator[RealCluster]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(
            f"no real control plane: `make controlplane` builds Kubernetes {KUBE_VERSION} into "
            f"{cache_dir() / 'controlplane' / KUBE_VERSION / 'bin'} (once per machine; docs/real-cluster.md)"
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
