"""`NodeAgent`: the kubelet of the real control plane (RealCluster), running the pods bound to its nodes as processes.

The cluster tier's control plane has no kubelet, so its pods stay Pending. The agent registers Nodes the way the
chart's defaults expect them (a plain CPU node, and a GPU node carrying the default pool's labels, the taints its
tolerations answer and 8 `nvidia.com/gpu`), keeps their Leases and Ready conditions fresh, and runs every pod the
real scheduler binds to them with the same container layer as the emulator's executor (pod_setup.py): a rootfs
folder of symlinks, volumes as folders, the pod's env. Unlike the emulator it acts as a kubelet does, through the
API and under the node's own identity (`system:node:NAME`, which the Node authorizer confines to its pods' objects):
status through pods/status, ServiceAccount tokens from the TokenRequest API, the pod deleted with grace 0 once its
process is gone. The Job controller, scheduler and garbage collector are the real ones.

    with RealCluster() as cluster, NodeAgent(cluster, root) as agent:
        ...  # Jobs run; agent.log_path(pod) is a pod's output

What a kubelet does that it does not: containers are processes of this machine (no image, no isolation but the
optional read-only binds, no memory limit, all on 127.0.0.1), only the first container runs (no init or sidecar
containers), no probes (a running container is Ready), of the kubelet's API only containerLogs (`kubectl logs`; no
`exec`, `attach` or `port-forward`), no events, no eviction, pod-level activeDeadlineSeconds or static pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import aiohttp
import yaml
from aiohttp import web
from kleinstyle.operator.config import NodePool, OperatorConfig

from . import containers
from .controlplane import KUBE_VERSION, KUBELET_CLIENT_USER
from .errors import ApiError
from .lifecycle import ThreadedService
from .pod_logs import PodLog
from .pod_setup import (
    PodSetupError,
    PreparedContainer,
    container_status,
    pod_rootfs,
    prepare_container,
    prepare_until_ready,
    run_process,
)
from .store import now_rfc3339

logger = logging.getLogger(__name__)

CHART_VALUES = Path(__file__).resolve().parents[3] / "charts" / "kleinstyle" / "values.yaml"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40  # the kubelet's lease duration; the node lifecycle controller's grace period is longer
STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
POD_IP = "127.0.0.1"
TOKEN_REFRESH = 0.8  # a projected token is rewritten once this share of its lifetime has passed, as the kubelet does
SHUTDOWN_REASON = "Pod was terminated in response to imminent node shutdown."
# How long the agent keeps sending a pod's status, a read or a token request to an API server that is away
# (restarting, its etcd stalled): a kubelet's status manager keeps trying, and a pod must not die of it.
API_PATIENCE_S = 120.0
TRANSIENT_CODES = frozenset({429, 500, 502, 503, 504})
# A namespace, pod or container name as the API validated it: nothing in it can leave the agent's logs folder.
OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
# Log options the API server may pass on that the agent's plain log files cannot honour (no per-line times), nor
# `stream` other than All (stdout and stderr share one file).
UNSUPPORTED_LOG_OPTIONS = ("timestamps", "sinceSeconds", "sinceTime", "limitBytes")
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())  # as Go names it
# Runs the container's argv after binding each `MODE:PATH` onto itself with that mode (ro, or rw for a writable mount
# inside a read-only one: a bind inherits its source's read-only flag) in the private mount namespace it runs in.
READ_ONLY_SCRIPT = """
while [ "$1" != -- ]; do
  mode=${1%%:*} path=${1#*:}
  mount --bind "$path" "$path" && mount -o "remount,bind,$mode" "$path" || exit 126
  shift
done
shift
exec "$@"
"""


class ClusterAccess(Protocol):
    """What the agent needs of a cluster (RealCluster has it): the API's URL, its CA and client certificates."""

    server: str
    ca_file: Path

    def client_certificate(self, user: str, group: str | None = None) -> tuple[Path, Path]: ...

    def serving_certificate(self, name: str, ips: Sequence[str]) -> tuple[Path, Path]: ...


@dataclass(frozen=True)
class NodeSpec:
    """A node to register: its name, labels, taints and capacity (allocatable is the same)."""

    name: str
    capacity: Mapping[str, str]
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Mapping[str, str], ...] = ()


def chart_node_pool(values: Path = CHART_VALUES) -> NodePool:
    """The chart's default node pool (config.nodePools[config.defaultNodePool]): where the operator sends GPU Jobs
    once installed with the chart; the operator's built-in default where the chart is not beside this package."""
    if not values.is_file():
        defaults = OperatorConfig()
        return defaults.node_pools[defaults.default_node_pool]
    config = yaml.safe_load(values.read_text(encoding="utf-8"))["config"]
    return NodePool.model_validate(config["nodePools"][config["defaultNodePool"]])


def pool_taints(pool: NodePool) -> tuple[dict[str, str], ...]:
    """The taints a pool's tolerations answer, one each: the pool's nodes keep every other pod away, as a GPU pool's
    taint does (a toleration with no effect tolerates NoSchedule too)."""
    taints = []
    for toleration in pool.tolerations:
        taint = {"key": toleration.key, "effect": toleration.effect or "NoSchedule"}
        if toleration.operator == "Equal" and toleration.value:
            taint["value"] = toleration.value
        taints.append(taint)
    return tuple(taints)


