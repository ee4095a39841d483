"""The node agent on the real control plane: Nodes as the chart expects them, and Jobs that run.

The Job controller, scheduler and garbage collector are the real ones; the agent only does a kubelet's part, as
the node (system:node:NAME under the Node authorizer), so what passes here is what a kubelet-backed cluster does.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kleinstyle.devcluster.controlplane import RealCluster
from kleinstyle.devcluster.node_agent import NodeAgent, NodeSpec, chart_node_pool, default_nodes
from kleinstyle.operator.config import H200_POOL

CPU_NODE, GPU_NODE = (spec.name for spec in default_nodes())


@pytest.fixture(scope="module")
def agent(real_cluster: RealCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeAgent]:
    """One agent (its CPU and GPU node) for this module's tests; the Nodes go with it."""
    root = tmp_path_factory.mktemp("node-agent")
    with NodeAgent(real_cluster, root, heartbeat=1.0, restart_backoff=0.2) as running:
        yield running


def until(what: str, probe: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll `probe` until it returns something true; fail naming `what` and the last thing it returned."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s (last: {result!r})"
        time.sleep(0.1)


def get(cluster: RealCluster, path: str) -> dict[str, Any]:
    status, body = cluster.api("GET", path)
    assert status == 200, body
    found: dict[str, Any] = body
    return found


def create(cluster: RealCluster, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, created = cluster.api("POST", path, body)
    assert status == 201, created
    found: dict[str, Any] = created
    return found


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def job(name: str, script: str, **pod_spec: Any) -> dict[str, Any]:
    """A Job of one `python -c` pod, never retried (its first pod's end is the Job's)."""
    container = {"name": "main", "image": "runtime", "command": ["python", "-c", textwrap.dedent(script)]}
    container |= pod_spec.pop("container", {})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [container], **pod_spec}},
        },
    }


