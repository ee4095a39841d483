"""`RealKueue`: Kueue's own manager on a running `RealCluster`, for the cluster tier.

FakeKueue (kueue.py) makes Kueue's moves when a test says so; this runs the real thing, built from its Go module by
`make controlplane` (hack/kueue/build.sh) into the cache beside the control plane, with its own install manifests:
Kueue's `config/default`, rendered by the cluster's kubectl as `kustomize build` renders Kueue's release, of which
what runs outside a pod is applied (the namespace, CRDs, RBAC, webhook configurations). The manager runs as a
process of this machine on 127.0.0.1 under the token of Kueue's own ServiceAccount, bound to Kueue's own ClusterRole,
with the batch/Job integration on; the API server calls its webhooks and CRD conversion at
`https://127.0.0.1:PORT/...`, over a serving certificate of the cluster's CA.

    with RealCluster() as cluster, RealKueue(cluster) as kueue:
        set_up_queues(cluster, [TeamQueue("team-a-cq", gpus=1, local_queues=(("team-a", "gpu"),))])
        ...  # Jobs labelled kueue.x-k8s.io/queue-name=gpu wait for quota, are admitted, preempted

What a Deployment of Kueue has that this has not: the Services (nothing routes to a pod here), the visibility
API's APIService (its server is off), the internal certificate Secret (certificates come from the cluster's CA) and
leader election (one replica).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kleinstyle.operator.config import NodePool

from .controlplane import LOG_TAIL_LINES, RealCluster, cache_dir, die_with_parent, free_port
from .lifecycle import Started, terminate
from .node_agent import chart_node_pool, pool_taints

KUEUE_VERSION = "v0.17.0"  # hack/kueue/build.sh's KUEUE_VERSION
STAMP = ".stamp"  # written by build.sh last, inside the version folder it renames into place
NAMESPACE = "kueue-system"
ACCOUNT = "kueue-controller-manager"  # Kueue's ServiceAccount, bound to kueue-manager-role by its manifests
GROUP = "kueue.x-k8s.io"
API = f"/apis/{GROUP}/v1beta2"
# Applied before the manager starts; the webhook configurations wait until it answers, since they fail every
# matching request (failurePolicy Fail) while nothing serves them.
INSTALLED_KINDS = (
    "Namespace",
    "CustomResourceDefinition",
    "ServiceAccount",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
)
WEBHOOK_KINDS = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
# Kueue's manager reads its metrics certificate from this folder and no other once internal certificate management
# is off (cmd/kueue/main.go): it runs in a mount namespace of its own where an overlay puts the files there.
METRICS_CERT_DIR = Path("kueue/metrics/certs")  # under /etc
FRAMEWORKS = ("batch/job",)
# What the GPU queues share: one flavor for the chart's GPU pool, one cohort, the priorities runs may name.
FLAVOR = "h200"
COHORT = "kleinstyle-gpus"
PRIORITIES: Mapping[str, int] = {"low": 100, "high": 1000}
# Quota for what a run's pod requests besides GPUs: Kueue admits nothing whose requests a ClusterQueue does not
# cover, and these should never be what a run waits for (the GPU node's capacity).
AMPLE = {"cpu": "192", "memory": "2Ti"}
GPU = "nvidia.com/gpu"


class KueueError(RuntimeError):
    """Kueue did not start (the message ends with its last log lines)."""


def kueue_dir() -> Path:
    """Where build.sh puts the manager and the manifests: <cache>/kueue/<version>."""
    return cache_dir() / "kueue" / KUEUE_VERSION


def find_kueue() -> Path | None:
    """The built manager, or None where `make controlplane` has not built Kueue (the stamp is written last)."""
    folder = kueue_dir()
    return folder / "bin" / "kueue" if (folder / STAMP).is_file() else None


# --- Kueue's manifests, pointed at this machine ---------------------------------------------------------------------


def render_manifests(cluster: RealCluster, config_dir: Path) -> list[dict[str, Any]]:
    """Kueue's install (`config/default`), rendered by the cluster's kubectl (its built-in kustomize)."""
    rendered = cluster.kubectl("kustomize", str(config_dir / "default"), timeout=120).stdout
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 1.7 MB of YAML
    return [doc for doc in yaml.load_all(rendered, Loader=loader) if doc]


def _client_config(url: str, ca_bundle: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """A webhook's clientConfig that names its Service, as a URL on this machine with the cluster's CA."""
    path = (config.get("service") or {}).get("path") or ""
    return {"url": url + path, "caBundle": ca_bundle}


def pointed_at(obj: Mapping[str, Any], url: str, ca_bundle: str) -> dict[str, Any]:
    """`obj` with every webhook it names (admission webhooks, a CRD's conversion) called at `url` instead of Kueue's
    Service; other objects unchanged."""
    copied: dict[str, Any] = yaml.safe_load(yaml.safe_dump(dict(obj)))
    for webhook in copied.get("webhooks") or []:
        webhook["clientConfig"] = _client_config(url, ca_bundle, webhook["clientConfig"])
    conversion = (copied.get("spec") or {}).get("conversion") or {}
    if conversion.get("strategy") == "Webhook":
        conversion["webhook"]["clientConfig"] = _client_config(url, ca_bundle, conversion["webhook"]["clientConfig"])
    return copied


def configuration(webhook_port: int, health_port: int, metrics_port: int, cert_dir: Path) -> dict[str, Any]:
    """Kueue's Configuration for a manager on 127.0.0.1: one replica (no leader election), certificates given (no
    internal certificate management), Jobs queued only when they name a queue, no visibility server (it would need
    an APIService and certificates of its own)."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": list(FRAMEWORKS)},
        "featureGates": {"VisibilityOnDemand": False},
    }


