"""The chart's ValidatingAdmissionPolicy on the real API server: the operator's token writes kleinstyle's objects and
nothing else that RBAC alone would let it write (templates/admission-policy.yaml).

A cluster-wide install must create Jobs, ServiceAccounts, Roles and RoleBindings in every namespace, and RBAC cannot
narrow that to the operator's own objects. Here the operator's own ServiceAccount token, as anyone who stole it would
hold it, tries what the operator never does; the policy refuses each, while what the operator does still passes
(tests/cluster/test_chart_install.py runs the whole operator under the same policy) and nobody else is looked at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kleinstyle.operator.naming import owner_labels

from .rbac import Identity, Release, ensure_namespace, path, service_account, wait_for

NAMESPACE = "policy-team"
LABELS = owner_labels("StyleBoard", "uid-policy")


@pytest.fixture(scope="module")
def operator_token(chart_release: Release, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """The operator's ServiceAccount token, once the API server enforces the policy (it compiles a new policy and
    binding a moment after they are created)."""
    ensure_namespace(chart_release.cluster, NAMESPACE)
    folder = tmp_path_factory.mktemp("policy")
    token = service_account(chart_release.cluster, chart_release.namespace, chart_release.fullname, folder)
    probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("policy-probe", labels=None)}

    def enforced() -> bool:
        status, _ = token.request("POST", path("ConfigMap", NAMESPACE), probe)
        if status == 201:
            token.request("DELETE", path("ConfigMap", NAMESPACE, "policy-probe"))
        return status == 403

    wait_for("the chart's admission policy in force", enforced, timeout=30)
    return token


def meta(name: str, labels: dict[str, str] | None = LABELS) -> dict[str, Any]:
    return {"name": name, "namespace": NAMESPACE, **({"labels": labels} if labels else {})}


def job(name: str, account: str, volumes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    pod = {
        "serviceAccountName": account,
        "restartPolicy": "Never",
        "containers": [{"name": "c", "image": "busybox", "command": ["true"]}],
        **({"volumes": volumes} if volumes else {}),
    }
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta(name), "spec": {"template": {"spec": pod}}}


def refused(answer: tuple[int, Any], words: str) -> bool:
    status, body = answer
    return status == 403 and "denied request" in body.get("message", "") and words in body["message"]


def test_the_operators_token_writes_only_objects_labelled_as_its_own(operator_token: Identity) -> None:
    bare = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("someone-elses", labels=None)}
    assert refused(operator_token.request("POST", path("ConfigMap", NAMESPACE), bare), "labelled as its own")
    own = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("bd9-prepare-0123456789")}
    assert operator_token.request("POST", path("ConfigMap", NAMESPACE), own)[0] == 201
    assert operator_token.request("DELETE", path("ConfigMap", NAMESPACE, "bd9-prepare-0123456789"))[0] == 200


def test_its_jobs_run_as_a_runner_and_mount_no_host_path(operator_token: Identity) -> None:
    jobs = path("Job", NAMESPACE)
    assert refused(operator_token.request("POST", jobs, job("as-default", "default")), "run's ServiceAccount")
    host = [{"name": "root", "hostPath": {"path": "/"}}]
    assert refused(operator_token.request("POST", jobs, job("on-host", "bd9-prepare-runner", host)), "host path")
    assert operator_token.request("POST", jobs, job("bd9-prepare-0123456789", "bd9-prepare-runner"))[0] == 201
    operator_token.request("DELETE", path("Job", NAMESPACE, "bd9-prepare-0123456789") + "?propagationPolicy=Background")


def test_its_roles_and_bindings_grant_nothing_beyond_a_run(chart_release: Release, operator_token: Identity) -> None:
    rbac = "rbac.authorization.k8s.io/v1"
    # Rights the operator holds itself (RBAC would let it grant them): reading every ConfigMap of the namespace.
    configmaps = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}
    role = {"apiVersion": rbac, "kind": "Role", "metadata": meta("bd9-prepare-runner"), "rules": [configmaps]}
    assert refused(operator_token.request("POST", path("Role", NAMESPACE), role), "kleinstyle objects only")
    # The operator's own ClusterRole, bound to a runner: RBAC allows it (the operator holds every right in it), and
    # the runner's pod would then act as the operator in this namespace.
    admin = {
        "apiVersion": rbac,
        "kind": "RoleBinding",
        "metadata": meta("bd9-prepare-runner"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": chart_release.fullname},
        "subjects": [{"kind": "ServiceAccount", "name": "bd9-prepare-runner", "namespace": NAMESPACE}],
    }
    assert refused(operator_token.request("POST", path("RoleBinding", NAMESPACE), admin), "binds a run's Role")
    # A run's own Role (what the operator makes), bound to another account than the run's.
    own = {"apiGroups": ["kleinstyle.dev"], "resources": ["styleboards"], "resourceNames": ["bd9"], "verbs": ["get"]}
    role = {**role, "rules": [own]}
    assert operator_token.request("POST", path("Role", NAMESPACE), role)[0] == 201
    other = {**admin, "roleRef": {**admin["roleRef"], "kind": "Role", "name": "bd9-prepare-runner"}}
    other["subjects"] = [{"kind": "ServiceAccount", "name": "default", "namespace": NAMESPACE}]
    assert refused(operator_token.request("POST", path("RoleBinding", NAMESPACE), other), "binds a run's Role")


def test_nobody_else_is_looked_at(chart_release: Release, tmp_path: Path) -> None:
    """The policy matches the operator's username only: the admin (and every tenant) writes as before."""
    ensure_namespace(chart_release.cluster, NAMESPACE)
    bare = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("admins-own", labels=None)}
    status, body = chart_release.cluster.api("POST", path("ConfigMap", NAMESPACE), bare)
    assert status == 201, body
