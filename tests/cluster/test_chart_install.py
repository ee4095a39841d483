"""The chart installed with the real helm, and the operator running under exactly the chart's RBAC.

tests/chart/ renders the chart offline; here the real API server decides. helm installs the chart as a platform team
would; its CRDs become Established and every object it made is there (the Deployment's pod waits for a node: there is
no kubelet yet). Then `kleinstyle operator`, run with the Deployment's args and ConfigMap and a token of the chart's
ServiceAccount as its only credential, takes a StyleBoard through a whole run - children, status, Events, a run
superseded, a Job failed, deletion - and its log, at DEBUG so it holds every response's status, shows no refusal.
A copy of the chart's rules with one grant taken away shows that the scan sees a refusal where there is one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kleinstyle.devcluster.controlplane import RealCluster
from kleinstyle.operator.config import OperatorConfig
from kleinstyle.operator.kube import FIELD_MANAGER
from kleinstyle.operator.naming import GENERATION

from .conftest import CHART, CRDS, PLATFORM_VALUES, REPO
from .rbac import (
    OperatorProcess,
    Release,
    ensure_namespace,
    helm,
    install_chart,
    path,
    rules_without,
    service_account,
    wait_for,
)

EXAMPLES = REPO / "examples"
# Pod Security's strictest level, as platform teams enforce it on tenant namespaces and on the operator's own.
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
RUNNER_KINDS = ("ServiceAccount", "Role", "RoleBinding")


def get(cluster: RealCluster, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
    status, body = cluster.api("GET", path(kind, namespace, name))
    assert status in (200, 404), body
    return body if status == 200 else None


def apply(cluster: RealCluster, namespace: str, *examples: str) -> None:
    files = [arg for example in examples for arg in ("-f", str(EXAMPLES / example))]
    cluster.kubectl("apply", "-n", namespace, *files)


def status_of(cluster: RealCluster, kind: str, namespace: str, name: str) -> dict[str, Any]:
    found = get(cluster, kind, namespace, name)
    assert found is not None, f"{kind} {namespace}/{name} is gone"
    status: dict[str, Any] = found.get("status") or {}
    return status


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def unschedulable_pods(cluster: RealCluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    """The pods `selector` (a URL-encoded label selector) picks that the scheduler marked Unschedulable (no node)."""
    _, pods = cluster.api("GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector={selector}")
    return [
        pod
        for pod in pods.get("items", [])
        if condition(pod.get("status") or {}, "PodScheduled").get("reason") == "Unschedulable"
    ]


def events_for(cluster: RealCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    _, events = cluster.api("GET", f"/api/v1/namespaces/{namespace}/events?fieldSelector=involvedObject.name%3D{name}")
    return list(events.get("items", []))


def assert_no_refusals(operator: OperatorProcess) -> None:
    refused = operator.refusals()
    assert not refused, "the API server refused the operator under the chart's RBAC:\n" + "\n".join(refused)


# --- helm install ----------------------------------------------------------------------------------------------------


def test_helm_installs_the_release_with_every_object(chart_release: Release) -> None:
    cluster, ns, name = chart_release.cluster, chart_release.namespace, chart_release.fullname
    info = json.loads(chart_release.helm("status", chart_release.name, "-n", ns, "-o", "json").stdout)
    assert info["info"]["status"] == "deployed"
    # Every object of the rendered manifest exists on the server (kubectl get fails naming any missing one).
    manifest = chart_release.helm("get", "manifest", chart_release.name, "-n", ns).stdout
    listed = cluster.kubectl("get", "-f", "-", "-o", "name", input=manifest).stdout.split()
    assert len(listed) == sum(1 for doc in yaml.safe_load_all(manifest) if doc)

    for crd_file in sorted(CRDS.glob("*.yaml")):
        crd_name = yaml.safe_load(crd_file.read_text(encoding="utf-8"))["metadata"]["name"]
        _, crd = cluster.api("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd_name}")
        assert condition(crd["status"], "Established").get("status") == "True", crd_name

    assert get(cluster, "ServiceAccount", ns, name) is not None
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    _, binding = cluster.api("GET", f"{rbac}/clusterrolebindings/{name}")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": ns}]
    for role in (name, f"{name}-edit", f"{name}-view"):
        assert cluster.api("GET", f"{rbac}/clusterroles/{role}")[0] == 200, role

    configmap = get(cluster, "ConfigMap", ns, name)
    assert configmap is not None
    config = OperatorConfig.model_validate(yaml.safe_load(configmap["data"]["operator.yaml"]))
    platform = PLATFORM_VALUES["config"]
    assert (config.runtime_image, config.default_node_pool) == (platform["runtimeImage"], "h100")
    assert config.training_limits.max_steps == platform["trainingLimits"]["maxSteps"]

    status, deployment = cluster.api("GET", f"/apis/apps/v1/namespaces/{ns}/deployments/{name}")
    assert status == 200, deployment
    pod_spec = deployment["spec"]["template"]["spec"]
    assert pod_spec["serviceAccountName"] == name
    assert pod_spec["containers"][0]["image"] == "registry.example.com/platform/kleinstyle-operator:0.1.0"
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "platform"

    # The Deployment's pod exists and waits for a node, which there is none of yet (no kubelet); it passes Pod
    # Security's restricted level: labelling the namespace warns of no pod that violates it, and a new pod is admitted.
    labelled = cluster.kubectl("label", "namespace", ns, *(f"{k}={v}" for k, v in RESTRICTED.items()))
    assert "violate" not in labelled.stderr, labelled.stderr
    selector = f"app.kubernetes.io%2Finstance%3D{chart_release.name}"
    (pod,) = wait_for("the operator's pod, Unschedulable", lambda: unschedulable_pods(cluster, ns, selector))
    assert pod["status"]["phase"] == "Pending"
    cluster.kubectl("delete", "pod", pod["metadata"]["name"], "-n", ns, "--wait=false")
    wait_for(
        "a new pod, admitted under restricted",
        lambda: [
            p for p in unschedulable_pods(cluster, ns, selector) if p["metadata"]["name"] != pod["metadata"]["name"]
        ],
    )


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({}, id="cluster-wide"),
        pytest.param(
            {
                "watchNamespaces": ["team-a", "team-b"],
                "artifacts": {"createClaim": True},
                "metrics": {"dashboard": {"enabled": True}},
            },
            id="per-namespace",
        ),
    ],
)
def test_helm_template_passes_a_server_side_dry_run(
    chart_release: Release, values: dict[str, Any], tmp_path: Path
) -> None:
    """What GitOps applies instead of `helm install`: `helm template` output, admitted by the real server as it is
    (a release of another name in another namespace, so every object is created, not merely compared)."""
    cluster = chart_release.cluster
    namespace = ensure_namespace(cluster, "kleinstyle-preview")
    for watched in values.get("watchNamespaces", []):
        ensure_namespace(cluster, watched)
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump({**PLATFORM_VALUES, **values}), encoding="utf-8")
    rendered = helm(
        cluster,
        chart_release.helm_env,
        "template",
        "preview",
        str(CHART),
        "-n",
        namespace,
        "--include-crds",
        "-f",
        str(values_file),
    ).stdout
    docs = [doc for doc in yaml.safe_load_all(rendered) if doc]
    # Every namespaced object names its namespace: piped to `kubectl apply` without -n, none lands in `default`.
    cluster_scoped = {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    cluster_scoped |= {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    unplaced = [
        f"{d['kind']}/{d['metadata']['name']}"
        for d in docs
        if d["kind"] not in cluster_scoped and not d["metadata"].get("namespace")
    ]
    assert not unplaced, unplaced
    applied = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)
    lines = applied.stdout.splitlines()
    assert len(lines) == len(docs), applied.stdout
    assert all(line.endswith("(server dry run)") for line in lines), applied.stdout
    kinds = {doc["kind"] for doc in docs}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "ConfigMap"} <= kinds
    assert ({"Role", "RoleBinding"} if values else {"ClusterRole", "ClusterRoleBinding"}) <= kinds


def test_a_per_namespace_install_confines_the_operator_to_its_namespaces(
    chart_release: Release, tmp_path: Path
) -> None:
    """With watchNamespaces the operator holds Roles in those namespaces only, and runs there under them alone (kopf
    watches namespace by namespace). The cluster-wide default's ServiceAccount, by contrast, may create Jobs (whose
    pods run as any ServiceAccount of their namespace), Roles and RoleBindings in every namespace, kube-system
    included: what docs/threat-model.md says a platform team weighs."""
    cluster = chart_release.cluster
    ns = ensure_namespace(cluster, "studio-scoped")
    values = {**PLATFORM_VALUES, "watchNamespaces": [ns], "rbac": {"create": True, "tenantRoles": False}}
    release = install_chart(cluster, CHART, values, tmp_path / "helm", name="scoped", namespace="kleinstyle-scoped")
    account = service_account(cluster, release.namespace, release.fullname, tmp_path)
    assert account.can_i("create", "Job", ns)
    for elsewhere in ("kube-system", release.namespace, "team-a"):
        assert not account.can_i("create", "Job", elsewhere), elsewhere
    assert not account.can_i("list", "StyleBoard", None)

    cluster_wide = service_account(cluster, chart_release.namespace, chart_release.fullname, tmp_path)
    for kind in ("Job", "RoleBinding", "Role", "ServiceAccount"):
        assert cluster_wide.can_i("create", kind, "kube-system"), kind

    operator = OperatorProcess(release, account, tmp_path).start()
    try:
        assert operator.command()[-2:] == ["--namespace", ns]
        apply(cluster, ns, "styleboard.yaml")
        job = wait_for("the board's Job", lambda: status_of(cluster, "StyleBoard", ns, "bd9").get("jobName"))
        assert get(cluster, "Job", ns, job) is not None
        cluster.kubectl("delete", "styleboard", "bd9", "-n", ns, "--wait=false")
        wait_for("the board released", lambda: get(cluster, "StyleBoard", ns, "bd9") is None)
    finally:
        operator.stop()
    assert_no_refusals(operator)


# --- the operator as the chart's ServiceAccount ----------------------------------------------------------------------


def test_the_operators_credential_is_the_service_account_alone(chart_release: Release, tmp_path: Path) -> None:
    """The kubeconfig the operator gets authenticates as the chart's ServiceAccount, and what that may do stops where
    the chart says: no Secrets, no pods of its own, no RBAC beyond creating the per-run Roles."""
    ns, name = chart_release.namespace, chart_release.fullname
    account = service_account(chart_release.cluster, ns, name, tmp_path)
    assert account.kubeconfig is not None
    user = yaml.safe_load(account.kubeconfig.read_text(encoding="utf-8"))["users"][0]["user"]
    assert set(user) == {"token"}
    whoami = json.loads(account.kubectl("auth", "whoami", "-o", "json").stdout)
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:{name}"

    assert account.can_i("create", "Job", "team-a")
    assert account.can_i("patch", "StyleLoRA", "team-a", subresource="status")
    for verb, kind, subresource in [
        ("get", "Secret", ""),
        ("list", "Secret", ""),
        ("create", "Pod", ""),
        ("update", "StyleLoRA", ""),  # kopf patches; a full update could rewrite a tenant's spec
        ("update", "Job", ""),  # a Job is never re-applied (Kueue mutates it)
        ("deletecollection", "Job", ""),
        ("update", "StyleLoRA", "status"),
    ]:
        assert not account.can_i(verb, kind, "team-a", subresource=subresource), (verb, kind, subresource)


def test_a_styleboard_runs_under_the_charts_rbac(chart_operator: OperatorProcess) -> None:
    cluster = chart_operator.release.cluster
    ns = ensure_namespace(cluster, "studio-run", RESTRICTED)  # the run's pod must pass it to be created at all
    apply(cluster, ns, "styleboard.yaml", "stylelora.yaml")
    board = get(cluster, "StyleBoard", ns, "bd9")
    assert board is not None

    wait_for("the board's Job in status", lambda: status_of(cluster, "StyleBoard", ns, "bd9").get("jobName"))
    status = status_of(cluster, "StyleBoard", ns, "bd9")
    run, job_name = status["runHash"], status["jobName"]
    assert job_name == f"bd9-prepare-{run}"
    assert condition(status, "JobCreated") | {"lastTransitionTime": None} == {
        "type": "JobCreated",
        "status": "True",
        "reason": "Created",
        "message": f"Job {job_name}",
        "observedGeneration": 1,
        "lastTransitionTime": None,
    }
    assert condition(status, "Ready")["reason"] not in ("ApiError", "ReconcileError"), status

    # Every child of the run, made by the operator's own identity and controlled by the board.
    children = {
        "ServiceAccount": "bd9-prepare-runner",
        "Role": "bd9-prepare-runner",
        "RoleBinding": "bd9-prepare-runner",
    }
    children |= {"ConfigMap": job_name, "Job": job_name}
    for kind, name in children.items():
        child = get(cluster, kind, ns, name)
        assert child is not None, f"no {kind} {name}"
        (owner,) = child["metadata"]["ownerReferences"]
        assert (owner["uid"], owner["controller"]) == (board["metadata"]["uid"], True), kind
        assert child["metadata"]["managedFields"][0]["manager"] == FIELD_MANAGER, kind
    wait_for("the run's pod marked Unschedulable", lambda: unschedulable_pods(cluster, ns, f"job-name%3D{job_name}"))
    # The job controller counts the unscheduled pod as active (Job.status.active 1), yet the run waits for a node:
    # status says so, with the scheduler's reason, once the operator has seen the pod.
    status = wait_for(
        "status past JobCreated",
        lambda: (
            (s := status_of(cluster, "StyleBoard", ns, "bd9")) and condition(s, "Ready")["reason"] != "JobCreated" and s
        ),
    )
    assert (status["phase"], condition(status, "Ready")["reason"]) == ("Pending", "Unschedulable"), status
    assert any(e["reason"] == "JobCreated" for e in events_for(cluster, ns, "bd9")), "no Event from the operator"

    wait_for("the LoRA waiting", lambda: status_of(cluster, "StyleLoRA", ns, "bd9-lora").get("phase") == "Waiting")
    lora = status_of(cluster, "StyleLoRA", ns, "bd9-lora")
    assert condition(lora, "DependenciesReady")["status"] == "False"

    # The run's ServiceAccount may write its owner's status, by name, and nothing else.
    runner = service_account(cluster, ns, "bd9-prepare-runner", chart_operator.folder)
    assert runner.can_i("patch", "StyleBoard", ns, subresource="status", name="bd9")
    assert runner.can_i("get", "StyleBoard", ns, name="bd9")
    assert not runner.can_i("patch", "StyleBoard", ns, subresource="status", name="other")
    assert not runner.can_i("patch", "StyleBoard", ns, name="bd9")
    assert not runner.can_i("get", "Secret", ns)
    assert_no_refusals(chart_operator)


def test_a_run_is_annotated_superseded_failed_and_cleaned_up_under_the_charts_rbac(
    chart_operator: OperatorProcess,
) -> None:
    """Every other call the operator makes: a Job's annotation patched, children deleted when a spec edit supersedes
    the run, the runner's RBAC deleted when a run fails, the finalizer released."""
    cluster = chart_operator.release.cluster
    ns = ensure_namespace(cluster, "studio-lifecycle")
    apply(cluster, ns, "styleboard.yaml")
    first = wait_for("the first run", lambda: status_of(cluster, "StyleBoard", ns, "bd9").get("jobName"))

    # An edit that plans the same run keeps it: its Job is annotated with the new generation (jobs: patch).
    cluster.kubectl(
        "patch", "styleboard", "bd9", "-n", ns, "--type=merge", "-p", '{"spec":{"artifactPolicy":"Delete"}}'
    )
    wait_for(
        "the Job annotated with generation 2",
        lambda: (
            ((get(cluster, "Job", ns, first) or {}).get("metadata", {}).get("annotations") or {}).get(GENERATION) == "2"
        ),
    )

    # An edit that changes the run supersedes it: the old Job and ConfigMap are deleted (delete).
    cluster.kubectl(
        "patch", "styleboard", "bd9", "-n", ns, "--type=merge", "-p", '{"spec":{"triggerWord":"bd10style"}}'
    )
    second = wait_for(
        "the second run", lambda: (j := status_of(cluster, "StyleBoard", ns, "bd9").get("jobName")) != first and j
    )
    wait_for(
        "the first run's Job and ConfigMap deleted",
        lambda: not get(cluster, "Job", ns, first) and not get(cluster, "ConfigMap", ns, first),
    )
    assert any(e["reason"] == "Superseded" for e in events_for(cluster, ns, "bd9"))

    # A Job past its deadline fails; the operator ends the run, deleting the runner's ServiceAccount, Role and
    # RoleBinding.
    cluster.kubectl("patch", "job", second, "-n", ns, "--type=merge", "-p", '{"spec":{"activeDeadlineSeconds":1}}')
    wait_for(
        "the board Failed", lambda: status_of(cluster, "StyleBoard", ns, "bd9").get("phase") == "Failed", timeout=30
    )
    failed = status_of(cluster, "StyleBoard", ns, "bd9")
    assert condition(failed, "Ready")["reason"] == "DeadlineExceeded", failed
    wait_for(
        "the runner's RBAC deleted", lambda: not any(get(cluster, k, ns, "bd9-prepare-runner") for k in RUNNER_KINDS)
    )

    # Deletion: the cleanup handler deletes the children and releases the finalizer (patch on the kind).
    cluster.kubectl("delete", "styleboard", "bd9", "-n", ns, "--wait=false")
    wait_for("the board gone", lambda: get(cluster, "StyleBoard", ns, "bd9") is None)
    wait_for(
        "its Job and ConfigMap gone",
        lambda: not get(cluster, "Job", ns, second) and not get(cluster, "ConfigMap", ns, second),
    )
    assert_no_refusals(chart_operator)


