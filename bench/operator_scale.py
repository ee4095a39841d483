"""The operator at scale, on the API emulator or on the real kube-apiserver: API requests, time to every Job, steady
load, memory.

N resources (half StyleBoards, half StyleLoRAs on them) across M namespaces are applied to the cluster; the operator
runs as its own process (`kleinstyle operator`, cluster-wide, as the chart installs it), so its requests and its peak
RSS are its own. No runtime ever runs: the harness plays the boards' prepare pods (the pod's report written into the
board's status.progress, as the runtime would), so every StyleLoRA gets its training Job, and those stay queued for
good.

`--cluster emulator` (the default): the embedded API emulator, which runs no Job controller (`run_jobs=False`); the
harness marks each prepare Job complete itself, and no pod ever exists. The operator's requests are the emulator's
request log (resource URLs: discovery is not in it) less the harness's own, counted client-side.

`--cluster real`: Kubernetes v1.37.2 on loopback (`RealCluster`, `make controlplane`), whose Job controller owns Job
status and whose scheduler binds pods, so neither is faked. The harness (the admin) is the kubelet of one CPU node
and no more: a Node with its Lease, where the scheduler binds each prepare pod (each namespace gets the artifact and
model claims as static PersistentVolumes, since the scheduler places no pod whose claim is unbound); the harness
reports the pod Running, writes the board's report, and reports it Succeeded through pods/status, and the Job
controller completes the Job. Three requests per board and no process: NodeAgent would run 250 real prepare
processes, with their tokens and volumes, on the same 2 cores, and measure them rather than the operator. Training
pods need a GPU node and there is none, so they wait Unschedulable, as behind GPUs that never free; unlike on the
emulator, the operator sees those pods and reports why they wait. The Job controller is what paces the run there:
kube-controller-manager's clients send at most 20 requests a second by default (`--kube-api-qps`), and every Job
takes it four or more (its pod, its status, the pod's finalizer).

The operator runs with a TokenRequest token of the chart's ServiceAccount (its RBAC and admission policy rendered by
`helm template`), not as the admin, so the server can tell it apart: a FlowSchema matching that ServiceAccount alone,
at the priority level the built-in `service-accounts` schema gives it, makes the API server count exactly its
requests in `apiserver_flowcontrol_dispatched_requests_total` and `..._rejected_requests_total` (a 429 before
serving), scraped from /metrics. `apiserver_request_total` cannot: it has no client label, the controllers and the
scheduler share it, and it counts a watch only when the watch ends. An audit log of that one user (RealCluster's
API server started with two more flags) gives the breakdown by verb and resource, and the refusals.

Reported:
- seconds_to_all_jobs: from the first create until every resource has its Job;
- seconds_to_all_waiting: until every LoRA shows the state it waits in (Pending on the emulator; on the real server,
  Unschedulable, once the Job controller has made its pod and the scheduler has tried it);
- requests_per_resource: the operator's API requests until then, plus a settling period, per resource;
- floor_per_resource: the requests a resource needs at the least (its 5 creates, its status patches, and for a
  finished board the 3 deletes that take its run's rights away), averaged over boards and LoRAs;
- steady_requests_per_second: the operator's requests per second once everything waits;
- peak_rss_mib: the operator process's peak resident memory (VmHWM);
- operator_cpu_seconds: the CPU time the operator process used over the whole run (start-up included).

    python bench/operator_scale.py [--cluster emulator|real|both] [--resources 500] [--namespaces 50] [--steady 30]
        [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import yaml
from kleinstyle.contract.reports import AcceptedImage, PrepareReport, PrepareResult
from kleinstyle.devcluster import ApiError, DevCluster, KindRegistry, KubeClient, admission, kinds_from_crd
from kleinstyle.devcluster.controlplane import KUBE_VERSION, RealCluster, token_kubeconfig
from kleinstyle.devcluster.lifecycle import terminate
from kleinstyle.devcluster.node_agent import ARCH, LEASE_NAMESPACE
from kleinstyle.devcluster.patching import STRATEGIC_MERGE_PATCH
from kleinstyle.devcluster.pod_setup import container_status
from kleinstyle.devcluster.real_e2e import static_claim
from kleinstyle.devcluster.resources import builtin_kinds
from kleinstyle.devcluster.store import now_rfc3339
from kleinstyle.operator import crdgen
from kleinstyle.operator.config import OperatorConfig
from kleinstyle.operator.naming import OWNER_UID, RUN_HASH, STEP
from prometheus_client.parser import text_string_to_metric_families

GROUP = "kleinstyle.dev/v1alpha1"
# Per resource at the least: 5 creates (ServiceAccount, Role, RoleBinding, ConfigMap, Job), a status patch per
# phase it reaches (board: Pending, Succeeded; LoRA: Waiting, Pending), and for the finished board 3 deletes.
FLOOR = {"StyleBoard": 5 + 2 + 3, "StyleLoRA": 5 + 2}
CHART = Path(__file__).resolve().parents[1] / "charts" / "kleinstyle"
RELEASE, RELEASE_NAMESPACE = "kleinstyle", "kleinstyle-system"
OPERATOR_USER = f"system:serviceaccount:{RELEASE_NAMESPACE}:{RELEASE}"
# What of the chart the operator's identity needs; its Deployment is this harness's process instead.
CHART_KINDS = frozenset(
    {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
)
FLOW_SCHEMA = "kleinstyle-bench-operator"
NODE = "kleinstyle-bench"
LEASE_SECONDS = 40
HEARTBEAT_S = 10.0
AUDIT_METHODS = {
    "get": "GET",
    "list": "GET",
    "watch": "GET",
    "create": "POST",
    "update": "PUT",
    "patch": "PATCH",
    "delete": "DELETE",
    "deletecollection": "DELETE",
}


class CountingClient(KubeClient):
    """The harness's own client: its requests are counted, so the operator's are the rest of the log."""

    def __init__(self, url: str, kinds: KindRegistry) -> None:
        super().__init__(url, kinds)
        self.count = 0
        self.made: Counter[tuple[str, str]] = Counter()

    def tally(self, method: str, path: str, params: dict[str, str]) -> None:
        self.count += 1
        self.made[kind_of(method, path, params)] += 1

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        self.tally(method, path, kwargs.get("params") or {})
        return await super().request(method, path, **kwargs)


class RealClient(CountingClient):
    """The harness on the real server: the admin's client certificate over TLS, one kept-alive session."""

    def __init__(self, cluster: RealCluster, kinds: KindRegistry) -> None:
        super().__init__(cluster.server, kinds)
        self.tls = ssl.create_default_context(cafile=str(cluster.ca_file))
        self.tls.load_cert_chain(str(cluster.admin_cert_file), str(cluster.admin_key_file))
        self.session: aiohttp.ClientSession | None = None

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        body, params = kwargs.get("body"), kwargs.get("params")
        content_type = kwargs.get("content_type", "application/json")
        self.tally(method, path, params or {})
        if self.session is None:
            connector = aiohttp.TCPConnector(ssl=self.tls)
            self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type, "Accept": "application/json, */*"}
        async with self.session.request(method, self.url + path, data=data, params=params, headers=headers) as response:
            text = await response.text()
            try:
                payload = json.loads(text) if text else None
            except ValueError:
                payload = text  # /metrics
            if response.status >= 400:
                raise ApiError.from_status(response.status, payload)
            return payload

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