def run_job(cluster: RealCluster, namespace: str, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Create the Job, wait until it is Complete or Failed, and return it with its pod."""
    name = body["metadata"]["name"]
    create(cluster, f"/apis/batch/v1/namespaces/{namespace}/jobs", body)

    def finished() -> dict[str, Any] | None:
        found = job_of(cluster, namespace, name)
        return found if {"Complete", "Failed"} & conditions(found).keys() else None

    return until(f"Job {name} to finish", finished), pod_of(cluster, namespace, name)


def job_of(cluster: RealCluster, namespace: str, name: str) -> dict[str, Any]:
    found = get(cluster, f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
    found["status"]["conditions"] = [c for c in found["status"].get("conditions") or [] if c["status"] == "True"]
    return found


def pod_of(cluster: RealCluster, namespace: str, job_name: str) -> dict[str, Any]:
    listed = get(cluster, f"/api/v1/namespaces/{namespace}/pods?labelSelector=job-name%3D{job_name}")
    [pod] = listed["items"]
    found: dict[str, Any] = pod
    return found


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    return state


def claim(cluster: RealCluster, namespace: str, name: str) -> None:
    """A claim bound to a PersistentVolume of its own: the scheduler places no pod whose claim is unbound."""
    volume = f"{namespace}-{name}"
    create(
        cluster,
        "/api/v1/persistentvolumes",
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "hostPath": {"path": f"/unused/{volume}"},  # the agent keeps a claim's files under its root
                "claimRef": {"namespace": namespace, "name": name},
            },
        },
    )
    create(
        cluster,
        f"/api/v1/namespaces/{namespace}/persistentvolumeclaims",
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": volume,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    path = f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}"
    until(f"claim {name} bound", lambda: get(cluster, path)["status"].get("phase") == "Bound")


def test_nodes_register_ready_with_the_gpu_pools_labels_and_capacity(
    real_cluster: RealCluster, agent: NodeAgent
) -> None:
    assert chart_node_pool() == H200_POOL  # the chart's default pool is the operator's own default

    def node(name: str) -> dict[str, Any]:
        return get(real_cluster, f"/api/v1/nodes/{name}")

    for name in (CPU_NODE, GPU_NODE):
        # Ready, and no longer tainted not-ready: the node lifecycle controller believes the agent.
        until(
            f"{name} Ready and schedulable",
            lambda name=name: (
                conditions(node(name))["Ready"]["status"] == "True"
                and all(t["key"] != "node.kubernetes.io/not-ready" for t in node(name)["spec"].get("taints") or [])
            ),
        )
    gpu, cpu = node(GPU_NODE), node(CPU_NODE)
    assert H200_POOL.node_selector.items() <= gpu["metadata"]["labels"].items()
    assert gpu["status"]["allocatable"]["nvidia.com/gpu"] == gpu["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert {"key": "nvidia.com/gpu", "effect": "NoSchedule"} in gpu["spec"]["taints"]
    assert "nvidia.com/gpu" not in cpu["status"]["capacity"] and not cpu["spec"].get("taints")
    assert {"cpu", "memory", "pods"} <= cpu["status"]["allocatable"].keys()

    # The Lease and the Ready heartbeat are renewed (every second here).
    lease_path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{GPU_NODE}"
    lease = get(real_cluster, lease_path)
    assert lease["spec"]["holderIdentity"] == GPU_NODE
    beat = conditions(gpu)["Ready"]["lastHeartbeatTime"]
    until("a renewed lease", lambda: get(real_cluster, lease_path)["spec"]["renewTime"] != lease["spec"]["renewTime"])
    until("a fresh heartbeat", lambda: conditions(node(GPU_NODE))["Ready"]["lastHeartbeatTime"] != beat, timeout=5)

    # The agent's identity is the node's: the Node authorizer lets it read no Secret its pods do not use.
    cert, key = real_cluster.client_certificate(f"system:node:{CPU_NODE}", "system:nodes")
    seen = real_cluster.kubectl(
        "--client-certificate", str(cert), "--client-key", str(key), "auth", "whoami", "-o", "json"
    )
    assert json.loads(seen.stdout)["status"]["userInfo"]["username"] == f"system:node:{CPU_NODE}"
    refused = real_cluster.kubectl(
        "--client-certificate", str(cert), "--client-key", str(key), "get", "secrets", "-A", check=False
    )
    assert "Forbidden" in refused.stderr, refused.stderr


ENV_SCRIPT = """
import json, os, pathlib
root = pathlib.Path(os.environ["KLEINSTYLE_ROOTFS"])
(root / "data" / "out.txt").write_text("written by " + os.environ["POD_NAME"])
try:
    (root / "inputs" / "x").write_text("must not land")
    inputs = "written"
except OSError as exc:
    inputs = type(exc).__name__
print(json.dumps({"env": dict(os.environ), "inputs": inputs}))
"""


def test_a_job_writes_to_its_claim_and_sees_its_env(
    real_cluster: RealCluster, agent: NodeAgent, make_namespace: Callable[..., str]
) -> None:
    namespace = make_namespace()
    claim(real_cluster, namespace, "data")
    create(
        real_cluster,
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"mode": "fast"}},
    )
    create(
        real_cluster,
        f"/api/v1/namespaces/{namespace}/secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}},
    )
    inputs = agent.root / "volumes" / "data" / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)

    def field(path: str) -> dict[str, Any]:
        return {"valueFrom": {"fieldRef": {"fieldPath": path}}}

    env = [
        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "POD_NAME", **field("metadata.name")},
        {"name": "POD_NAMESPACE", **field("metadata.namespace")},
        {"name": "POD_UID", **field("metadata.uid")},
        {"name": "ACCOUNT", **field("spec.serviceAccountName")},
        {"name": "POD_IP", **field("status.podIP")},
    ]
    container = {
        "env": env,
        "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}},
        "volumeMounts": [
            {"name": "data", "mountPath": "/data", "subPath": "runs/one"},
            {"name": "data", "mountPath": "/inputs", "subPath": "inputs", "readOnly": True},
        ],
    }
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
    finished, pod = run_job(real_cluster, namespace, job("env", ENV_SCRIPT, container=container, volumes=volumes))

    assert "Complete" in conditions(finished), finished["status"]
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["spec"]["nodeName"] == CPU_NODE  # the GPU node's taint keeps it off
    assert (terminated(pod)["exitCode"], terminated(pod)["reason"]) == (0, "Completed")
    assert conditions(pod)["PodScheduled"]["status"] == "True"
    assert pod["status"]["startTime"] and pod["status"]["podIP"] == "127.0.0.1"

    name = pod["metadata"]["name"]
    assert (agent.root / "volumes" / "data" / "runs" / "one" / "out.txt").read_text() == f"written by {name}"
    seen = json.loads(agent.log_path(pod).read_text())
    port = real_cluster.server.rsplit(":", 1)[1]
    assert (
        seen["env"]
        | {
            "MODE": "fast",
            "TOKEN": "s3cret",
            "POD_NAME": name,
            "POD_NAMESPACE": namespace,
            "POD_UID": pod["metadata"]["uid"],
            "ACCOUNT": "default",
            "POD_IP": "127.0.0.1",
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": port,
            "OMP_NUM_THREADS": "2",  # 1.5 cores, rounded up
        }
        == seen["env"]
    )
    assert "KLEINSTYLE_KUBE_API" not in seen["env"]  # reports go through the API, with the pod's token
    if agent.read_only_enforced:
        assert seen["inputs"] == "OSError" and not (inputs / "x").exists()


FAIL_SCRIPT = """
import os, pathlib, sys
root = pathlib.Path(os.environ["KLEINSTYLE_ROOTFS"])
(root / "var" / "log").mkdir(parents=True, exist_ok=True)
(root / "var" / "log" / "why").write_text("bad input: no images")
sys.exit(3)
"""


def test_a_failing_pod_reports_its_exit_code_and_termination_message(
    real_cluster: RealCluster, agent: NodeAgent, make_namespace: Callable[..., str]
) -> None:
    namespace = make_namespace()
    body = job("fails", FAIL_SCRIPT, container={"terminationMessagePath": "/var/log/why"})
    finished, pod = run_job(real_cluster, namespace, body)

    assert conditions(finished)["Failed"]["reason"] == "BackoffLimitExceeded"
    assert pod["status"]["phase"] == "Failed"
    state = terminated(pod)
    assert (state["exitCode"], state["reason"], state["message"]) == (3, "Error", "bad input: no images")
    assert conditions(pod)["Ready"]["reason"] == "PodCompleted"


TOKEN_SCRIPT = """
import base64, json, os, pathlib, ssl, urllib.error, urllib.request
root = pathlib.Path(os.environ["KLEINSTYLE_ROOTFS"])
account = root / "var/run/secrets/kubernetes.io/serviceaccount"
token = (account / "token").read_text()
context = ssl.create_default_context(cafile=str(account / "ca.crt"))
namespace = (account / "namespace").read_text()
base = "https://" + os.environ["KUBERNETES_SERVICE_HOST"] + ":" + os.environ["KUBERNETES_SERVICE_PORT"]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))