# The chart's rules less one grant, and what the log then shows: a call of the operator's, a watch of kopf's, and
# `get` on the kind and on its status, which the operator never calls but grants in each run's Role (RBAC lets no
# one grant what it does not hold).
NARROWED = {
    "jobs-create": (("jobs", "create"), 'cannot create resource "jobs"'),
    "configmaps-watch": (("configmaps", "watch"), 'cannot watch resource "configmaps"'),
    "status-get": (("styleboards/status", "get"), "is attempting to grant RBAC permissions not currently held"),
    "kind-get": (("styleboards", "get"), "is attempting to grant RBAC permissions not currently held"),
}


@pytest.fixture
def narrowed_operator(
    chart_release: Release, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[OperatorProcess]:
    """The operator under a copy of the chart's ClusterRole with one grant taken away, as an account of its own."""
    resource, verb = request.param
    cluster, ns = chart_release.cluster, chart_release.namespace
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    _, chart_role = cluster.api("GET", f"{rbac}/clusterroles/{chart_release.fullname}")
    name = f"kleinstyle-without-{verb}-{resource.replace('/', '-')}"
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name}}
    role["rules"] = rules_without(chart_role["rules"], resource, verb)
    assert role["rules"] != chart_role["rules"], f"the chart grants no {verb} on {resource}"
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
    }
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}
    for url, body in [
        (f"/api/v1/namespaces/{ns}/serviceaccounts", account),
        (f"{rbac}/clusterroles", role),
        (f"{rbac}/clusterrolebindings", binding),
    ]:
        status, answer = cluster.api("POST", url, body)
        assert status in (201, 409), answer
    operator = OperatorProcess(chart_release, service_account(cluster, ns, name, tmp_path), tmp_path).start()
    try:
        yield operator
    finally:
        operator.stop()