class AuditedCluster(RealCluster):
    """RealCluster whose API server also writes an audit log of the operator's requests alone, for the breakdown the
    metrics cannot give: a line when each is received (watches included) and one with its status when it ends."""

    POLICY = {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["ResponseStarted", "Panic"],
        "rules": [{"level": "Metadata", "users": [OPERATOR_USER]}, {"level": "None"}],
    }

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.log"

    def _spawn(self, name: str, *args: str) -> None:
        if name == "kube-apiserver":
            policy = self.root / "audit-policy.yaml"
            policy.write_text(yaml.safe_dump(self.POLICY), encoding="utf-8")
            args = (*args, f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}")
            args = (*args, "--audit-log-format=json", "--audit-log-maxsize=0")
        super()._spawn(name, *args)


def kind_of(method: str, path: str, params: dict[str, str]) -> tuple[str, str]:
    """(verb, resource) of a request, for the breakdown: GET splits into get, list and watch."""
    parts = path.strip("/").split("/")
    if "namespaces" in parts and len(parts) > parts.index("namespaces") + 2:
        rest = parts[parts.index("namespaces") + 2 :]
    else:
        rest = parts[2:] if parts[0] == "api" else parts[3:]
    resource = "/".join([rest[0], *rest[2:]]) if rest else "?"
    verb = method.lower()
    if method == "GET":
        verb = "watch" if params.get("watch") in ("true", "1") else "get" if len(rest) > 1 else "list"
    return verb, resource