def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Authorization", "Bearer " + token)
    request.add_header("Content-Type", "application/json")
    try:
        with opener.open(request) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, None

review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
_, me = call("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", review)
claims = (root / "var/run/secrets/tokens/vault").read_text().split(".")[1]
claims = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
seen = {
    "user": me["status"]["userInfo"]["username"],
    "namespace": namespace,
    "configmaps": call("GET", "/api/v1/namespaces/" + namespace + "/configmaps")[0],
    "secrets": call("GET", "/api/v1/namespaces/" + namespace + "/secrets")[0],
    "pods": call("GET", "/api/v1/namespaces/" + namespace + "/pods")[0],
    "vault": {"aud": claims["aud"], "ttl": claims["exp"] - claims["iat"], "pod": claims["kubernetes.io"]["pod"]},
}
(root / "dev" / "termination-log").write_text(json.dumps(seen))
"""


def test_a_pods_token_calls_the_api_as_its_service_account(
    real_cluster: RealCluster, agent: NodeAgent, make_namespace: Callable[..., str]
) -> None:
    namespace = make_namespace()
    create(
        real_cluster,
        f"/api/v1/namespaces/{namespace}/serviceaccounts",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "runner"}},
    )
    create(
        real_cluster,
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "read-configmaps"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
        },
    )
    create(
        real_cluster,
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "runner"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-configmaps"},
            "subjects": [{"kind": "ServiceAccount", "name": "runner", "namespace": namespace}],
        },
    )
    vault = {"serviceAccountToken": {"audience": "vault", "expirationSeconds": 3600, "path": "vault"}}
    body = job(
        "token",
        TOKEN_SCRIPT,
        serviceAccountName="runner",
        container={"volumeMounts": [{"name": "tokens", "mountPath": "/var/run/secrets/tokens", "readOnly": True}]},
        volumes=[{"name": "tokens", "projected": {"sources": [vault]}}],
    )
    finished, pod = run_job(real_cluster, namespace, body)

    assert "Complete" in conditions(finished), terminated(pod)
    seen = json.loads(terminated(pod)["message"])
    assert seen["user"] == f"system:serviceaccount:{namespace}:runner"
    assert seen["namespace"] == namespace
    assert (seen["configmaps"], seen["secrets"], seen["pods"]) == (200, 403, 403)
    assert seen["vault"] == {
        "aud": ["vault"],
        "ttl": 3600,
        "pod": {"name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]},
    }


def test_placement_unschedulable_by_the_scheduler_and_gpu_jobs_on_the_gpu_node(
    real_cluster: RealCluster, agent: NodeAgent, make_namespace: Callable[..., str]
) -> None:
    namespace = make_namespace()
    nowhere = job("nowhere", "pass", nodeSelector={"nvidia.com/gpu.product": "NVIDIA-B300"})
    create(real_cluster, f"/apis/batch/v1/namespaces/{namespace}/jobs", nowhere)
    pod = until("the pod of Job nowhere", lambda: get(real_cluster, f"/api/v1/namespaces/{namespace}/pods")["items"])

    def scheduled() -> dict[str, Any] | None:
        return conditions(pod_of(real_cluster, namespace, "nowhere")).get("PodScheduled")

    report = until("the scheduler's verdict", scheduled)
    assert (report["status"], report["reason"]) == ("False", "Unschedulable"), report
    assert "0/2 nodes are available" in report["message"], report
    assert pod_of(real_cluster, namespace, "nowhere")["status"]["phase"] == "Pending"

    gpu = job(
        "gpu",
        "import os; print(os.environ['OMP_NUM_THREADS'])",
        nodeSelector=dict(H200_POOL.node_selector),
        tolerations=[t.model_dump(by_alias=True, exclude_none=True) for t in H200_POOL.tolerations],
        container={"resources": {"limits": {"nvidia.com/gpu": 1, "cpu": "16", "memory": "120Gi"}}},
    )
    finished, pod = run_job(real_cluster, namespace, gpu)
    assert "Complete" in conditions(finished)
    assert pod["spec"]["nodeName"] == GPU_NODE
    assert agent.log_path(pod).read_text().strip() == str(min(16, os.cpu_count() or 1))  # no more than it has


GRACE_SCRIPT = """
import os, pathlib, signal, sys, time
root = pathlib.Path(os.environ["KLEINSTYLE_ROOTFS"])