@pytest.mark.parametrize(
    ("narrowed_operator", "shown"), list(NARROWED.values()), ids=list(NARROWED), indirect=["narrowed_operator"]
)
def test_the_log_scan_sees_each_grant_taken_from_the_chart(narrowed_operator: OperatorProcess, shown: str) -> None:
    """The control: the same run under the chart's rules less one grant is refused, and the scan sees it."""
    cluster = narrowed_operator.release.cluster
    ns = ensure_namespace(cluster, f"studio-{narrowed_operator.account.name.rpartition(':')[2]}")
    apply(cluster, ns, "styleboard.yaml")

    def seen() -> bool:
        return any(shown in line.replace('\\"', '"') for line in narrowed_operator.refusals())

    wait_for(f"the log to show {shown!r}", seen)


def test_deleting_a_namespace_with_runs_in_it_is_no_error(chart_operator: OperatorProcess) -> None:
    """The namespace controller deletes a namespace's Jobs and ConfigMaps before the kleinstyle objects its
    finalizer holds: the operator, woken by the deletions, must not recreate them and call the refusal
    (NamespaceTerminating) an error; it lets the objects go, and the namespace with them."""
    cluster = chart_operator.release.cluster
    ns = ensure_namespace(cluster, "studio-gone")
    apply(cluster, ns, "styleboard.yaml")
    wait_for("the board's Job", lambda: status_of(cluster, "StyleBoard", ns, "bd9").get("jobName"))
    assert cluster.api("DELETE", f"/api/v1/namespaces/{ns}")[0] == 200
    wait_for("the namespace gone", lambda: cluster.api("GET", f"/api/v1/namespaces/{ns}")[0] == 404, timeout=120)
    errors = [line for line in chart_operator.text().splitlines() if '"ERROR"' in line and ns in line]
    assert errors == [], errors[:3]