def resources(total: int, namespaces: int) -> list[dict[str, Any]]:
    docs = []
    for index in range(total // 2):
        namespace = f"team-{index % namespaces:03d}"
        board = f"board-{index:04d}"
        docs.append(
            {
                "apiVersion": GROUP,
                "kind": "StyleBoard",
                "metadata": {"name": board, "namespace": namespace},
                "spec": {
                    "triggerWord": "benchstyle",
                    "images": [{"source": f"https://refs.example/{board}/{i}.png", "caption": "a"} for i in (1, 2)],
                    "captioning": {"provider": "none"},
                },
            }
        )
        docs.append(
            {
                "apiVersion": GROUP,
                "kind": "StyleLoRA",
                "metadata": {"name": f"lora-{index:04d}", "namespace": namespace},
                "spec": {"boardRef": {"name": board}, "backend": "builtin"},
            }
        )
    return docs


def prepared(run_hash: str) -> dict[str, Any]:
    """The report a prepare pod writes: six images accepted."""
    accepted = [
        AcceptedImage(source=f"s{i}", file=f"{i:03d}.png", width=512, height=512, sha256="0" * 64, caption="x")
        for i in range(6)
    ]
    result = PrepareResult(succeeded=True, message="prepared 6 images", accepted=accepted)
    return {"status": {"progress": PrepareReport(run_hash=run_hash, state="Succeeded", result=result).model_dump()}}


def start_operator(kubeconfig: Path, folder: Path, config: dict[str, Any] | None = None) -> subprocess.Popen[bytes]:
    """`kleinstyle operator` as a process of its own, with `config` (default: no metrics port, the builtin backend)
    and `kubeconfig` as its only credential; its log is folder/operator.log (appended to: a restarted operator's
    follows the killed one's)."""
    settings = folder / "operator.yaml"
    settings.write_text(yaml.safe_dump(config or {"metricsPort": 0, "defaultBackend": "builtin"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}  # never in-cluster config
    env["KUBECONFIG"] = str(kubeconfig)
    command = [sys.executable, "-m", "kleinstyle.cli.main", "operator", "--config", str(settings)]
    command += ["--liveness", "http://127.0.0.1:0/healthz"]
    log = (folder / "operator.log").open("ab")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder)


def cpu_seconds(pid: int) -> float:
    """User and system CPU the process has used: less at the mercy of the machine's other load than wall time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Probe:
    """What differs between the clusters: how the prepare pods are played, Jobs counted, when every LoRA shows the
    state it will wait in, and how the operator's requests are counted (as the server counts them, since the operator
    started)."""

    play: Callable[[], Awaitable[None]]
    jobs: Callable[[], Awaitable[int]]
    waiting: Callable[[dict[str, Any]], bool]
    served: Callable[[], Awaitable[int]]


@dataclass
class Timings:
    seconds_to_all_jobs: float
    seconds_to_all_waiting: float
    before_steady: int
    after_steady: int
    peak_rss_mib: float
    cpu_seconds: float


def check_alive(operator: subprocess.Popen[bytes], folder: Path) -> None:
    if operator.poll() is not None:
        raise RuntimeError(f"the operator exited ({operator.returncode}); see {folder}/operator.log")


async def drive(
    probe: Probe,
    client: KubeClient,
    operator: subprocess.Popen[bytes],
    docs: Sequence[dict[str, Any]],
    owners: dict[str, tuple[str, str]],
    steady_s: float,
    settle_s: float,
    folder: Path,
) -> Timings:
    """Create every resource, play the prepare pods until every resource has its Job and every LoRA shows why it
    waits, settle, then measure the steady state: the same on both clusters. `owners` maps each created object's uid
    to its namespace and name."""
    started = time.monotonic()
    for doc in docs:
        created = await client.create(doc["kind"].lower() + "s", doc, doc["metadata"]["namespace"])
        owners[created["metadata"]["uid"]] = (doc["metadata"]["namespace"], doc["metadata"]["name"])
    while True:
        await probe.play()
        if await probe.jobs() >= len(docs):
            break
        check_alive(operator, folder)
        await asyncio.sleep(0.5)
    seconds_to_all_jobs = time.monotonic() - started
    while not all(probe.waiting(lora) for lora in await client.list("styleloras")):
        check_alive(operator, folder)
        await asyncio.sleep(1.0)
    seconds_to_all_waiting = time.monotonic() - started
    await asyncio.sleep(settle_s)
    before_steady = await probe.served()
    await asyncio.sleep(steady_s)
    after_steady = await probe.served()
    return Timings(
        seconds_to_all_jobs,
        seconds_to_all_waiting,
        before_steady,
        after_steady,
        peak_rss_mib(operator.pid),
        cpu_seconds(operator.pid),
    )


def row(
    cluster: str, total: int, namespaces: int, timed: Timings, steady_s: float, settle_s: float, folder: Path
) -> dict[str, Any]:
    boards = loras = total // 2
    return {
        "cluster": cluster,
        "resources": total,
        "namespaces": namespaces,
        "seconds_to_all_jobs": round(timed.seconds_to_all_jobs, 1),
        "seconds_to_all_waiting": round(timed.seconds_to_all_waiting, 1),
        "requests_per_resource": round(timed.before_steady / total, 1),
        "floor_per_resource": round((FLOOR["StyleBoard"] * boards + FLOOR["StyleLoRA"] * loras) / total, 1),
        "steady_requests_per_second": round((timed.after_steady - timed.before_steady) / steady_s, 2),
        "peak_rss_mib": round(timed.peak_rss_mib, 1),
        "operator_cpu_seconds": round(timed.cpu_seconds, 1),
        "settle_seconds": settle_s,
        "steady_seconds": steady_s,
        "folder": str(folder),  # the operator's log
    }


def breakdown_of(counts: Counter[tuple[str, str]]) -> dict[str, int]:
    return {f"{verb} {resource}": n for (verb, resource), n in counts.most_common() if n > 0}


def refusals_of(counts: Counter[tuple[str, str, int]]) -> dict[str, int]:
    return {f"{verb} {resource} {code}": n for (verb, resource, code), n in counts.most_common()}


def phase(obj: dict[str, Any]) -> str:
    return str((obj.get("status") or {}).get("phase") or "")


def unschedulable(lora: dict[str, Any]) -> bool:
    """The LoRA says its training pod cannot be scheduled: the state it waits in on the real server."""
    conditions = (lora.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("reason") == "Unschedulable" for c in conditions)


# --- the emulator -----------------------------------------------------------------------------------------------------


async def complete_prepare_jobs(client: KubeClient, done: set[str]) -> None:
    """Complete every board's prepare Job not yet completed: the Job's status and the pod's report."""
    for job in await client.list("jobs", label_selector=f"{STEP}=prepare"):
        meta = job["metadata"]
        if meta["uid"] in done:
            continue
        owner = next(ref for ref in meta["ownerReferences"] if ref.get("controller"))
        run_hash = meta["labels"][RUN_HASH]
        await client.patch("styleboards", meta["namespace"], owner["name"], prepared(run_hash), subresource="status")
        status = {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
        await client.patch("jobs", meta["namespace"], meta["name"], status, subresource="status")
        done.add(meta["uid"])


async def measure_emulator(total: int, namespaces: int, steady_s: float, settle_s: float) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="kleinstyle-scale-"))
    crds = list(crdgen.build_crds().values())
    async with DevCluster(folder, crds=crds, admit=admission.admit, run_jobs=False) as cluster:
        client = CountingClient(cluster.url, cluster.emulator.kinds)
        operator = start_operator(cluster.kubeconfig_path, folder)
        done: set[str] = set()

        async def jobs() -> int:
            return len(await client.list("jobs"))

        marks: list[int] = []  # where the request log stood when the steady state began and ended

        async def served() -> int:
            marks.append(len(cluster.emulator.requests()))
            return marks[-1] - client.count

        probe = Probe(lambda: complete_prepare_jobs(client, done), jobs, lambda lora: phase(lora) == "Pending", served)
        try:
            timed = await drive(probe, client, operator, resources(total, namespaces), {}, steady_s, settle_s, folder)
            log = cluster.emulator.requests()
            breakdown = Counter(kind_of(r.method, r.path, r.params) for r in log) - client.made
            steady = Counter(kind_of(r.method, r.path, r.params) for r in log[marks[0] : marks[1]])
            refused = Counter((*kind_of(r.method, r.path, r.params), r.status) for r in log if r.status >= 400)
        finally:
            terminate(operator, 30)
            await client.close()
    return {
        **row("emulator", total, namespaces, timed, steady_s, settle_s, folder),
        "operator_requests": breakdown_of(breakdown),
        "operator_requests_steady": breakdown_of(steady),
        "operator_refused": refusals_of(refused),
    }