def default_nodes(pool: NodePool | None = None) -> tuple[NodeSpec, NodeSpec]:
    """One CPU node without taints and one 8-GPU node of the chart's default pool (an H200 node's size)."""
    pool = pool or chart_node_pool()
    cpu = NodeSpec("kleinstyle-cpu", {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "500Gi"})
    gpu = NodeSpec(
        "kleinstyle-gpu",
        {"cpu": "192", "memory": "2Ti", "pods": "110", "ephemeral-storage": "2Ti", "nvidia.com/gpu": "8"},
        labels={**pool.node_selector, "nvidia.com/gpu.present": "true", "nvidia.com/gpu.count": "8"},
        taints=pool_taints(pool),
    )
    return cpu, gpu


def service_env(server: str) -> dict[str, str]:
    """The `kubernetes` Service's variables a kubelet gives every pod, naming the API server itself: the control
    plane runs without an endpoint reconciler, so there is no Service address to reach it by."""
    url = urlsplit(server)
    host, port = url.hostname or "127.0.0.1", str(url.port or 443)
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": port,
        "KUBERNETES_SERVICE_PORT_HTTPS": port,
        "KUBERNETES_PORT": f"tcp://{host}:{port}",
    }


def cpu_share(container: Mapping[str, Any]) -> int | None:
    """The cores a container's CPU limit allows, rounded up and at most this machine's: its thread pools' size."""
    limit = ((container.get("resources") or {}).get("limits") or {}).get("cpu")
    if limit is None:
        return None
    text = str(limit)
    cores = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    return max(1, min(math.ceil(cores), os.cpu_count() or 1))


def _micro_time() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def read_only_runner(scratch: Path) -> list[str] | None:
    """The command prefix that gives a process a private mount namespace (as root, or in a user namespace of its
    own), if this machine allows one and read-only binds hold in it; None where neither does."""
    unshare, mount = shutil.which("unshare"), shutil.which("mount")
    if unshare is None or mount is None:
        return None
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as probe:
        # Exit 0 only from inside the namespace, with the write refused (unshare fails 1, a bind 126, a write 3).
        attempt = f"if (: > {probe}/w) 2>/dev/null; then exit 3; fi"
        for prefix in (
            [unshare, "--mount", "--propagation", "private"],
            [unshare, "--user", "--map-current-user", "--mount", "--propagation", "private"],
        ):
            check = [*prefix, "sh", "-c", READ_ONLY_SCRIPT, "probe", f"ro:{probe}", "--", "sh", "-c", attempt]
            if subprocess.run(check, capture_output=True, check=False, timeout=10).returncode == 0:
                return prefix
    return None


# --- the API, as one node ---------------------------------------------------------------------------------------------


class _Api:
    """A minimal async client of the API server under one client certificate."""

    def __init__(self, server: str, ca_file: Path, cert: Path, key: Path) -> None:
        self.server = server.rstrip("/")
        self._ssl = ssl.create_default_context(cafile=str(ca_file))
        self._ssl.load_cert_chain(str(cert), str(key))
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            # trust_env off: no proxy, even where HTTPS_PROXY is set; everything is on loopback.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl), trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        timeout = aiohttp.ClientTimeout(total=30)
        async with self._open().request(
            method, self.server + path, data=data, params=params, headers=headers, timeout=timeout
        ) as response:
            text = await response.text()
            try:
                payload = json.loads(text) if text else None
            except ValueError:
                payload = text
            if response.status >= 400:
                raise ApiError.from_status(response.status, payload)
            return payload

    async def watch(self, path: str, params: Mapping[str, str], timeout: float) -> AsyncIterator[dict[str, Any]]:
        """The events of one watch request, until the server ends it (after `timeout` seconds)."""
        query = {**params, "watch": "true", "timeoutSeconds": str(math.ceil(timeout))}
        limits = aiohttp.ClientTimeout(total=timeout + 15)
        async with self._open().get(self.server + path, params=query, timeout=limits) as response:
            if response.status >= 400:
                raise ApiError.from_status(response.status, await response.json(content_type=None))
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)