def term(signum, frame):
    (root / "data" / "got-term").write_text("yes")
    sys.stdout.flush()

signal.signal(signal.SIGTERM, term)  # and keeps running: SIGKILL must follow after the grace period
print("started", flush=True)
while True:
    time.sleep(0.1)
"""


def test_deleting_a_running_pod_stops_its_process_and_the_pod_goes(
    real_cluster: RealCluster, agent: NodeAgent, make_namespace: Callable[..., str]
) -> None:
    namespace = make_namespace()
    claim(real_cluster, namespace, "scratch")
    pod_body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "stubborn"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": "runtime",
                    "command": ["python", "-c", GRACE_SCRIPT],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "scratch"}}],
        },
    }
    path = f"/api/v1/namespaces/{namespace}/pods/stubborn"
    create(real_cluster, f"/api/v1/namespaces/{namespace}/pods", pod_body)
    until("the pod running", lambda: get(real_cluster, path)["status"].get("phase") == "Running")
    until("its process started", lambda: "started" in agent.log_path(get(real_cluster, path)).read_text())

    began = time.monotonic()
    status, _ = real_cluster.api("DELETE", path)
    assert status == 200
    until("the pod gone", lambda: real_cluster.api("GET", path)[0] == 404, timeout=15)
    took = time.monotonic() - began
    assert (agent.root / "volumes" / "scratch" / "got-term").read_text() == "yes"  # SIGTERM first
    assert 1.0 <= took < 10, took  # then SIGKILL, once the grace second had passed


RETRY_SCRIPT = """
import os, pathlib, sys
marker = pathlib.Path(os.environ["KLEINSTYLE_ROOTFS"]) / "scratch" / "tried"
if not marker.exists():
    marker.write_text("once")
    sys.exit(7)