# --- the real server --------------------------------------------------------------------------------------------------


def _micro_time() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def apply(cluster: RealCluster, docs: Sequence[dict[str, Any]]) -> None:
    cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs))


def chart_objects(
    cluster: RealCluster, folder: Path, values: dict[str, Any] | None = None, kinds: frozenset[str] = CHART_KINDS
) -> list[dict[str, Any]]:
    """The chart's objects of `kinds` (default: its ServiceAccount, ClusterRoles, ClusterRoleBinding and admission
    policy), as `helm template` renders them with `values` (default: the chart's own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "KUBE"))}
    env |= {f"HELM_{name}_HOME": str(folder / "helm" / name.lower()) for name in ("CACHE", "CONFIG", "DATA")}
    command = [str(cluster.bin_dir / "helm"), "template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE]
    if values is not None:
        values_file = folder / "values.yaml"
        values_file.write_text(yaml.safe_dump(values), encoding="utf-8")
        command += ["-f", str(values_file)]
    rendered = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc and doc.get("kind") in kinds]


def flow_schema() -> dict[str, Any]:
    """A FlowSchema for the operator's ServiceAccount alone, ahead of the built-in `service-accounts` (9000) and at
    its priority level, so the API server counts the operator's requests apart and queues them as it would anyway."""
    everything = {
        "resourceRules": [
            {"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"], "clusterScope": True, "namespaces": ["*"]}
        ],
        "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
    }
    account = {"kind": "ServiceAccount", "serviceAccount": {"name": RELEASE, "namespace": RELEASE_NAMESPACE}}
    return {
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
        "kind": "FlowSchema",
        "metadata": {"name": FLOW_SCHEMA},
        "spec": {
            "priorityLevelConfiguration": {"name": "workload-low"},
            "matchingPrecedence": 1000,
            "distinguisherMethod": {"type": "ByUser"},
            "rules": [{"subjects": [account], **everything}],
        },
    }