def _token_kubeconfig(server: str, ca_pem: bytes, user: str, token: str) -> str:
    ca = base64.b64encode(ca_pem).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kleinstyle", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "kleinstyle", "context": {"cluster": "kleinstyle", "user": user}}],
        "current-context": "kleinstyle",
    }
    return yaml.safe_dump(config, sort_keys=False)


def mount_namespace_runner() -> list[str]:
    """The prefix that runs a command in a mount namespace of its own: as root, or in a user namespace of its own."""
    if os.geteuid() == 0:
        return ["unshare", "--mount", "--propagation", "private"]
    return ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]


# Mounts the overlay ($1 over /etc) in the new mount namespace, then runs the manager: this process alone sees it.
OVERLAY_SCRIPT = 'mount -t overlay kueue-etc -o "lowerdir=$1:/etc" /etc || exit 126; shift; exec "$@"'


# --- the manager ------------------------------------------------------------------------------------------------------


class RealKueue(Started):
    """Kueue's manager on `cluster`, started on enter, stopped (its webhooks removed first) on exit.

    `log` is its output; `logs()` its last lines, for a failure message. The kernel kills the manager when the thread
    that started it ends (as RealCluster's components): start it from one that lives as long as it, not a pool's.
    """

    root_prefix = "kleinstyle-kueue-"

    def __init__(self, cluster: RealCluster, binary: Path | None = None, *, startup_timeout: float = 90.0) -> None:
        found = binary or find_kueue()
        if found is None or not found.is_file():
            raise KueueError(f"Kueue {KUEUE_VERSION} is not built: run `make controlplane`")
        self.cluster = cluster
        self.binary = found
        self.config_dir = found.parent.parent / "config"
        self.startup_timeout = startup_timeout
        self.root = Path()
        self.log = Path()
        self.webhook_port = 0
        self.health_port = 0
        self.metrics_port = 0
        self.startup_seconds = 0.0
        self._webhooks: list[dict[str, Any]] = []
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def user(self) -> str:
        """Who the API server takes the manager for."""
        return f"system:serviceaccount:{NAMESPACE}:{ACCOUNT}"

    def _start(self) -> None:
        """Install Kueue's manifests, start the manager and wait until the API server reaches its webhooks."""
        self.log = self.root / "kueue.log"
        began = time.monotonic()
        self.webhook_port, self.health_port, self.metrics_port = free_port(), free_port(), free_port()
        ca_bundle = base64.b64encode(self.cluster.ca_file.read_bytes()).decode()
        url = f"https://127.0.0.1:{self.webhook_port}"
        manifests = [pointed_at(obj, url, ca_bundle) for obj in render_manifests(self.cluster, self.config_dir)]
        installed = [obj for obj in manifests if obj["kind"] in INSTALLED_KINDS]
        self._webhooks = [obj for obj in manifests if obj["kind"] in WEBHOOK_KINDS]
        self._apply(installed, "installed.yaml")
        crds = [f"crd/{obj['metadata']['name']}" for obj in installed if obj["kind"] == "CustomResourceDefinition"]
        self.cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *crds)
        # RBAC's cache takes a new binding a moment later: a manager started before would log refusals.
        self._wait_for("Kueue's ClusterRole bound to its ServiceAccount", self._authorized)
        self._spawn(self._write_files())
        self._wait_for("Kueue's /readyz", self._ready)
        self._apply(self._webhooks, "webhooks.yaml")
        self._wait_for("Kueue's webhooks, called by the API server", self._webhooks_answer)
        self.startup_seconds = time.monotonic() - began

    def _apply(self, objects: Sequence[Mapping[str, Any]], name: str) -> None:
        path = self.root / name
        path.write_text(yaml.safe_dump_all(list(objects), sort_keys=False), encoding="utf-8")
        self.cluster.kubectl("apply", "--server-side", "--field-manager=kleinstyle-kueue", "-f", str(path))

    def _write_files(self) -> list[str]:
        """The serving certificate (webhooks and metrics), the manager's kubeconfig and Configuration; its argv."""
        cert, key = self.cluster.serving_certificate("kueue", ["127.0.0.1"])
        webhook_certs = self.root / "webhook-certs"
        metrics_certs = self.root / "etc" / METRICS_CERT_DIR
        for folder in (webhook_certs, metrics_certs):
            folder.mkdir(parents=True)
            (folder / "tls.crt").write_bytes(cert.read_bytes())
            (folder / "tls.key").write_bytes(key.read_bytes())
            (folder / "tls.key").chmod(0o600)
        token = self._token()
        kubeconfig = self.root / "kueue.kubeconfig"
        kubeconfig.write_text(
            _token_kubeconfig(self.cluster.server, self.cluster.ca_file.read_bytes(), self.user, token),
            encoding="utf-8",
        )
        kubeconfig.chmod(0o600)
        config = self.root / "config.yaml"
        settings = configuration(self.webhook_port, self.health_port, self.metrics_port, webhook_certs)
        config.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
        return [
            *mount_namespace_runner(),
            "sh",
            "-c",
            OVERLAY_SCRIPT,
            "kueue-etc",
            str(self.root / "etc"),
            str(self.binary),
            f"--config={config}",
            f"--kubeconfig={kubeconfig}",
            "--zap-log-level=2",  # as Kueue's Deployment runs it
        ]

    def _token(self) -> str:
        """A token of Kueue's ServiceAccount for a day (a TokenRequest, as the kubelet makes for a pod)."""
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 86400},
        }
        path = f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{ACCOUNT}/token"
        status, answer = self.cluster.api("POST", path, request)
        if status != 201:
            raise KueueError(f"TokenRequest for {self.user}: {status} {answer}")
        token: str = answer["status"]["token"]
        return token

    def _spawn(self, argv: list[str]) -> None:
        with self.log.open("wb") as out:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
                preexec_fn=die_with_parent,  # the test process's end is the manager's
            )

    def _authorized(self) -> bool:
        """The API server lets Kueue's ServiceAccount watch Workloads (a SubjectAccessReview, as the admin)."""
        attributes = {"group": GROUP, "resource": "workloads", "verb": "watch"}
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": self.user,
                "groups": [f"system:serviceaccounts:{NAMESPACE}"],
                "resourceAttributes": attributes,
            },
        }
        status, answer = self.cluster.api("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
        return status == 201 and bool(answer["status"].get("allowed"))

    def _ready(self) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self.health_port}/readyz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def _webhooks_answer(self) -> bool:
        """A dry-run ResourceFlavor passes Kueue's mutating and validating webhooks: the API server reaches them (TLS,
        the CA bundle, the URL), or it refuses the request (failurePolicy Fail)."""
        probe = {"apiVersion": f"{GROUP}/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "readiness-probe"}}
        with contextlib.suppress(OSError):
            status, _ = self.cluster.api("POST", f"{API}/resourceflavors?dryRun=All", probe, timeout=10)
            return status == 201
        return False

    def _wait_for(self, what: str, ready: Callable[[], bool]) -> None:
        """Poll `ready()`; fail at once, with the log, when the manager exits."""
        deadline = time.monotonic() + self.startup_timeout
        while not ready():
            if self._process is not None and self._process.poll() is not None:
                raise KueueError(f"waiting for {what}: kueue exited {self._process.returncode}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise KueueError(f"{what} not ready after {self.startup_timeout:.0f}s\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, lines: int = LOG_TAIL_LINES) -> str:
        """The manager's last log lines, for a failure message."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return f"--- kueue ({self.log}):\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Remove the webhook configurations (they would fail every pod's creation once nothing answers them), stop the
        manager (SIGTERM, SIGKILL after 10 s) and remove the folder."""
        for webhook in self._webhooks:
            path = f"/apis/admissionregistration.k8s.io/v1/{webhook['kind'].lower()}s/{webhook['metadata']['name']}"
            with contextlib.suppress(OSError):
                self.cluster.api("DELETE", path)
        self._webhooks = []
        process, self._process = self._process, None
        if process is not None:
            terminate(process, 10)
        if self.root != Path():
            shutil.rmtree(self.root, ignore_errors=True)


# --- queues -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeamQueue:
    """A team's share of the GPU pool: a ClusterQueue with `gpus` of nominal quota in the cohort, reached through
    `local_queues` ((namespace, LocalQueue name) pairs), that may borrow up to `borrowing_limit` GPUs the cohort's
    other queues leave idle (None: as many as they lend; 0: never)."""

    cluster_queue: str
    gpus: int
    local_queues: tuple[tuple[str, str], ...]
    borrowing_limit: int | None = None


def _flavor(pool: NodePool) -> dict[str, Any]:
    """The ResourceFlavor of the GPU pool: its nodes' labels (Kueue puts them in an admitted pod's nodeSelector) and
    taints (it admits only pods tolerating them)."""
    spec = {"nodeLabels": dict(pool.node_selector), "nodeTaints": [dict(t) for t in pool_taints(pool)]}
    return {"apiVersion": f"{GROUP}/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}, "spec": spec}


def _cluster_queue(team: TeamQueue) -> dict[str, Any]:
    """A team's ClusterQueue: open to its LocalQueues' namespaces only; a run of a higher WorkloadPriorityClass
    preempts a lower one of the same queue, and no queue reclaims what it lent (borrowing is left alone)."""
    gpu: dict[str, Any] = {"name": GPU, "nominalQuota": team.gpus}
    if team.borrowing_limit is not None:
        gpu["borrowingLimit"] = team.borrowing_limit
    resources = [{"name": name, "nominalQuota": quota} for name, quota in AMPLE.items()] + [gpu]
    namespaces = sorted({namespace for namespace, _ in team.local_queues})
    return {
        "apiVersion": f"{GROUP}/v1beta2",
        "kind": "ClusterQueue",
        "metadata": {"name": team.cluster_queue},
        "spec": {
            "cohortName": COHORT,
            "namespaceSelector": {
                "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}]
            },
            "resourceGroups": [
                {"coveredResources": [*AMPLE, GPU], "flavors": [{"name": FLAVOR, "resources": resources}]}
            ],
            "preemption": {"withinClusterQueue": "LowerPriority", "reclaimWithinCohort": "Never"},
        },
    }


def queue_objects(teams: Sequence[TeamQueue], pool: NodePool | None = None) -> list[dict[str, Any]]:
    """The WorkloadPriorityClasses, the pool's ResourceFlavor, each team's ClusterQueue and LocalQueues."""
    objects: list[dict[str, Any]] = [
        {"apiVersion": f"{GROUP}/v1beta2", "kind": "WorkloadPriorityClass", "metadata": {"name": name}, "value": value}
        for name, value in PRIORITIES.items()
    ]
    objects.append(_flavor(pool or chart_node_pool()))
    for team in teams:
        objects.append(_cluster_queue(team))
        objects += [
            {
                "apiVersion": f"{GROUP}/v1beta2",
                "kind": "LocalQueue",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"clusterQueue": team.cluster_queue},
            }
            for namespace, name in team.local_queues
        ]
    return objects


def set_up_queues(cluster: RealCluster, teams: Sequence[TeamQueue], pool: NodePool | None = None) -> None:
    """Apply `queue_objects` (through Kueue's webhooks) and wait until Kueue reports every queue Active."""
    objects = queue_objects(teams, pool)
    cluster.kubectl(
        "apply", "--server-side", "--field-manager=kleinstyle-kueue", "-f", "-", input=yaml.safe_dump_all(objects)
    )
    queues = [f"clusterqueue/{team.cluster_queue}" for team in teams]
    cluster.kubectl("wait", "--for=condition=Active", "--timeout=60s", *queues)
    for team in teams:
        for namespace, name in team.local_queues:
            cluster.kubectl("wait", "--for=condition=Active", "--timeout=60s", "-n", namespace, f"localqueue/{name}")