async def until_answered(call: Callable[[], Awaitable[Any]], patience: float = API_PATIENCE_S) -> Any:
    """`call()`'s answer, asked again every second while the API server is away (no connection, a timeout, 429 or a
    5xx) for up to `patience` seconds, as a kubelet keeps trying; then the last failure is raised. Any other refusal
    is raised at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        try:
            return await call()
        except ApiError as exc:
            if exc.code not in TRANSIENT_CODES or loop.time() >= deadline:
                raise
        except (aiohttp.ClientError, OSError, TimeoutError):
            if loop.time() >= deadline:
                raise
        await asyncio.sleep(1.0)


def _pod_path(pod: Mapping[str, Any], subresource: str = "") -> str:
    meta = pod["metadata"]
    path = f"/api/v1/namespaces/{quote(meta['namespace'])}/pods/{quote(meta['name'])}"
    return f"{path}/{subresource}" if subresource else path


def _condition(kind: str, status: bool, reason: str = "", message: str = "") -> dict[str, Any]:
    """A pod condition for a strategic merge patch: a reason or message it lacks is removed (null), not kept."""
    return {
        "type": kind,
        "status": "True" if status else "False",
        "reason": reason or None,
        "message": message or None,
        "lastTransitionTime": now_rfc3339(),
    }


def _pod_conditions(ready: bool, container: str, *, finished: bool = False) -> list[dict[str, Any]]:
    """The conditions a kubelet keeps (PodScheduled is the scheduler's): Ready follows the one container."""
    if ready:
        reason, message = "", ""
    elif finished:
        reason, message = "PodCompleted", ""
    else:
        reason, message = "ContainersNotReady", f"containers with unready status: [{container}]"
    return [
        _condition("PodReadyToStartContainers", not finished),
        _condition("Initialized", True),
        _condition("Ready", ready, reason, message),
        _condition("ContainersReady", ready, reason, message),
    ]


# --- one pod ----------------------------------------------------------------------------------------------------------


@dataclass
class _Token:
    """A projected ServiceAccount token the agent keeps fresh while its pod runs."""

    pod: dict[str, Any]
    source: Mapping[str, Any]
    target: Path
    refresh_at: float


class _PodRun:
    """One pod on one node: set up, run (again, as its restartPolicy says), report, and clean up after deletion."""

    def __init__(self, kubelet: _Kubelet, pod: dict[str, Any]) -> None:
        self.kubelet = kubelet
        self.pod = pod
        self.stop: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.shutdown = False  # stopped because the agent stops (a node shutdown), not because the pod was deleted
        self.pid: int | None = None  # the running container's process (its process group's leader)
        self.task = asyncio.create_task(self._run(), name=f"node-agent pod {pod['metadata']['name']}")

    @property
    def container(self) -> dict[str, Any]:
        first: dict[str, Any] = self.pod["spec"]["containers"][0]
        return first

    @property
    def in_image(self) -> bool:
        """Whether the container runs from its image with podman (containers.py) rather than as a local process."""
        return self.container.get("image") in self.kubelet.agent.images

    @property
    def container_name(self) -> str:
        """The podman container's name, as the kubelet's dockershim named them."""
        meta = self.pod["metadata"]
        return f"k8s_{self.container.get('name', 'main')}_{meta['name']}_{meta['namespace']}_{meta['uid'][:8]}"

    async def _in_image(self, prepared: PreparedContainer) -> tuple[PreparedContainer, list[str]]:
        """`prepared` made ready to run from the image, and the `podman run` argv that does: the termination-message
        file and the writable volumes opened to the pod's fsGroup (emptyDirs to all, as the kubelet makes them)."""
        pod, container = self.pod, self.container
        prepared.termination_log.parent.mkdir(parents=True, exist_ok=True)
        prepared.termination_log.touch()
        prepared.termination_log.chmod(0o666)
        for volume in pod["spec"].get("volumes") or []:
            if "emptyDir" in volume:
                (prepared.rootfs / ".volumes" / volume["name"]).chmod(0o777)
        group = (pod["spec"].get("securityContext") or {}).get("fsGroup")
        if group is not None:
            writable = [mount.source for mount in prepared.mounts if not mount.read_only and mount.source.is_dir()]
            await asyncio.to_thread(containers.grant_fs_group, writable, int(group))
        user = await asyncio.to_thread(containers.image_user, container["image"])
        argv = containers.podman_argv(
            pod, container, prepared, name=self.container_name, image_user=user, tool=containers.podman() or "podman"
        )
        return dataclasses.replace(prepared, env=containers.podman_env()), argv

    def request_stop(self, grace: float) -> None:
        if not self.stop.done():
            self.stop.set_result(grace)

    async def _status(self, status: dict[str, Any]) -> None:
        """Report `status`, waiting out an API server that is away; a pod deleted meanwhile needs no status, and one
        the server stays away from past the agent's patience is reported no more (its next change is)."""
        api, path = self.kubelet.api, _pod_path(self.pod, "status")
        try:
            await until_answered(lambda: api.request("PATCH", path, {"status": status}, content_type=STRATEGIC))
        except ApiError:
            pass
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            logger.warning("node agent: the status of pod %s went unreported: %s", path, exc)

    async def _run(self) -> None:
        agent, container = self.kubelet.agent, self.container
        if self._left_running():
            # Its process died with an earlier agent: what a restarted kubelet reports of a container it lost.
            await self._finish(self._lost())
            return
        waiting = {"waiting": {"reason": "ContainerCreating"}}
        await self._status(
            {
                "phase": "Pending",
                "startTime": now_rfc3339(),
                "hostIP": POD_IP,
                "hostIPs": [{"ip": POD_IP}],
                "podIP": POD_IP,
                "podIPs": [{"ip": POD_IP}],
                "conditions": _pod_conditions(False, container.get("name", "main")),
                "containerStatuses": [container_status(container, waiting)],
            }
        )

        async def still_waiting(exc: PodSetupError) -> None:
            state = {"waiting": {"reason": exc.reason, "message": exc.message}}
            await self._status({"containerStatuses": [container_status(container, state)]})

        preparing = asyncio.ensure_future(
            prepare_until_ready(
                lambda: prepare_container(
                    self.pod,
                    agent.root,
                    self.kubelet.read,
                    api_env=agent.api_env,
                    default_command=agent.entrypoint,
                    cpus=cpu_share(container),
                    write_token=self.kubelet.write_token,
                    in_image=self.in_image,
                ),
                still_waiting,
            )
        )
        either: set[asyncio.Future[Any]] = {preparing, self.stop}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not preparing.done():  # deleted (or the agent stops) while it waits for what it needs
            preparing.cancel()
            await asyncio.wait({preparing})
            await self._finish(self._lost())
            return
        prepared = preparing.result()
        if isinstance(prepared, PodSetupError):
            failed = {"exitCode": 128, "reason": prepared.reason, "message": prepared.message}
            await self._finish({**failed, "finishedAt": now_rfc3339()})
            return
        wrapper = agent.read_only_wrapper(prepared)
        if self.in_image:
            try:
                prepared, wrapper = await self._in_image(prepared)
            except PodSetupError as exc:  # e.g. runAsNonRoot with a root image: the kubelet waits, saying why
                await still_waiting(exc)
                await asyncio.shield(self.stop)
                await self._finish(self._lost())
                return
        await self._run_container(prepared, wrapper)

    @staticmethod
    def _lost() -> dict[str, Any]:
        return {
            "exitCode": 137,
            "reason": "ContainerStatusUnknown",
            "message": "The container could not be located when the pod was terminated",
            "finishedAt": now_rfc3339(),
        }

    def _left_running(self) -> bool:
        statuses = (self.pod.get("status") or {}).get("containerStatuses") or []
        return any("running" in (status.get("state") or {}) for status in statuses)

    async def _run_container(self, prepared: PreparedContainer, wrapper: list[str]) -> None:
        agent, container = self.kubelet.agent, self.container
        policy = self.pod["spec"].get("restartPolicy", "Always")
        log_path = agent.log_path(self.pod)
        restarts, last_state = 0, None
        while True:

            async def running(pid: int, started: str, restarts: int = restarts, last_state: Any = last_state) -> None:
                self.pid = pid
                state = {"running": {"startedAt": started}}
                await self._status(
                    {
                        "phase": "Running",
                        "conditions": _pod_conditions(True, container.get("name", "main")),
                        "containerStatuses": [
                            container_status(
                                container, state, ready=True, pid=pid, restart_count=restarts, last_state=last_state
                            )
                        ],
                    }
                )

            try:
                exited = await run_process(
                    prepared, log_path, running, kill_grace=agent.shutdown_grace, stop=self.stop, wrapper=wrapper
                )
            finally:
                if self.in_image:  # a killed podman client leaves its container behind
                    await asyncio.shield(asyncio.to_thread(containers.remove, self.container_name))
            self.pid = None
            again = policy == "Always" or (policy == "OnFailure" and exited.exit_code != 0)
            if self.stop.done() or not again:
                await self._finish(exited.terminated(), restarts=restarts, last_state=last_state)
                return
            # The container restarts in place after a back-off (10 s, doubling to 5 min, as the kubelet's).
            delay = min(agent.restart_backoff * 2**restarts, 300.0)
            restarts, last_state = restarts + 1, {"terminated": exited.terminated()}
            message = f"back-off {delay:g}s restarting failed container={container.get('name', 'main')}"
            state = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
            await self._status(
                {
                    "conditions": _pod_conditions(False, container.get("name", "main")),
                    "containerStatuses": [
                        container_status(container, state, restart_count=restarts, last_state=last_state)
                    ],
                }
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.stop), delay)
            if self.stop.done():
                await self._finish(exited.terminated(), restarts=restarts)
                return
            log_path.replace(log_path.with_suffix(".previous.log"))  # `kubectl logs --previous`, as a file

    async def _finish(
        self, terminated: dict[str, Any], *, restarts: int = 0, last_state: dict[str, Any] | None = None
    ) -> None:
        """The terminal status: Succeeded when the container exited 0, else Failed (a deleted pod's too, as kubelets
        since 1.27 report it before the pod goes); a node shutdown says so, as a disruption."""
        container = self.container
        status: dict[str, Any] = {
            "phase": "Succeeded" if terminated["exitCode"] == 0 else "Failed",
            "conditions": _pod_conditions(False, container.get("name", "main"), finished=True),
            "containerStatuses": [
                container_status(container, {"terminated": terminated}, restart_count=restarts, last_state=last_state)
            ],
        }
        if self.shutdown:
            status.update({"phase": "Failed", "reason": "Terminated", "message": SHUTDOWN_REASON})
            status["conditions"].append(_condition("DisruptionTarget", True, "TerminationByKubelet", SHUTDOWN_REASON))
        await self._status(status)