def node() -> dict[str, Any]:
    """The harness's CPU node: room for every prepare pod, Ready, no GPU (so no training pod fits)."""
    now = now_rfc3339()
    capacity = {"cpu": "256", "memory": "1Ti", "pods": "1000"}
    conditions = [
        ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
        ("PIDPressure", "False", "KubeletHasSufficientPID"),
        ("Ready", "True", "KubeletReady"),
    ]
    labels = {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux", "kubernetes.io/arch": ARCH}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE, "labels": labels},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                {"type": kind, "status": status, "reason": reason, "lastHeartbeatTime": now, "lastTransitionTime": now}
                for kind, status, reason in conditions
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "nodeInfo": {
                "machineID": "0" * 32,
                "systemUUID": "0" * 32,
                "bootID": "0" * 32,
                "kernelVersion": platform.release(),
                "osImage": "kleinstyle bench harness",
                "containerRuntimeVersion": "none://0",
                "kubeletVersion": KUBE_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": ARCH,
            },
        },
    }


LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"


async def register_node(client: KubeClient) -> None:
    """The Node, its status and its Lease, as a kubelet registers; the node-lifecycle controller then lifts the
    not-ready taint the API server put on it, and the scheduler may place pods there."""
    body = node()
    created = await client.request("POST", "/api/v1/nodes", body=body)
    await client.patch("nodes", None, NODE, {"status": body["status"]}, subresource="status")
    owner = {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": created["metadata"]["uid"]}
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": NODE, "namespace": LEASE_NAMESPACE, "ownerReferences": [owner]},
        "spec": {"holderIdentity": NODE, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": _micro_time()},
    }
    await client.request("POST", LEASES, body=lease)


async def heartbeat(client: KubeClient) -> None:
    """Renew the node's Lease, so the node-lifecycle controller keeps it Ready while the run lasts."""
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        patch = {"spec": {"renewTime": _micro_time()}}
        await client.request("PATCH", f"{LEASES}/{NODE}", body=patch, content_type="application/merge-patch+json")


async def wait_for(what: str, ready: Callable[[], Awaitable[bool]], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not await ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout:.0f}s")
        await asyncio.sleep(0.5)


async def served(client: KubeClient, plural: str) -> bool:
    """Whether a kind's list is served: a CRD's watch cache answers 429 "storage is (re)initializing" for a moment
    after it is Established, and the operator's first lists would pay for it with a retry."""
    try:
        await client.list(plural)
    except ApiError as exc:
        if exc.code == 429:
            return False
        raise
    return True


async def set_up(cluster: RealCluster, client: KubeClient, folder: Path, namespaces: int) -> Path:
    """The world before the clock starts: the CRDs, the namespaces with their claims, the chart's identity for the
    operator with its FlowSchema, and the node. Returns the operator's kubeconfig (its ServiceAccount's token)."""
    crds = list(crdgen.build_crds().values())
    apply(cluster, crds)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
    for crd in crds:
        await wait_for(
            f"{crd['metadata']['name']} is not served", partial(served, client, crd["spec"]["names"]["plural"])
        )
    teams = [f"team-{index:03d}" for index in range(namespaces)]
    for name in (RELEASE_NAMESPACE, *teams):
        await client.create("namespaces", {"metadata": {"name": name}})
    apply(cluster, [*chart_objects(cluster, folder), flow_schema()])
    cfg = OperatorConfig()
    for namespace in teams:
        for claim in (cfg.artifacts.claim_name, cfg.model_cache_claim):
            volume, bound = static_claim(namespace, claim)
            await client.create("persistentvolumes", volume)
            await client.create("persistentvolumeclaims", bound, namespace)

    async def claims_bound() -> bool:
        claims = await client.list("persistentvolumeclaims")
        return bool(sum((c.get("status") or {}).get("phase") == "Bound" for c in claims) == 2 * namespaces)

    await wait_for("the claims are not bound", claims_bound)
    await register_node(client)

    async def schedulable() -> bool:
        found = await client.get("nodes", None, NODE)
        return not (found.get("spec") or {}).get("taints", [])

    await wait_for(f"node {NODE} is still tainted", schedulable)
    return await operator_kubeconfig(client, cluster.server, cluster.ca_file, folder)


async def operator_kubeconfig(client: KubeClient, server: str, ca_file: Path, folder: Path) -> Path:
    """folder/operator.kubeconfig: `server` (the API server, or a proxy in front of it) with a TokenRequest token of
    the chart's ServiceAccount, the operator's only credential."""
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 7200}}
    path = f"/api/v1/namespaces/{RELEASE_NAMESPACE}/serviceaccounts/{RELEASE}/token"
    token = (await client.request("POST", path, body=request))["status"]["token"]
    kubeconfig = folder / "operator.kubeconfig"
    kubeconfig.write_text(token_kubeconfig(server, ca_file, token, RELEASE), encoding="utf-8")
    kubeconfig.chmod(0o600)
    return kubeconfig