def test_a_generationjob_at_the_crds_limits_is_created_and_deleted_cleanly(chart_operator: OperatorProcess) -> None:
    """64 prompts of 700 CJK characters are within the CRD's limits. kopf used to copy the spec into an annotation
    (six bytes a character, escaped): past the 256 KiB the API allows, its patch was refused, and on delete the
    finalizer stayed, the object Terminating for ever."""
    cluster = chart_operator.release.cluster
    ns = ensure_namespace(cluster, "studio-large")
    large = {
        "apiVersion": "kleinstyle.dev/v1alpha1",
        "kind": "GenerationJob",
        "metadata": {"name": "large", "namespace": ns},
        "spec": {"loras": [{"name": "absent"}], "prompts": ["漢" * 700] * 64},
    }
    status, body = cluster.api("POST", path("GenerationJob", ns), large)
    assert status == 201, body
    # The operator takes it in (its finalizer, a status saying what it waits for), which patches the object.
    waiting = wait_for("the job Waiting", lambda: status_of(cluster, "GenerationJob", ns, "large").get("phase"))
    assert waiting == "Waiting"

    def finalized() -> dict[str, Any] | None:
        found = get(cluster, "GenerationJob", ns, "large")
        return found if found and "kleinstyle.dev/cleanup" in found["metadata"].get("finalizers", []) else None

    found = wait_for("kopf's finalizer on the job", finalized)
    assert sum(len(v) for v in (found["metadata"].get("annotations") or {}).values()) < 4096
    assert cluster.api("DELETE", path("GenerationJob", ns, "large"))[0] == 200
    wait_for("the job gone", lambda: get(cluster, "GenerationJob", ns, "large") is None, timeout=30)
    assert_no_refusals(chart_operator)