"""


def test_on_failure_restarts_the_container_in_place(
    real_cluster: RealCluster, agent: NodeAgent, make_namespace: Callable[..., str]
) -> None:
    """restartPolicy OnFailure (and Always, the Deployments' policy): the same pod runs its container again after a
    back-off, counting restarts, and keeps what its emptyDir holds."""
    namespace = make_namespace()
    body = job(
        "retry",
        RETRY_SCRIPT,
        container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )
    body["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    finished, pod = run_job(real_cluster, namespace, body)

    assert "Complete" in conditions(finished)
    [status] = pod["status"]["containerStatuses"]
    assert (pod["status"]["phase"], status["restartCount"]) == ("Succeeded", 1)
    assert status["lastState"]["terminated"]["exitCode"] == 7
    assert status["state"]["terminated"]["exitCode"] == 0


def test_a_stopping_agent_fails_its_running_pods_and_removes_its_nodes(
    real_cluster: RealCluster, agent: NodeAgent, make_namespace: Callable[..., str], tmp_path: Path
) -> None:
    """A node shutdown, as the kubelet's graceful shutdown reports it: a running pod fails as a disruption (a Job's
    podFailurePolicy can ignore it), and the node is deregistered so that the scheduler places nothing there."""
    namespace = make_namespace()
    spare = NodeSpec("kleinstyle-spare", {"cpu": "4", "memory": "8Gi", "pods": "10"}, labels={"pool": "spare"})
    path = f"/api/v1/namespaces/{namespace}/pods/sleeper"
    with NodeAgent(real_cluster, tmp_path, nodes=[spare], shutdown_grace=2.0):
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "sleeper"},
            "spec": {
                "restartPolicy": "Never",
                "nodeSelector": {"pool": "spare"},
                "containers": [
                    {"name": "main", "image": "runtime", "command": ["python", "-c", "import time; time.sleep(60)"]}
                ],
            },
        }
        create(real_cluster, f"/api/v1/namespaces/{namespace}/pods", body)
        until("the pod running", lambda: get(real_cluster, path)["status"].get("phase") == "Running")
    pod = get(real_cluster, path)
    assert (pod["status"]["phase"], pod["status"]["reason"]) == ("Failed", "Terminated")
    assert conditions(pod)["DisruptionTarget"]["reason"] == "TerminationByKubelet"
    assert terminated(pod)["exitCode"] == 143  # SIGTERM
    assert real_cluster.api("GET", "/api/v1/nodes/kleinstyle-spare")[0] == 404