def pod_status(pod: dict[str, Any], phase: str, state: dict[str, Any]) -> dict[str, Any]:
    """What a kubelet writes through pods/status (strategic merge: the scheduler's PodScheduled stays)."""
    running = phase == "Running"
    container = pod["spec"]["containers"][0]
    conditions = [
        {"type": kind, "status": str(running), "lastTransitionTime": now_rfc3339()}
        for kind in ("Initialized", "Ready", "ContainersReady")
    ]
    conditions[0]["status"] = "True"
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": conditions,
        "containerStatuses": [container_status(container, state, ready=running)],
    }
    if running:
        status |= {"startTime": now_rfc3339(), "hostIP": "127.0.0.1", "podIP": "127.0.0.1"}
    return {"status": status}


async def run_prepare_pods(client: KubeClient, owners: dict[str, tuple[str, str]], done: set[str]) -> None:
    """The node's kubelet and the runtime in each pod: every prepare pod the scheduler bound to the node starts,
    writes its board's report and exits 0; the Job controller does the rest."""
    selector = {"label_selector": f"{STEP}=prepare", "field_selector": f"spec.nodeName={NODE},status.phase=Pending"}
    for pod in await client.list("pods", **selector):
        meta = pod["metadata"]
        if meta["uid"] in done:
            continue
        namespace, name = meta["namespace"], meta["name"]
        started = {"startedAt": now_rfc3339()}
        running = pod_status(pod, "Running", {"running": started})
        await client.patch("pods", namespace, name, running, subresource="status", content_type=STRATEGIC_MERGE_PATCH)
        _, board = owners[meta["labels"][OWNER_UID]]
        await client.patch("styleboards", namespace, board, prepared(meta["labels"][RUN_HASH]), subresource="status")
        exited = {"exitCode": 0, "reason": "Completed", **started, "finishedAt": now_rfc3339()}
        finished = pod_status(pod, "Succeeded", {"terminated": exited})
        await client.patch("pods", namespace, name, finished, subresource="status", content_type=STRATEGIC_MERGE_PATCH)
        done.add(meta["uid"])