def test_a_limits_cpu_quota_admits_the_runs_pod(chart_operator: OperatorProcess) -> None:
    """A namespace ResourceQuota on limits.cpu refuses a pod that sets no CPU limit: the Job's pod would never be
    created, and status would only say the run waits for a pod. Every Job pod carries one."""
    cluster = chart_operator.release.cluster
    ns = ensure_namespace(cluster, "studio-quota")
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "compute", "namespace": ns},
        "spec": {"hard": {"limits.cpu": "64", "limits.memory": "512Gi", "requests.cpu": "64"}},
    }
    assert cluster.api("POST", f"/api/v1/namespaces/{ns}/resourcequotas", quota)[0] == 201
    apply(cluster, ns, "styleboard.yaml")
    job_name = wait_for("the board's Job", lambda: status_of(cluster, "StyleBoard", ns, "bd9").get("jobName"))
    pods = wait_for(
        "the Job's pod created under the quota",
        lambda: cluster.api("GET", f"/api/v1/namespaces/{ns}/pods?labelSelector=job-name%3D{job_name}")[1]["items"],
    )
    limits = pods[0]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["cpu"] and limits["memory"]
    _, used = cluster.api("GET", f"/api/v1/namespaces/{ns}/resourcequotas/compute")
    assert used["status"]["used"]["limits.cpu"] != "0"