# --- one node ---------------------------------------------------------------------------------------------------------


class _Kubelet:
    """One node: its registration, heartbeats, the pods bound to it and their tokens, under the node's identity."""

    def __init__(self, agent: NodeAgent, spec: NodeSpec, api: _Api) -> None:
        self.agent = agent
        self.spec = spec
        self.api = api
        self.uid = ""
        self.ready_since = now_rfc3339()
        self.runs: dict[str, _PodRun] = {}
        self.deleted: set[str] = set()  # pods already deleted with grace 0, waiting for their finalizers
        self.tokens: dict[Path, _Token] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.lost = False  # powered off: no Lease, no status, its pods' processes gone (NodeAgent.lose_node)

    async def power_off(self) -> int:
        """What a node that loses power does: its pods' processes die at once (SIGKILL, nothing reported) and its
        Lease and heartbeats stop. The Node and its pods stay in the API as they were, for the control plane to
        find out. Returns how many pods' processes were killed."""
        self.lost = True
        for task in self.tasks:
            task.cancel()
        killed = 0
        for run in self.runs.values():
            if run.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run.pid, signal.SIGKILL)
                    killed += 1
            run.task.cancel()  # before its process's end is seen: a dead node reports nothing
        await asyncio.gather(*self.tasks, *(run.task for run in self.runs.values()), return_exceptions=True)
        self.tasks.clear()
        self.runs.clear()
        self.tokens.clear()
        return killed

    # -- the Node and its Lease

    def _node_status(self) -> dict[str, Any]:
        now = now_rfc3339()

        def condition(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": self.ready_since,
            }

        capacity = dict(self.spec.capacity)
        return {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                condition("Ready", "True", "KubeletReady", "kleinstyle node agent is posting ready status"),
            ],
            "addresses": [{"type": "InternalIP", "address": POD_IP}, {"type": "Hostname", "address": self.spec.name}],
            # Where the API server reaches this node's kubelet API (containerLogs, for pods/log), on its InternalIP.
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.agent.kubelet_api.port}},
            "nodeInfo": {
                "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, self.spec.name).hex,
                "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, self.spec.name)),
                "bootID": self.agent.boot_id,
                "kernelVersion": platform.release(),
                "osImage": "kleinstyle node agent (local processes)",
                "containerRuntimeVersion": "local://0.1.0",
                "kubeletVersion": KUBE_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": ARCH,
            },
        }

    async def register(self) -> None:
        """Create the Node (or take over one left registered), then its Lease, as a kubelet starting up does."""
        name = self.spec.name
        labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": ARCH,
            **self.spec.labels,
        }
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": labels},
            "spec": {"taints": [dict(taint) for taint in self.spec.taints]},
            "status": self._node_status(),
        }
        try:
            created = await self.api.request("POST", "/api/v1/nodes", node)
        except ApiError as exc:
            if exc.code != 409:
                raise
            created = await self.api.request("GET", f"/api/v1/nodes/{quote(name)}")
        self.uid = created["metadata"]["uid"]
        await self.post_status()
        await self.renew_lease()

    async def post_status(self) -> None:
        await self.api.request(
            "PATCH",
            f"/api/v1/nodes/{quote(self.spec.name)}/status",
            {"status": self._node_status()},
            content_type=STRATEGIC,
        )

    async def renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{quote(self.spec.name)}"
        try:
            await self.api.request("PATCH", path, {"spec": {"renewTime": _micro_time()}}, content_type=MERGE)
        except ApiError as exc:
            if exc.code != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.spec.name, "uid": self.uid}
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.spec.name, "namespace": LEASE_NAMESPACE, "ownerReferences": [owner]},
                "spec": {
                    "holderIdentity": self.spec.name,
                    "leaseDurationSeconds": LEASE_SECONDS,
                    "renewTime": _micro_time(),
                },
            }
            await self.api.request("POST", f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases", lease)

    async def heartbeat(self) -> None:
        """Renew the Lease and the Ready condition, and rewrite tokens near their expiry, every `heartbeat` seconds."""
        while True:
            await asyncio.sleep(self.agent.heartbeat)
            try:
                await self.renew_lease()
                await self.post_status()
                await self.refresh_tokens()
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                logger.warning("node agent %s: heartbeat failed: %s", self.spec.name, exc)

    # -- what its pods read

    async def read(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A ConfigMap or Secret a pod uses. The Node authorizer lets a node read only those of its pods, and learns
        of a new pod a moment after it is bound: a refusal is a reason to wait, as a missing object is."""
        try:
            path = f"/api/v1/namespaces/{namespace}/{plural}/{name}"
            found: dict[str, Any] = await until_answered(lambda: self.api.request("GET", path))
            return found
        except ApiError as exc:
            if exc.code == 404:
                return None
            if exc.code == 403:
                raise PodSetupError("ContainerCreating", exc.message) from exc
            raise

    async def write_token(self, pod: dict[str, Any], source: Mapping[str, Any], target: Path) -> None:
        """A token of the pod's ServiceAccount from the TokenRequest API, bound to the pod, with the source's audience
        and lifetime, written where the projection puts it; kept fresh until the pod goes."""
        meta = pod["metadata"]
        account = pod["spec"].get("serviceAccountName") or "default"
        spec: dict[str, Any] = {
            "expirationSeconds": int(source.get("expirationSeconds", 3600)),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token"
        try:
            issued = await until_answered(lambda: self.api.request("POST", path, request))
        except ApiError as exc:
            if exc.code in (403, 404):  # the authorizer has not seen the pod yet, or the account is not there
                raise PodSetupError("ContainerCreating", f"failed to fetch token: {exc.message}") from exc
            raise
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(f".{target.name}.new")
        staged.write_text(issued["status"]["token"], encoding="utf-8")
        staged.replace(target)  # a reader never sees half a token
        expires = datetime.datetime.fromisoformat(issued["status"]["expirationTimestamp"].replace("Z", "+00:00"))
        lifetime = (expires - datetime.datetime.now(datetime.UTC)).total_seconds()
        refresh_at = asyncio.get_running_loop().time() + TOKEN_REFRESH * max(lifetime, 0.0)
        self.tokens[target] = _Token(pod, source, target, refresh_at)

    async def refresh_tokens(self) -> None:
        now = asyncio.get_running_loop().time()
        for token in list(self.tokens.values()):
            if token.pod["metadata"]["uid"] not in self.runs:
                del self.tokens[token.target]
            elif now >= token.refresh_at:
                with contextlib.suppress(PodSetupError):
                    await self.write_token(token.pod, token.source, token.target)

    # -- its pods

    async def watch_pods(self) -> None:
        """List and watch the pods bound to this node (the only ones it may), as an informer does, and act on each."""
        selector = {"fieldSelector": f"spec.nodeName={self.spec.name}"}
        while True:
            try:
                listed = await self.api.request("GET", "/api/v1/pods", params=selector)
                present = {pod["metadata"]["uid"]: pod for pod in listed.get("items") or []}
                for pod in present.values():
                    await self.sync(pod)
                for uid in set(self.runs) - set(present):
                    await self.gone(self.runs[uid].pod)
                version = listed["metadata"]["resourceVersion"]
                while True:
                    params = {**selector, "resourceVersion": version, "allowWatchBookmarks": "true"}
                    async for event in self.api.watch("/api/v1/pods", params, self.agent.resync):
                        if event["type"] == "ERROR":
                            raise ApiError.from_status(410, event["object"])  # expired: list again
                        version = event["object"]["metadata"].get("resourceVersion", version)
                        if event["type"] in ("ADDED", "MODIFIED"):
                            await self.sync(event["object"])
                        elif event["type"] == "DELETED":
                            await self.gone(event["object"])
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                logger.warning("node agent %s: watching pods failed, listing again: %s", self.spec.name, exc)
                await asyncio.sleep(1.0)

    async def sync(self, pod: dict[str, Any]) -> None:
        meta, status = pod["metadata"], pod.get("status") or {}
        uid = meta["uid"]
        run = self.runs.get(uid)
        if run is not None:
            run.pod = {**run.pod, "metadata": meta}  # the deletion's grace period, for a stop
        if meta.get("deletionTimestamp"):
            if run is None or run.task.done():
                self._spawn_delete(pod)
            elif not run.stop.done():  # SIGTERM now, SIGKILL after the grace period, then the pod goes
                run.request_stop(float(meta.get("deletionGracePeriodSeconds") or 0))
                run.task.add_done_callback(lambda _: self._spawn_delete(pod))
        elif run is None and status.get("phase") not in ("Succeeded", "Failed"):
            self.runs[uid] = _PodRun(self, pod)

    def _spawn_delete(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        if uid in self.deleted:
            return
        self.deleted.add(uid)
        task = asyncio.get_running_loop().create_task(self._delete(pod), name=f"node-agent delete {uid}")
        self.tasks = [*(t for t in self.tasks if not t.done()), task]

    async def _delete(self, pod: dict[str, Any]) -> None:
        """The kubelet's last word on a pod: its containers are gone, so the pod object may go at once."""
        options = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0}
        options["preconditions"] = {"uid": pod["metadata"]["uid"]}
        try:
            await until_answered(lambda: self.api.request("DELETE", _pod_path(pod), options))
        except ApiError:
            pass  # already gone
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:  # the next list sees it again
            logger.warning("node agent: pod %s not deleted: %s", _pod_path(pod), exc)
            self.deleted.discard(pod["metadata"]["uid"])

    async def gone(self, pod: dict[str, Any]) -> None:
        """The pod object is gone: its process (if any still runs) is killed and its rootfs removed."""
        uid = pod["metadata"]["uid"]
        run = self.runs.pop(uid, None)
        if run is not None and not run.task.done():
            run.task.cancel()
            await asyncio.wait({run.task})
        self.deleted.discard(uid)
        meta = pod["metadata"]
        shutil.rmtree(pod_rootfs(self.agent.root, meta["namespace"], meta["name"]), ignore_errors=True)

    async def stop_pods(self) -> None:
        """A node shutdown: every running pod's process is stopped within the agent's grace and reported Failed."""
        running = [run for run in self.runs.values() if not run.task.done()]
        for run in running:
            run.shutdown = True
            run.request_stop(self.agent.shutdown_grace)
        if running:
            await asyncio.wait({run.task for run in running}, timeout=self.agent.shutdown_grace + 10)
        for run in running:
            run.task.cancel()
        self.runs.clear()


# --- the kubelet API --------------------------------------------------------------------------------------------------


def _common_name(peer: Mapping[str, Any] | None) -> str | None:
    """The CN of a verified TLS peer, as ssl's getpeercert() gives it."""
    for rdn in (peer or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class _KubeletApi:
    """The one part of a kubelet's HTTPS API the agent serves: `containerLogs`, which the API server calls for
    pods/log (`kubectl logs`), from the file each pod's output goes to (PodLog, as the emulator serves it: tailLines,
    follow; `previous` reads the restarted container's file). One server for every node of the agent: they share
    127.0.0.1 and the path names the pod. TLS with a serving certificate of the cluster's CA, and only the API
    server's kubelet client certificate is answered (a kubelet would ask the API server, by SubjectAccessReview,
    whether a caller may read nodes/log or nodes/proxy; the API server is the only caller here)."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        cluster = self.agent.cluster
        cert, key = cluster.serving_certificate("kleinstyle-node-agent", (POD_IP,))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(cluster.ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(str(cert), str(key))
        app = web.Application()
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self.container_logs)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, POD_IP, 0, ssl_context=context).start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def container_logs(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        if _common_name(peer) != KUBELET_CLIENT_USER:
            raise web.HTTPForbidden(text=f"only the API server ({KUBELET_CLIENT_USER}) reads logs here")
        namespace, name, container = (request.match_info[key] for key in ("namespace", "pod", "container"))
        if not all(OBJECT_NAME.fullmatch(part) for part in (namespace, name, container)):
            raise web.HTTPBadRequest(text="not a namespace, pod and container name")
        options = request.query
        unsupported = [key for key in UNSUPPORTED_LOG_OPTIONS if key in options]
        unsupported += ["stream"] if options.get("stream", "All") != "All" else []
        if unsupported:
            raise web.HTTPBadRequest(text=f"the kleinstyle node agent keeps no {', '.join(unsupported)} in its logs")
        run = self.agent.pod_run(namespace, name)
        path = self.agent.log_path({"metadata": {"namespace": namespace, "name": name}})
        previous = options.get("previous") == "true"
        if previous:
            path = path.with_suffix(".previous.log")
        if run is not None and run.container.get("name") != container:
            raise web.HTTPNotFound(text=f"container {container} is not the one this node runs in pod {name}")
        if previous and not path.is_file():  # the kubelet's answer, word for word
            raise web.HTTPBadRequest(text=f'previous terminated container "{container}" in pod "{name}" not found')
        if run is None and not path.is_file():
            raise web.HTTPNotFound(text=f'pod "{name}" does not exist')
        tail = options.get("tailLines", "")
        log = PodLog(
            path,
            follow=options.get("follow") == "true" and not previous,
            tail_lines=int(tail) if tail.isdigit() else None,
            finished=lambda: run is None or run.task.done(),
        )
        return await log.respond(request)


# --- the agent --------------------------------------------------------------------------------------------------------


class NodeAgent(ThreadedService):
    """Kubelets for `nodes` (default: the chart's CPU and GPU node), running their pods under `root`.

    `async with NodeAgent(...)` in an event loop, or `with NodeAgent(...)` from synchronous code (it then runs in a
    thread of its own). Entering returns once every node is registered; leaving stops the pods' processes (reported
    Failed, as a node shutdown), and deletes the Nodes unless `deregister` is off: a node left Ready with no agent
    behind it would take pods that never run.

    `heartbeat`: seconds between Lease renewals and Ready heartbeats. `resync`: how long one watch lasts before the
    pods are listed again. `restart_backoff`: a restarting container's first back-off (doubling up to 5 minutes).
    `shutdown_grace`: SIGTERM to SIGKILL when the agent stops. `read_only_binds`: hold readOnly mounts to it where
    this machine allows a private mount namespace. `entrypoint`: the command of a container that names none (what
    its image's ENTRYPOINT would be, e.g. ["kleinstyle"] for the operator's Deployment). `images`: images in this
    machine's podman storage (`make images`) whose containers run from the image, under the pod's security context
    (containers.py), instead of as local processes.
    """

    thread_name = "node-agent"
    start_timeout = stop_timeout = 60.0  # registering both nodes, and stopping every pod's process

    def __init__(
        self,
        cluster: ClusterAccess,
        root: str | Path,
        *,
        nodes: Sequence[NodeSpec] | None = None,
        heartbeat: float = 10.0,
        resync: float = 60.0,
        restart_backoff: float = 10.0,
        shutdown_grace: float = 5.0,
        deregister: bool = True,
        read_only_binds: bool = True,
        entrypoint: Sequence[str] | None = None,
        images: Collection[str] = (),
    ) -> None:
        self.cluster = cluster
        self.root = Path(root).resolve()
        self.nodes = tuple(nodes) if nodes is not None else default_nodes()
        self.heartbeat = heartbeat
        self.resync = resync
        self.restart_backoff = restart_backoff
        self.shutdown_grace = shutdown_grace
        self.deregister = deregister
        self.entrypoint = list(entrypoint) if entrypoint else None  # for a container that names no command (image's)
        self.images = frozenset(images)
        self.api_env = service_env(cluster.server)
        self.boot_id = str(uuid.uuid4())
        self._read_only_binds = read_only_binds
        self._runner: list[str] | None = None
        self._kubelets: list[_Kubelet] = []
        self.kubelet_api = _KubeletApi(self)
        super().__init__()

    # -- where things are

    def log_path(self, pod: Mapping[str, Any]) -> Path:
        """The file a pod's output goes to (what `kubectl logs` would show)."""
        meta = pod["metadata"]
        return self.root / "logs" / str(meta["namespace"]) / f"{meta['name']}.log"

    def pod_run(self, namespace: str, name: str) -> _PodRun | None:
        """The run of pod `namespace/name` on one of the agent's nodes, while the pod object is there."""
        for kubelet in list(self._kubelets):
            for run in list(kubelet.runs.values()):  # one step under the GIL: safe from another thread
                meta = run.pod["metadata"]
                if (meta["namespace"], meta["name"]) == (namespace, name):
                    return run
        return None

    # -- faults (from any thread while the agent runs in its own, or from its event loop)

    def kill_pod(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> bool:
        """Send `sig` to the process group of pod `namespace/name`'s running container (SIGKILL: what the OOM killer
        or a crashed runtime does to it); the agent then reports its exit as for any other. False when it runs no
        process now."""
        run = self.pod_run(namespace, name)
        pid = run.pid if run is not None else None
        if pid is None:
            return False
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def pod_pid(self, namespace: str, name: str) -> int | None:
        """The process id of pod `namespace/name`'s running container, None while none runs."""
        run = self.pod_run(namespace, name)
        return run.pid if run is not None else None

    def lose_node(self, name: str) -> int:
        """Power node `name` off (`_Kubelet.power_off`): its pods' processes are killed, its Lease stops; the Node
        stays registered, so the node-lifecycle controller finds it NotReady and evicts its pods. Returns the number
        of processes killed. From another thread while the agent runs in its own, or from its loop via
        `alose_node`."""
        if self._loop is None or self._thread is None:
            raise RuntimeError("lose_node from another thread needs the agent run with `with`")
        future = asyncio.run_coroutine_threadsafe(self.alose_node(name), self._loop)
        return future.result(timeout=60)

    async def alose_node(self, name: str) -> int:
        for kubelet in self._kubelets:
            if kubelet.spec.name == name:
                return await kubelet.power_off()
        raise KeyError(f"the agent runs no node {name}")

    @property
    def read_only_enforced(self) -> bool:
        """Whether readOnly mounts hold on this machine (a private mount namespace is available to the agent)."""
        return self._runner is not None

    def read_only_wrapper(self, prepared: PreparedContainer) -> list[str]:
        """The argv prefix that holds the process to its readOnly mounts, where this machine can (else none): each
        is bound read-only onto itself in a private mount namespace, and a writable mount inside one bound again."""
        read_only = sorted({mount.source for mount in prepared.mounts if mount.read_only})
        if not read_only or self._runner is None:
            return []
        nested = sorted(
            {
                mount.source
                for mount in prepared.mounts
                if not mount.read_only and any(mount.source.is_relative_to(folder) for folder in read_only)
            }
        )
        binds = [f"ro:{path}" for path in read_only] + [f"rw:{path}" for path in nested]
        return [*self._runner, "sh", "-c", READ_ONLY_SCRIPT, "read-only-mounts", *binds, "--"]

    # -- asyncio

    async def start(self) -> None:
        """Register every node and start their heartbeats and pod watches."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self._read_only_binds:
            self._runner = await asyncio.to_thread(read_only_runner, self.root / "tmp")
            if self._runner is None:
                logger.info("node agent: no private mount namespace here; readOnly mounts are not enforced")
        await self.kubelet_api.start()  # before the Nodes: each reports its port
        for spec in self.nodes:
            cert, key = self.cluster.client_certificate(f"system:node:{spec.name}", "system:nodes")
            kubelet = _Kubelet(self, spec, _Api(self.cluster.server, self.cluster.ca_file, cert, key))
            self._kubelets.append(kubelet)
            await kubelet.register()
        for kubelet in self._kubelets:
            kubelet.tasks += [
                asyncio.create_task(kubelet.heartbeat(), name=f"node-agent heartbeat {kubelet.spec.name}"),
                asyncio.create_task(kubelet.watch_pods(), name=f"node-agent pods {kubelet.spec.name}"),
            ]

    async def stop(self) -> None:
        """Stop watching, stop every pod's process, deregister the nodes (unless told not to) and close."""
        for kubelet in self._kubelets:
            for task in kubelet.tasks:
                task.cancel()
            await asyncio.gather(*kubelet.tasks, return_exceptions=True)
            kubelet.tasks.clear()
        await asyncio.gather(*(kubelet.stop_pods() for kubelet in self._kubelets))
        for kubelet in self._kubelets:
            await kubelet.api.close()
        await self.kubelet_api.stop()
        if self.deregister and self._kubelets:
            # An administrator's act (`kubectl delete node`): the Node authorizer lets no kubelet delete its Node.
            cert, key = self.cluster.client_certificate("kleinstyle-node-agent", "system:masters")
            admin = _Api(self.cluster.server, self.cluster.ca_file, cert, key)
            for kubelet in self._kubelets:
                with contextlib.suppress(ApiError):
                    await admin.request("DELETE", f"/api/v1/nodes/{quote(kubelet.spec.name)}")
            await admin.close()
        self._kubelets.clear()

    async def __aenter__(self) -> NodeAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