async def flows(client: KubeClient) -> Counter[tuple[str, str]]:
    """Requests by (FlowSchema, outcome) as the API server's priority and fairness counts them, from its /metrics:
    `dispatched` (served, whatever the answer), or `rejected REASON` (a 429 before serving: its queue full, or too
    long a wait in it)."""
    counts: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(str(await client.request("GET", "/metrics"))):
        for sample in family.samples:
            if sample.name == "apiserver_flowcontrol_dispatched_requests_total":
                counts[sample.labels["flow_schema"], "dispatched"] += int(sample.value)
            elif sample.name == "apiserver_flowcontrol_rejected_requests_total":
                counts[sample.labels["flow_schema"], f"rejected {sample.labels['reason']}"] += int(sample.value)
    return counts


def audited(
    log: Path, steady: tuple[float, float]
) -> tuple[Counter[tuple[str, str]], Counter[tuple[str, str]], Counter[tuple[str, str, int]]]:
    """From the audit log: the operator's requests by (verb, resource), in the emulator breakdown's words, those
    received within the `steady` window (epoch seconds), and those refused, by code."""
    counts: Counter[tuple[str, str]] = Counter()
    in_steady: Counter[tuple[str, str]] = Counter()
    refused: Counter[tuple[str, str, int]] = Counter()
    for line in log.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        uri = urlsplit(event["requestURI"])
        verb, resource = kind_of(AUDIT_METHODS.get(event["verb"], "GET"), uri.path, dict(parse_qsl(uri.query)))
        code = (event.get("responseStatus") or {}).get("code") or 0
        if event["stage"] == "RequestReceived":
            counts[verb, resource] += 1
            received = datetime.datetime.fromisoformat(event["requestReceivedTimestamp"]).timestamp()
            if steady[0] <= received < steady[1]:
                in_steady[verb, resource] += 1
        elif code >= 400:
            refused[verb, resource, code] += 1
    return counts, in_steady, refused