def test_the_operator_watches_only_its_own_children(chart_operator: OperatorProcess) -> None:
    """The operator's lists and watches of Jobs, ConfigMaps, pods and RBAC ask the API server for its labelled
    objects only (a server-side label selector, as the audit log shows each request's URI): not every Job and
    ConfigMap of the cluster, filtered in the operator's memory. The one other selector it lists by is the chart's
    models-pull Job and its pod, in a namespace where a run waits on them (operator/pulls.py)."""
    cluster = chart_operator.release.cluster
    account = f"system:serviceaccount:{chart_operator.release.namespace}:{chart_operator.release.fullname}"
    children = {"jobs", "configmaps", "pods", "serviceaccounts", "roles", "rolebindings"}

    def watched() -> dict[str, list[str]]:
        uris: dict[str, list[str]] = {}
        for event in cluster.audited():
            resource = (event.get("objectRef") or {}).get("resource")
            if event["user"]["username"] == account and event["verb"] in ("list", "watch") and resource in children:
                uris.setdefault(resource, []).append(event["requestURI"])
        return uris if set(uris) == children else {}

    uris = wait_for("the operator's watches of every child kind", watched, timeout=30)
    selector = re.compile(r"[?&]labelSelector=kleinstyle\.dev(%2F|/)owner-uid(&|$)")
    pull = re.compile(
        r"^/api(s/batch)?/v1/namespaces/[^/]+/(jobs|pods)\?labelSelector=app\.kubernetes\.io(%2F|/)component(%3D|=)models-pull$"
    )
    unselected = [uri for found in uris.values() for uri in found if not selector.search(uri) and not pull.match(uri)]
    assert unselected == [], unselected[:5]
