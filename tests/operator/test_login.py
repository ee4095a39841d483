"""The operator logs in as its pod's ServiceAccount wherever the pod's files are: at the fixed in-cluster paths in a
real pod, under KLEINSTYLE_ROOTFS in a pod the dev cluster's node agent runs as a process; and kopf's watches log in
the same way as the operator's own requests (one identity, not two)."""

from __future__ import annotations

from pathlib import Path

import kopf
import pytest
from kleinstyle.contract.pod import ROOTFS_ENV, SERVICE_ACCOUNT_CA, SERVICE_ACCOUNT_TOKEN
from kleinstyle.operator.kube import in_cluster_config, login

CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.fixture
def pod_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A pod's root as the node agent lays it out: the projected token and CA under KLEINSTYLE_ROOTFS."""
    for pod_path, text in ((SERVICE_ACCOUNT_TOKEN, "token-of-the-operator\n"), (SERVICE_ACCOUNT_CA, CA)):
        local = tmp_path / pod_path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(text, encoding="utf-8")
    monkeypatch.setenv(ROOTFS_ENV, str(tmp_path))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    return tmp_path


def test_kopf_logs_in_with_the_pods_token_under_its_root(pod_files: Path) -> None:
    info = login(settings=kopf.OperatorSettings(), logger=None)
    assert info is not None
    assert (info.server, info.scheme, info.token) == ("https://127.0.0.1:6443", "bearer", "token-of-the-operator")
    assert info.ca_path == str(pod_files / SERVICE_ACCOUNT_CA.lstrip("/"))


def test_outside_a_pod_there_is_no_in_cluster_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ROOTFS_ENV, str(tmp_path))  # no token there
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert in_cluster_config() is None