async def measure_real(total: int, namespaces: int, steady_s: float, settle_s: float) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="kleinstyle-scale-real-"))
    crds = list(crdgen.build_crds().values())
    kinds = KindRegistry([*builtin_kinds(), *(kind for crd in crds for kind in kinds_from_crd(crd))])
    cluster = AuditedCluster()
    with cluster:
        client = RealClient(cluster, kinds)
        beating: asyncio.Task[None] | None = None
        try:
            kubeconfig = await set_up(cluster, client, folder, namespaces)
            beating = asyncio.create_task(heartbeat(client))
            baseline = await flows(client)
            harness_baseline = client.count
            operator = start_operator(kubeconfig, folder)
            owners: dict[str, tuple[str, str]] = {}
            done: set[str] = set()

            async def jobs() -> int:
                listed = await client.request("GET", "/apis/batch/v1/jobs", params={"limit": "1"})
                return len(listed["items"]) + int(listed["metadata"].get("remainingItemCount") or 0)

            seen: list[Counter[tuple[str, str]]] = []
            marks: list[float] = []  # when the steady state began and ended

            async def served() -> int:
                marks.append(time.time())
                seen.append(await flows(client) - baseline)
                return sum(n for (schema, _), n in seen[-1].items() if schema == FLOW_SCHEMA)

            probe = Probe(lambda: run_prepare_pods(client, owners, done), jobs, unschedulable, served)
            try:
                docs = resources(total, namespaces)
                timed = await drive(probe, client, operator, docs, owners, steady_s, settle_s, folder)
            finally:
                terminate(operator, 30)
            breakdown, steady, refused = audited(cluster.audit_log, (marks[0], marks[1]))
        finally:
            if beating is not None:
                beating.cancel()
            await client.close()
    by_schema: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    for (schema, outcome), n in seen[0].items():  # until the steady state: what the run cost the server
        by_schema[schema] += n
        if schema == FLOW_SCHEMA and outcome != "dispatched":
            rejected[outcome] += n
    return {
        **row("real", total, namespaces, timed, steady_s, settle_s, folder),
        "operator_requests": breakdown_of(breakdown),
        "operator_requests_steady": breakdown_of(steady),
        "operator_refused": refusals_of(refused),
        "audited_requests": sum(breakdown.values()),
        "operator_rejected": dict(rejected),
        "server_requests_by_flow_schema": dict(by_schema.most_common()),
        "harness_requests": client.count - harness_baseline,
    }


COLUMNS = {
    "cluster": "cluster",
    "resources": "resources",
    "namespaces": "namespaces",
    "seconds_to_all_jobs": "s to all Jobs",
    "seconds_to_all_waiting": "s to all waiting",
    "requests_per_resource": "requests/resource",
    "floor_per_resource": "floor",
    "steady_requests_per_second": "steady req/s",
    "peak_rss_mib": "peak RSS MiB",
    "operator_cpu_seconds": "operator CPU s",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cluster", choices=("emulator", "real", "both"), default="emulator")
    parser.add_argument("--resources", type=int, default=500, help="StyleBoards and StyleLoRAs, half each")
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--steady", type=float, default=30.0, help="seconds of steady state measured")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds waited after the last Job appears")
    parser.add_argument("--json", action="store_true", help="print one JSON object per cluster instead of the table")
    args = parser.parse_args()
    measures = {"emulator": measure_emulator, "real": measure_real}
    clusters = list(measures) if args.cluster == "both" else [args.cluster]
    rows = [asyncio.run(measures[c](args.resources, args.namespaces, args.steady, args.settle)) for c in clusters]
    if args.json:
        for found in rows:
            print(json.dumps(found))
        return
    print("| " + " | ".join(COLUMNS.values()) + " |")
    print("| --- " * len(COLUMNS) + "|")
    for found in rows:
        print("| " + " | ".join(str(found[key]) for key in COLUMNS) + " |")
    for r in rows:
        requests = ", ".join(f"{n} {k}" for k, n in r["operator_requests"].items())
        print(f"\nthe operator's requests on the {r['cluster']} cluster, whole run: {requests}")


if __name__ == "__main__":
    main()
