"""The control plane itself: pinned versions, the CRDs Established, RBAC and tokens on, Jobs reaching the scheduler.

What later steps rely on (the fake node agent, the chart, the operator under its RBAC) is checked here first, so a
broken build or launcher fails with a clear message rather than somewhere deep in an operator test.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from kleinstyle.devcluster.controlplane import KUBE_VERSION, RealCluster

from .conftest import CRDS


def _wait(what: str, probe: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := probe()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s"
        time.sleep(0.2)
    return result


def test_server_and_clients_report_the_pinned_versions(real_cluster: RealCluster) -> None:
    status, version = real_cluster.api("GET", "/version")
    assert status == 200
    assert (version["gitVersion"], version["major"], version["minor"]) == (KUBE_VERSION, "1", "37")

    versions = json.loads(real_cluster.kubectl("version", "-o", "json").stdout)
    assert versions["clientVersion"]["gitVersion"] == KUBE_VERSION
    assert versions["serverVersion"]["gitVersion"] == KUBE_VERSION


def test_etcd_and_helm_are_the_pinned_versions(real_cluster: RealCluster) -> None:
    def run(*args: str) -> str:
        return subprocess.run(
            [str(real_cluster.bin_dir / args[0]), *args[1:]], capture_output=True, text=True, check=True
        ).stdout

    assert "etcd Version: 3.7.0" in run("etcd", "--version")
    assert run("helm", "version", "--short").strip() == "v4.3.2"


def test_crds_are_established(crds_applied: RealCluster) -> None:
    for path in sorted(CRDS.glob("*.yaml")):
        name = yaml.safe_load(path.read_text(encoding="utf-8"))["metadata"]["name"]
        status, crd = crds_applied.api("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        assert status == 200, crd
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True", (name, crd["status"])
        assert conditions.get("NamesAccepted") == "True", (name, crd["status"])
    # Discovery serves them: kubectl finds each kind by its plural.
    listed = crds_applied.kubectl("get", "styleboards,styleloras,generationjobs,lorafusions", "-A", "-o", "name")
    assert listed.returncode == 0


def test_crds_apply_again_without_conflict(crds_applied: RealCluster) -> None:
    """A second server-side apply by the same manager is a no-op, as an upgrade with unchanged CRDs must be."""
    again = crds_applied.kubectl("apply", "--server-side", "-f", str(CRDS))
    assert all(line.endswith("serverside-applied") for line in again.stdout.splitlines()), again.stdout


def test_rbac_is_enforced_and_tokens_are_issued(real_cluster: RealCluster, make_namespace: Callable[..., str]) -> None:
    namespace = make_namespace()
    account = f"system:serviceaccount:{namespace}:default"
    _wait(
        "the namespace's default ServiceAccount",
        lambda: real_cluster.api("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/default")[0] == 200,
    )
    denied = real_cluster.kubectl("auth", "can-i", "list", "pods", "-n", namespace, "--as", account, check=False)
    assert denied.stdout.strip() == "no", denied

    token = real_cluster.kubectl("create", "token", "default", "-n", namespace, "--duration=10m").stdout.strip()
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
    status, reviewed = real_cluster.api("POST", "/apis/authentication.k8s.io/v1/tokenreviews", review)
    assert status == 201, reviewed
    assert reviewed["status"]["authenticated"] is True
    assert reviewed["status"]["user"]["username"] == account


def test_pods_get_the_root_ca_configmap(real_cluster: RealCluster, make_namespace: Callable[..., str]) -> None:
    """A projected service-account volume needs kube-root-ca.crt in the pod's namespace; it must match our CA."""
    namespace = make_namespace()
    configmap = _wait(
        "kube-root-ca.crt",
        lambda: (
            (r := real_cluster.api("GET", f"/api/v1/namespaces/{namespace}/configmaps/kube-root-ca.crt"))[0] == 200
            and r[1]
        ),
    )
    assert configmap["data"]["ca.crt"].strip() == Path(real_cluster.ca_file).read_text(encoding="utf-8").strip()


def test_a_job_makes_a_pod_that_stays_unschedulable(
    real_cluster: RealCluster, make_namespace: Callable[..., str]
) -> None:
    """The job controller creates the pod and the scheduler sees it; with no node (no kubelet yet) it stays Pending."""
    namespace = make_namespace()
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "probe"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "busybox:1.37", "command": ["true"]}],
                }
            },
        },
    }
    status, created = real_cluster.api("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", job)
    assert status == 201, created

    def unschedulable() -> dict[str, Any] | None:
        _, pods = real_cluster.api("GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector=job-name%3Dprobe")
        pod: dict[str, Any]
        for pod in pods.get("items", []):
            for condition in pod.get("status", {}).get("conditions", []):
                if condition["type"] == "PodScheduled" and condition.get("reason") == "Unschedulable":
                    return pod
        return None

    pod = _wait("the Job's pod, marked Unschedulable by the scheduler", unschedulable)
    assert pod["status"]["phase"] == "Pending"
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "Job"
