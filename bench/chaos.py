"""Chaos on the real control plane: the operator's resources run while the cluster misbehaves, and nothing is lost.

StyleBoards, StyleLoRAs, GenerationJobs and LoRAFusions (a few of them planted bad, in ways only the operator can
tell: a board whose source names the operator's own claim, a LoRA for a node pool that does not exist) go into
namespaces of two tenants on Kubernetes v1.37.2 on loopback (`RealCluster`, `make controlplane`), where the node agent
runs every pod for real (the tiny klein trains, renders and fuses on this machine's CPU) on a CPU node and two GPU
nodes. The operator runs as its own process under the chart's ServiceAccount and reaches the API server through
`FaultProxy`. While the runs go on, faults come on a schedule drawn from `--seed`:

- operator-kill: the operator SIGKILLed and started again (and once more after everything settled);
- apiserver-restart: kube-apiserver stopped (SIGTERM or SIGKILL) and started again;
- etcd-pause: etcd SIGSTOPped for a few seconds;
- pod-kill-step, pod-kill-checkpoint: a training pod's process SIGKILLed mid-step, or caught writing a checkpoint
  (the process is held with SIGSTOP until a checkpoint's staging folder shows, then killed);
- job-delete: a running Job deleted by hand (`kubectl delete job`);
- node-loss: a GPU node powered off (its processes killed, its Lease no longer renewed): the node-lifecycle
  controller marks it NotReady, the taint-eviction controller evicts its pods, and the out-of-service taint (an
  administrator's word that it is down) lets the pod garbage collector remove them; the Jobs make new pods elsewhere;
- watch-cut: every watch stream through the proxy dropped mid-stream;
- api-errors: a storm of 429 (with Retry-After), 500, 409 on updates and lost answers to writes, via the proxy;
- quota-cut, where Kueue is built (`make controlplane`): the operator sends GPU Jobs to real Kueue, each tenant a
  ClusterQueue in one cohort, and one tenant's GPU quota is cut to nothing for a while as its runs queue.

The run ends once every resource is Succeeded or Failed, and reports (`--json`: one object) the faults dealt, every
resource's final phase, and the invariants, each counted from what the cluster and the node recorded, not from the
operator's word:

- every good resource Succeeded, every planted one Failed with a message naming its field;
- duplicate_jobs: Jobs the operator created (the API server's audit log of its ServiceAccount) beyond one per run,
  less those the chaos deleted by hand: 0;
- checkpoints_lost: steps a resumed training pod redid that an earlier pod of its run had saved (the pods' own logs:
  `checkpoint step N` and `resuming from ... (step N`): 0;
- half_written_artifacts: files of published artifacts and checkpoints that do not load (safetensors, PNG, JSON,
  torch state), and Succeeded resources without a complete artifact folder: 0;
- GPU-seconds per tenant as the operator's kleinstyle_gpu_seconds_total counted them (scraped by Prometheus where
  hack/prometheus/fetch.sh has run, else by the harness; resets included) agree with what the GPU pods held by their
  own account (container start to end, or to the pod's removal where its node was lost) within 20% + 10 s;
- and, reported: Events per tenant, the API faults the proxy dealt, each fault's details and timings.

The process exits 1 when an invariant fails.

    python bench/chaos.py [--size small|default] [--resources N] [--namespaces M] [--seed S] [--json] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from kleinstyle.contract.layout import CONTACT_SHEET, GENERATION_SUMMARY, LORA_FILE, LORA_SIDECAR, SUCCESS_MARKER
from kleinstyle.devcluster import ApiError, KindRegistry, kinds_from_crd, real_e2e
from kleinstyle.devcluster.controlplane import RealCluster, free_port
from kleinstyle.devcluster.demo import local_artifact
from kleinstyle.devcluster.fault_proxy import FaultProxy, Rates
from kleinstyle.devcluster.kueue_real import RealKueue, TeamQueue, find_kueue, set_up_queues
from kleinstyle.devcluster.lifecycle import terminate
from kleinstyle.devcluster.node_agent import NodeAgent, NodeSpec, default_nodes
from kleinstyle.devcluster.prometheus import Prometheus, find_prometheus
from kleinstyle.devcluster.resources import builtin_kinds
from kleinstyle.operator import crdgen
from kleinstyle.operator.api import API_VERSION
from kleinstyle.operator.api.common import CommonStatus
from kleinstyle.operator.naming import STEP
from operator_scale import (
    CHART_KINDS,
    RELEASE_NAMESPACE,
    AuditedCluster,
    RealClient,
    apply,
    chart_objects,
    operator_kubeconfig,
    served,
    start_operator,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

ARTIFACTS, REFERENCES = "kleinstyle-artifacts", "kleinstyle-references"
TENANT_LABEL = "kleinstyle.dev/tenant"
TENANTS = ("a", "b")
CPU_NODE, GPU_NODES = "kleinstyle-cpu", ("kleinstyle-gpu-a", "kleinstyle-gpu-b")
LOST_NODE = GPU_NODES[1]
GPUS_PER_NODE = "2"  # four GPU pods at once on 2 cores is plenty: the rest wait Unschedulable, as on a full cluster
NODE_GRACE_S = 20.0  # a node unheard of this long is NotReady: above an API server restart or an etcd pause
HEARTBEAT_S = 2.0
POLL_S = 2.0
STALL_S = 240.0  # every fault dealt, and no resource's status changed for this long: the run is stuck
PROMETHEUS_SCRAPE = "1s"
OUT_OF_SERVICE = {"key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown", "effect": "NoExecute"}
TERMINAL = ("Succeeded", "Failed")
CHECKPOINT_LINE = re.compile(r"checkpoint step (\d+)/\d+ loss \S+ -> (\S+)/checkpoints/step_\d+")
RESUME_LINE = re.compile(r"resuming from (\S+)/checkpoints/step_\d+ \(step (\d+) of \d+\)")
POD_ROOT = re.compile(r"^.*/pods/[^/]+/[^/]+(?=/)")
JOB_NAME = re.compile(r"^(?P<owner>.+)-(?P<step>prepare|train|generate|fuse)-(?P<run>[a-z0-9]+)$")
IMAGES = 5
LOCAL_QUEUE = "gpu"  # each tenant namespace's LocalQueue, the operator's default queue for GPU Jobs
GPUS_PER_TENANT = 2  # each tenant's nominal quota: the two GPU nodes' GPUs, shared in one cohort
TRAINING_STEPS = 90
PLURAL = {
    "StyleBoard": "styleboards",
    "StyleLoRA": "styleloras",
    "GenerationJob": "generationjobs",
    "LoRAFusion": "lorafusions",
}


# --- what runs ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """How much runs and how much goes wrong: resources, namespaces (half each tenant's), faults of each kind (dealt
    at seeded times within `window` seconds of the first resource), and how long the whole may take."""

    resources: int
    namespaces: int
    window: float
    faults: Mapping[str, int]
    timeout: float


SIZES = {
    "small": Size(
        12,
        2,
        40.0,
        {
            "operator-kill": 2,
            "apiserver-restart": 1,
            "etcd-pause": 1,
            "pod-kill-step": 1,
            "pod-kill-checkpoint": 1,
            "job-delete": 1,
            "node-loss": 1,
            "watch-cut": 2,
            "api-errors": 1,
            "quota-cut": 1,
        },
        600.0,
    ),
    "default": Size(
        200,
        20,
        600.0,
        {
            "operator-kill": 6,
            "apiserver-restart": 2,
            "etcd-pause": 3,
            "pod-kill-step": 6,
            "pod-kill-checkpoint": 4,
            "job-delete": 4,
            "node-loss": 1,
            "watch-cut": 6,
            "api-errors": 4,
            "quota-cut": 2,
        },
        3600.0,
    ),
}


@dataclass(frozen=True)
class Planned:
    """One resource to create, and for a planted bad one the field its Failed message must name."""

    doc: dict[str, Any]
    bad_field: str | None = None

    @property
    def key(self) -> str:
        meta = self.doc["metadata"]
        return f"{meta['namespace']}/{self.doc['kind']}/{meta['name']}"


def namespaces(count: int) -> list[str]:
    """`count` namespaces, alternating between the tenants: a-00, b-00, a-01, ..."""
    return [f"{TENANTS[i % len(TENANTS)]}-{i // len(TENANTS):02d}" for i in range(count)]


def tenant_of(namespace: str) -> str:
    return namespace.split("-", 1)[0]


def _doc(kind: str, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def board(namespace: str, name: str, offset: int) -> dict[str, Any]:
    """A board of IMAGES of the demo's references (pvc://), captions given, no provider: prepare runs offline."""
    refs = [(offset + i) % 8 + 1 for i in range(IMAGES)]
    images = [{"source": f"pvc://{REFERENCES}/bd9/ref-{r:02d}.png", "caption": f"subject number {r}"} for r in refs]
    spec = {"triggerWord": "bd9style", "images": images, "captioning": {"provider": "none", "givenCaptions": "use"}}
    return _doc("StyleBoard", namespace, name, spec)


def lora(namespace: str, name: str, board_name: str, **training: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"boardRef": {"name": board_name}, "backend": "builtin"}
    if training:
        spec["training"] = training
    return _doc("StyleLoRA", namespace, name, spec)


def generation(namespace: str, name: str, kind: str, source: str) -> dict[str, Any]:
    spec = {"loras": [{"kind": kind, "name": source}], "prompts": ["a fox in the snow"], "width": 256, "height": 256}
    return _doc("GenerationJob", namespace, name, spec)


def fusion(namespace: str, name: str, sources: Sequence[tuple[str, float]], method: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"sources": [{"name": s, "weight": w} for s, w in sources], "method": method}
    if method == "svd":
        spec["rank"] = 8
    return _doc("LoRAFusion", namespace, name, spec)


def unit(namespace: str) -> list[dict[str, Any]]:
    """One namespace's good resources, in an order whose every prefix holds what each member depends on: a board,
    a LoRA on it, a generation with that LoRA, a second LoRA, a fusion of the two; then the same again on a second
    board, generating with the first fusion this time."""
    ns = namespace
    return [
        board(ns, "board-1", 0),
        lora(ns, "lora-1", "board-1"),
        generation(ns, "gen-1", "StyleLoRA", "lora-1"),
        lora(ns, "lora-2", "board-1", rank=16, targetBlocks="single"),
        fusion(ns, "fusion-1", [("lora-1", 0.6), ("lora-2", 0.4)], "svd"),
        board(ns, "board-2", 3),
        lora(ns, "lora-3", "board-2"),
        generation(ns, "gen-2", "LoRAFusion", "fusion-1"),
        lora(ns, "lora-4", "board-2", rank=16, targetBlocks="single"),
        fusion(ns, "fusion-2", [("lora-3", 0.5), ("lora-4", 0.5)], "concat"),
    ]


def planted(namespace: str, index: int) -> Planned:
    """A bad resource the API server admits and only the operator refuses, naming the field."""
    if index % 2 == 0:
        doc = board(namespace, f"bad-board-{index}", 0)
        doc["spec"]["images"][0]["source"] = f"pvc://{ARTIFACTS}/someone-elses/run.png"
        return Planned(doc, "images[0].source")
    doc = lora(namespace, f"bad-lora-{index}", "board-1")
    doc["spec"]["scheduling"] = {"nodePool": "nowhere"}
    return Planned(doc, "spec.scheduling.nodePool")


def plan(total: int, count: int) -> list[Planned]:
    """`total` resources over `count` namespaces: max(2, total // 40) planted bad ones, one per namespace in turn,
    and each namespace's share of the rest a prefix of `unit` (a namespace holds at most len(unit) good ones)."""
    names = namespaces(count)
    bad = max(2, total // 40)
    per = [total // count + (i < total % count) for i in range(count)]
    found: list[Planned] = []
    for i, namespace in enumerate(names):
        planted_here = [planted(namespace, j) for j in range(i, bad, count)]
        good = unit(namespace)[: per[i] - len(planted_here)]
        found += [Planned(doc) for doc in good] + planted_here
    return found


# --- when things go wrong -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the resources were created
    kind: str


NEEDS_TRAINING = frozenset({"node-loss", "pod-kill-step", "pod-kill-checkpoint"})


def schedule(seed: int, size: Size, kueue: bool = True) -> list[Fault]:
    """The faults of a run, at times drawn from `seed` within the size's window: those that need a training pod
    running (the node loss, whose pods must be evicted and replaced while the others still run, and the pod kills)
    in its first half, since faults are dealt one after another and a late one would find the training over (a
    serial `make e2e` met a pod kill at 158 s with every run trained); everything else anywhere in it; a quota cut
    only where Kueue runs."""
    rng = random.Random(seed)
    faults = []
    for kind, count in sorted(size.faults.items()):
        if kind == "quota-cut" and not kueue:
            continue  # no queues to cut without Kueue
        span = size.window / 2 if kind in NEEDS_TRAINING else size.window
        faults += [Fault(round(rng.uniform(span * 0.1, span), 1), kind) for _ in range(count)]
    return sorted(faults, key=lambda f: (f.at, f.kind))


def tenant_queues(spaces: Sequence[str], gpus: int = GPUS_PER_TENANT) -> list[TeamQueue]:
    """Each tenant's ClusterQueue (`gpus` of nominal quota, in one cohort with the other's, borrowing what it leaves
    idle), with a LocalQueue in each of its namespaces."""
    return [
        TeamQueue(f"tenant-{t}", gpus, tuple((ns, LOCAL_QUEUE) for ns in spaces if tenant_of(ns) == t)) for t in TENANTS
    ]


# --- the checks: pure functions of what was recorded -----------------------------------------------------------------


def phase_of(obj: Mapping[str, Any]) -> str:
    return str((obj.get("status") or {}).get("phase") or "")


def settled(obj: Mapping[str, Any]) -> bool:
    """Succeeded or Failed for the resource's current spec."""
    status = obj.get("status") or {}
    return phase_of(obj) in TERMINAL and status.get("observedGeneration") == obj["metadata"].get("generation")


def outcome_problems(planned: Sequence[Planned], final: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Each resource not where it must end: a good one not Succeeded, a planted one not Failed naming its field."""
    problems = []
    for item in planned:
        obj = final.get(item.key)
        status = (obj or {}).get("status") or {}
        phase, message = status.get("phase"), str(status.get("message") or "")
        if item.bad_field is None and phase != "Succeeded":
            problems.append(f"{item.key} is {phase or 'without a phase'}: {message}")
        elif item.bad_field is not None and (phase != "Failed" or item.bad_field not in message):
            problems.append(f"{item.key} (planted: {item.bad_field}) is {phase}: {message}")
    return problems


def job_creates(audit: Iterable[Mapping[str, Any]]) -> Counter[str]:
    """Jobs the audited user created, by namespace/name, from the audit log's completed requests (201 only: a 409 for
    a Job that was there creates nothing)."""
    created: Counter[str] = Counter()
    for event in audit:
        ref = event.get("objectRef") or {}
        code = (event.get("responseStatus") or {}).get("code")
        if (
            event.get("stage") == "ResponseComplete"
            and event.get("verb") == "create"
            and ref.get("resource") == "jobs"
            and not ref.get("subresource")
            and code == 201
        ):
            created[f"{ref.get('namespace')}/{ref.get('name')}"] += 1
    return created


def duplicate_jobs(created: Mapping[str, int], deleted: Mapping[str, int]) -> dict[str, int]:
    """Creations of a Job (one run: its name is its owner, step and run hash) beyond the first and one more for each
    time the chaos deleted it by hand."""
    return {job: n - 1 - deleted.get(job, 0) for job, n in created.items() if n - 1 - deleted.get(job, 0) > 0}


def runs_per_owner(created: Iterable[str]) -> dict[str, int]:
    """Owners (namespace/name/step) for which more than one run (run hash) was created: a run planned again without
    a change of spec."""
    runs: defaultdict[str, set[str]] = defaultdict(set)
    for job in created:
        namespace, _, name = job.partition("/")
        match = JOB_NAME.match(name)
        if match:
            runs[f"{namespace}/{match['owner']}/{match['step']}"].add(match["run"])
    return {owner: len(hashes) for owner, hashes in runs.items() if len(hashes) > 1}


@dataclass(frozen=True)
class PodTrace:
    """What one training pod's log says: the folder it trained in, where it resumed (None: from scratch) and the
    checkpoints it saved."""

    pod: str
    started: str  # the log's first timestamp: pods of one run in order
    folder: str | None
    resumed_at: int | None
    saved: tuple[int, ...]


def in_volume(path: str) -> str:
    """A path a pod logged, as the same path seen from any pod: the node agent roots each pod's mounts in a folder of
    its own (ROOT/pods/NAMESPACE/POD), where a kubelet would mount them at the same path in every container."""
    return POD_ROOT.sub("", path)


def trace_pod(pod: str, text: str) -> PodTrace:
    """The trace of a training pod's log."""
    first = next((line[:23] for line in text.splitlines() if line[:4].isdigit()), "")
    folder, resumed, saved = None, None, []
    for line in text.splitlines():
        if match := RESUME_LINE.search(line):
            folder, resumed = in_volume(match[1]), int(match[2])
        elif match := CHECKPOINT_LINE.search(line):
            folder = folder or in_volume(match[2])
            saved.append(int(match[1]))
    return PodTrace(pod, first, folder, resumed, tuple(saved))


def checkpoint_losses(traces: Sequence[PodTrace]) -> list[dict[str, Any]]:
    """For each training folder, in the order its pods started: every pod that trained after another saved a
    checkpoint there must resume from the last one saved; the steps it redid (saved, less where it resumed) are
    lost. A pod that saved nothing and logged no resume (killed before its first checkpoint, or one that found the
    run done) is no evidence either way."""
    by_folder: defaultdict[str, list[PodTrace]] = defaultdict(list)
    for trace in traces:
        if trace.folder is not None:
            by_folder[trace.folder].append(trace)
    lost = []
    for folder, pods in by_folder.items():
        saved = 0
        for trace in sorted(pods, key=lambda t: t.started):
            resumed = trace.resumed_at if trace.resumed_at is not None else (0 if trace.saved else None)
            if resumed is not None and resumed < saved:
                lost.append({"folder": folder, "pod": trace.pod, "saved": saved, "resumed_at": resumed})
            saved = max(saved, *trace.saved, resumed or 0)
    return lost


def resumes(traces: Sequence[PodTrace]) -> int:
    return sum(trace.resumed_at is not None for trace in traces)


def counter_increase(series: Sequence[float]) -> float:
    """The increase of a counter over its samples, as PromQL's increase() counts it: a drop is a reset (a restarted
    process), after which the whole new value is increase."""
    total = 0.0
    for before, after in itertools.pairwise(series):
        total += after - before if after >= before else after
    return total


def gpu_series(samples: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each tenant's GPU-seconds from scrapes of kleinstyle_gpu_seconds_total (one mapping of namespace to value per
    scrape; a namespace absent from a scrape reads 0, as in a restarted process)."""
    namespaces_seen = sorted({ns for sample in samples for ns in sample})
    per_tenant: defaultdict[str, float] = defaultdict(float)
    for namespace in namespaces_seen:
        per_tenant[tenant_of(namespace)] += counter_increase([sample.get(namespace, 0.0) for sample in samples])
    return {tenant: round(value, 1) for tenant, value in sorted(per_tenant.items())}


def prometheus_gpu(series: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Each tenant's GPU-seconds from Prometheus' raw samples of kleinstyle_gpu_seconds_total (a range vector: one
    series per label set, a drop in one a restarted operator). A series starts from 0: the operator makes a label
    set's counter at its first increment."""
    per_tenant: defaultdict[str, float] = defaultdict(float)
    for one in series:
        values = [0.0, *(float(value) for _, value in one["values"])]
        per_tenant[tenant_of(one["metric"]["namespace"])] += counter_increase(values)
    return {tenant: round(value, 1) for tenant, value in sorted(per_tenant.items())}


def gpu_samples(text: str) -> dict[str, float]:
    """kleinstyle_gpu_seconds_total by namespace, from one /metrics answer."""
    found: defaultdict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kleinstyle_gpu_seconds_total":
                found[sample.labels["namespace"]] += sample.value
    return dict(found)


@dataclass
class PodRecord:
    """A pod as the chaos harness saw it over the run."""

    namespace: str
    name: str
    step: str
    node: str
    gpus: int
    started: float | None = None  # epoch seconds
    finished: float | None = None
    last_seen: float = 0.0
    gone_seen: float | None = None  # the first look that found it gone (a look, not the moment it went)


def pod_seconds(records: Iterable[PodRecord]) -> dict[str, tuple[float, float]]:
    """GPU-seconds each tenant's pods held by their own account, as (at least, at most): from the container's start
    to its end; where nobody reported an end (its node lost, its Job deleted), at least until it was last seen and at
    most until a look found it gone (the scheduler counts its GPUs held until then). The two differ by the harness's
    2 s between looks, or by as long as the API server was away."""
    least: defaultdict[str, float] = defaultdict(float)
    most: defaultdict[str, float] = defaultdict(float)
    for record in records:
        if record.gpus and record.started is not None:
            tenant = tenant_of(record.namespace)
            least[tenant] += record.gpus * max(0.0, (record.finished or record.last_seen) - record.started)
            most[tenant] += record.gpus * max(
                0.0, (record.finished or record.gone_seen or record.last_seen) - record.started
            )
    return {tenant: (round(least[tenant], 1), round(most[tenant], 1)) for tenant in sorted(least)}


GPU_TOLERANCE = (0.2, 10.0)  # share and seconds: the operator sees a pod's start and end through its watch, late by
# as long as the watch is cut or the API server away, and rounds nothing


def gpu_disagreements(
    operator: Mapping[str, float], pods: Mapping[str, tuple[float, float]]
) -> dict[str, tuple[float, tuple[float, float]]]:
    """Tenants whose GPU-seconds as the operator counted them fall outside what their pods held (at least, at most)
    by more than GPU_TOLERANCE: (operator's, pods')."""
    share, slack = GPU_TOLERANCE
    return {
        tenant: (counted, (least, most))
        for tenant, (least, most) in pods.items()
        if not least * (1 - share) - slack <= (counted := operator.get(tenant, 0.0)) <= most * (1 + share) + slack
    }


def pods_of_tenants(records: Iterable[PodRecord], tenants: Iterable[str]) -> list[dict[str, Any]]:
    """The GPU pods of `tenants` as the harness saw them: what a GPU-seconds disagreement is read against."""
    wanted = set(tenants)
    return [
        asdict(record)
        for record in sorted(records, key=lambda r: (r.namespace, r.started or 0.0))
        if record.gpus and tenant_of(record.namespace) in wanted
    ]


def job_of(pod: str) -> str:
    """The Job a Job's pod belongs to: its name less the random suffix."""
    return pod.rsplit("-", 1)[0]


def epoch(stamp: str | None) -> float | None:
    if not stamp:
        return None
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def record_pod(records: dict[str, PodRecord], pod: Mapping[str, Any], now: float) -> None:
    """Fold one sighting of a pod into its record."""
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    container = (spec.get("containers") or [{}])[0]
    gpus = int(((container.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0))
    record = records.setdefault(
        meta["uid"],
        PodRecord(
            meta["namespace"], meta["name"], (meta.get("labels") or {}).get(STEP, ""), spec.get("nodeName") or "", gpus
        ),
    )
    record.node = spec.get("nodeName") or record.node
    record.last_seen = now
    state = ((status.get("containerStatuses") or [{}])[0]).get("state") or {}
    if "running" in state:
        record.started = record.started or epoch(state["running"].get("startedAt"))
    if "terminated" in state:
        record.started = record.started or epoch(state["terminated"].get("startedAt"))
        record.finished = epoch(state["terminated"].get("finishedAt"))


# --- artifacts ------------------------------------------------------------------------------------------------------


def invalid_file(path: Path) -> str | None:
    """Why a published file does not load, or None when it does (by its kind: JSON, PNG, safetensors, torch state)."""
    try:
        if path.suffix == ".json" or path.name == SUCCESS_MARKER:
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as image:
                image.load()
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            load_file(str(path))
        elif path.suffix == ".pt":
            import torch

            torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".txt":
            path.read_text(encoding="utf-8")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


# What a Succeeded resource's artifact folder holds once published: a whole-folder marker where the step publishes the
# folder at once (prepare, fuse), else the files it publishes one by one, each atomically (train, generate).
PUBLISHED = {
    "StyleBoard": (SUCCESS_MARKER,),
    "LoRAFusion": (SUCCESS_MARKER,),
    "StyleLoRA": (LORA_FILE, LORA_SIDECAR),
    "GenerationJob": (GENERATION_SUMMARY, CONTACT_SHEET),
}


def artifact_problems(volume: Path, expected: Iterable[Path]) -> tuple[list[str], int]:
    """(problems, files checked): every file on the artifact volume must load (checkpoints, datasets, LoRAs, images,
    sidecars), and every file in `expected` (what the Succeeded resources published) must be there. Staging
    folders and files (dot-named: what a killed writer leaves, and no reader opens) are not artifacts."""
    problems, checked = [], 0
    for path in sorted(volume.rglob("*")):
        if path.is_file() and not _staged(path, volume):
            checked += 1
            if (why := invalid_file(path)) is not None:
                problems.append(f"{path.relative_to(volume)}: {why}")
    for path in expected:
        if not path.is_file():
            problems.append(f"{path.relative_to(volume) if path.is_relative_to(volume) else path}: not published")
    return problems, checked


def _staged(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


# --- the harness ----------------------------------------------------------------------------------------------------


@dataclass
class Harness:
    """The world of one run and what happened in it."""

    size: Size
    seed: int
    folder: Path
    cluster: RealCluster
    agent: NodeAgent
    proxy: FaultProxy
    client: RealClient
    kubeconfig: Path
    config: dict[str, Any]
    rng: random.Random
    operator: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    dealt: list[dict[str, Any]] = field(default_factory=list)
    deleted_jobs: Counter[str] = field(default_factory=Counter)
    lost_nodes: dict[str, float] = field(default_factory=dict)
    pods: dict[str, PodRecord] = field(default_factory=dict)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    scrapes: list[dict[str, float]] = field(default_factory=list)
    background: list[asyncio.Task[None]] = field(default_factory=list)
    timed_out: bool = False
    stalled: bool = False
    crashes: list[dict[str, Any]] = field(default_factory=list)  # the operator exiting on its own
    hit_jobs: set[str] = field(default_factory=set)  # namespace/job of every pod a fault killed or Job it deleted
    prometheus: Prometheus | None = None  # scraping the operator, where hack/prometheus/fetch.sh has run
    operator_gpu: dict[str, float] = field(default_factory=dict)
    gpu_counted_by: str = ""
    spaces: Sequence[str] = ()
    kueue: bool = False

    @property
    def root(self) -> Path:
        return self.folder / "node"

    @property
    def volume(self) -> Path:
        return self.root / "volumes" / ARTIFACTS

    def deal(self, kind: str, **detail: Any) -> None:
        self.dealt.append({"kind": kind, "at": round(time.monotonic() - self.started, 1), **detail})
        if "pod" in detail:
            namespace, _, pod = str(detail["pod"]).partition("/")
            self.hit_jobs.add(f"{namespace}/{job_of(pod)}")
        if "job" in detail:
            self.hit_jobs.add(str(detail["job"]))

    def start_operator(self) -> None:
        self.operator = start_operator(self.kubeconfig, self.folder, self.config)

    # -- looking

    async def poll(self) -> None:
        """One look at the resources and pods (skipped while the API server is away), and one scrape of the
        operator's metrics (skipped while it is down)."""
        now = time.time()
        with contextlib.suppress(ApiError, aiohttp.ClientError, OSError, asyncio.TimeoutError):
            for kind, plural in PLURAL.items():
                listed = await self.client.request("GET", f"/apis/{API_VERSION}/{plural}")
                for item in listed.get("items") or []:
                    self.resources[f"{item['metadata']['namespace']}/{kind}/{item['metadata']['name']}"] = item
            listed = await self.client.request("GET", "/api/v1/pods", params={"labelSelector": STEP})
            for pod in listed.get("items") or []:
                record_pod(self.pods, pod, now)
            seen = {pod["metadata"]["uid"] for pod in listed.get("items") or []}
            for uid, record in self.pods.items():
                if uid not in seen and record.gone_seen is None:
                    record.gone_seen = now
        port = self.config["metricsPort"]
        if self.prometheus is not None:
            return
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
            async with (
                aiohttp.ClientSession(trust_env=False) as session,
                session.get(f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as response,
            ):
                self.scrapes.append(gpu_samples(await response.text()))

    def running_pods(self, step: str) -> list[PodRecord]:
        """Pods of `step` whose process runs on a node still up, by name (a seeded choice among them is stable), of
        Jobs no fault has hit yet: a Job allows backoffLimit (2) failed pods, and each pod SIGKILLed is one (as an
        OOM kill is), so killing one Job's pods three times fails its run by design, which proves nothing."""
        found = [
            r
            for r in self.pods.values()
            if r.step == step
            and r.node not in self.lost_nodes
            and f"{r.namespace}/{job_of(r.name)}" not in self.hit_jobs
            and self.agent.pod_pid(r.namespace, r.name) is not None
        ]
        return sorted(found, key=lambda r: (r.namespace, r.name))

    def work_folder(self, pod: PodRecord) -> Path | None:
        """The training folder of a training pod: its owner's artifact folder's work/."""
        listed = [
            obj
            for obj in self.resources.values()
            if obj["kind"] == "StyleLoRA"
            and obj["metadata"]["namespace"] == pod.namespace
            and pod.name.startswith(obj["metadata"]["name"] + "-train-")
        ]
        uri = CommonStatus.read(listed[0].get("status")).artifact_uri if listed else None
        local = local_artifact(self.root, uri) if uri else None
        return Path(local) / "work" if local else None

    async def run(self, planned: Sequence[Planned], faults: Sequence[Fault]) -> float:
        """Create the resources, deal the faults meanwhile, and wait until every resource settled and every fault
        was dealt (or the size's timeout); then kill the operator once more and give the new one 10 s to do what it
        should not (run a finished run again). Returns the seconds until everything settled."""
        self.started = time.monotonic()
        for item in planned:
            doc = item.doc
            await self.client.create(PLURAL[doc["kind"]], doc, doc["metadata"]["namespace"])
        dealing = asyncio.create_task(self.run_faults(faults))
        deadline = self.started + self.size.timeout
        last_change, seen = time.monotonic(), ""
        while time.monotonic() < deadline:
            await self.poll()
            done = len(self.resources) == len(planned) and all(settled(o) for o in self.resources.values())
            if done and dealing.done() and all(t.done() for t in self.background):
                break
            messages = sorted((key, (obj.get("status") or {}).get("message")) for key, obj in self.resources.items())
            now_seen = json.dumps(messages)
            if now_seen != seen:
                last_change, seen = time.monotonic(), now_seen
            elif dealing.done() and time.monotonic() - last_change > STALL_S:
                self.stalled = True  # every fault dealt and nothing moved since: what is left waits for ever
                break
            if dealing.done() and (error := dealing.exception()) is not None:
                raise error
            if self.operator is not None and self.operator.poll() is not None and not _restarting(self):
                # Its Deployment's kubelet would start it again; so does the harness, and the crash is a finding.
                tail = (self.folder / "operator.log").read_text(encoding="utf-8", errors="replace")[-3000:]
                self.crashes.append({"exit": self.operator.returncode, "log_tail": tail})
                self.start_operator()
            await asyncio.sleep(POLL_S)
        settled_s = time.monotonic() - self.started
        self.timed_out = time.monotonic() >= deadline or self.stalled
        dealing.cancel()
        for task in self.background:
            task.cancel()
        self.proxy.calm()
        await self.operator_kill()
        await asyncio.sleep(10.0)
        await self.poll()
        if self.operator is not None:
            terminate(self.operator, 30)
        self.operator_gpu, self.gpu_counted_by = await asyncio.to_thread(self.operator_gpu_seconds)
        return settled_s

    def operator_gpu_seconds(self) -> tuple[dict[str, float], str]:
        """Each tenant's GPU-seconds as the operator counted them (its counter's increase over the run, resets
        included), and who scraped it."""
        if self.prometheus is None:
            return gpu_series(self.scrapes), f"the harness, every {POLL_S:g} s"
        span = int(time.monotonic() - self.started) + 120
        series = self.prometheus.query(f"kleinstyle_gpu_seconds_total[{span}s]")
        return prometheus_gpu(series), f"Prometheus, every {PROMETHEUS_SCRAPE}"

    # -- faults

    async def target(self, step: str, within: float = 60.0) -> PodRecord | None:
        """A running pod of `step`, waiting up to `within` seconds for one."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            candidates = self.running_pods(step)
            if candidates:
                return self.rng.choice(candidates)
            await asyncio.sleep(1.0)
        return None

    async def operator_kill(self) -> None:
        assert self.operator is not None
        self.operator.kill()
        self.operator.wait()
        down = round(self.rng.uniform(0.5, 3.0), 1)
        await asyncio.sleep(down)
        self.start_operator()
        self.deal("operator-kill", down_s=down)

    async def apiserver_restart(self) -> None:
        kill = self.rng.random() < 0.5
        away = await asyncio.to_thread(self.cluster.restart, "kube-apiserver", kill=kill)
        self.deal("apiserver-restart", signal="SIGKILL" if kill else "SIGTERM", away_s=round(away, 1))

    async def etcd_pause(self) -> None:
        paused = round(self.rng.uniform(2.0, 6.0), 1)
        self.cluster.pause("etcd")
        try:
            await asyncio.sleep(paused)
        finally:
            self.cluster.resume("etcd")
        self.deal("etcd-pause", paused_s=paused)

    async def pod_kill_step(self, within: float = 120.0) -> None:
        """SIGKILL a training pod mid-step once it has saved a checkpoint (the next pod must resume from it): its log
        is watched every few milliseconds, since the tiny klein's steps take a few hundredths of a second."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for pod in self.running_pods("train"):
                log = self.root / "logs" / pod.namespace / f"{pod.name}.log"
                text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
                saved = trace_pod(pod.name, text).saved
                if saved and "trained " not in text and self.agent.kill_pod(pod.namespace, pod.name):
                    self.deal("pod-kill-step", pod=f"{pod.namespace}/{pod.name}", after_checkpoint=saved[-1])
                    return
            await asyncio.sleep(0.02)
        self.deal("pod-kill-step", missed="no training pod was caught between checkpoints")

    async def pod_kill_checkpoint(self, within: float = 90.0) -> None:
        """Hold a training pod's processes with SIGSTOP, look for a checkpoint's staging folder, and SIGKILL them
        when there is one (else SIGCONT and look again a moment later), until one is caught mid-checkpoint."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            pod = await self.target("train", within=deadline - time.monotonic())
            work = self.work_folder(pod) if pod is not None else None
            if pod is None or work is None:
                await asyncio.sleep(1.0)
                continue
            while time.monotonic() < deadline and (pid := self.agent.pod_pid(pod.namespace, pod.name)) is not None:
                try:
                    os.killpg(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    break
                staging = (
                    [p.name for p in (work / "checkpoints").glob(".step_*.tmp-*")]
                    if (work / "checkpoints").is_dir()
                    else []
                )
                if staging:
                    os.killpg(pid, signal.SIGKILL)
                    self.deal("pod-kill-checkpoint", pod=f"{pod.namespace}/{pod.name}", writing=staging[0])
                    return
                os.killpg(pid, signal.SIGCONT)
                await asyncio.sleep(0.005)
        self.deal("pod-kill-checkpoint", missed="no training pod was caught writing a checkpoint")

    async def job_delete(self) -> None:
        pod = await self.target("train") or await self.target("prepare", within=10.0)
        job = JOB_NAME.match(job_of(pod.name)) if pod is not None else None
        if pod is None or job is None:
            self.deal("job-delete", missed="no Job ran")
            return
        name = job.string
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        with contextlib.suppress(ApiError):
            await self.client.request("DELETE", f"/apis/batch/v1/namespaces/{pod.namespace}/jobs/{name}", body=body)
            self.deleted_jobs[f"{pod.namespace}/{name}"] += 1
            self.deal("job-delete", job=f"{pod.namespace}/{name}")

    async def node_loss(self) -> None:
        """Power the node off, then act as its administrator: once the control plane has found it NotReady, taint it
        out-of-service (it is down for good), so that its evicted pods are removed and their Jobs replace them."""
        deadline = time.monotonic() + 90.0
        while not any(r.node == LOST_NODE for r in self.running_pods("train")) and time.monotonic() < deadline:
            await asyncio.sleep(1.0)  # a node is lost with work on it, or the loss proves nothing
        if time.monotonic() >= deadline:
            self.deal("node-loss", missed=f"no training pod ran on {LOST_NODE}")
            return
        killed = await asyncio.to_thread(self.agent.lose_node, LOST_NODE)
        lost_at = time.time()
        self.lost_nodes[LOST_NODE] = lost_at
        began = time.monotonic()
        self.deal("node-loss", node=LOST_NODE, processes_killed=killed)
        entry = self.dealt[-1]

        async def recover() -> None:
            await wait_for(f"{LOST_NODE} NotReady", partial(self.node_not_ready, LOST_NODE), timeout=NODE_GRACE_S * 6)
            entry["not_ready_after_s"] = round(time.monotonic() - began, 1)
            node = await self.client.request("GET", f"/api/v1/nodes/{LOST_NODE}")
            taints = [*(node.get("spec") or {}).get("taints", []), OUT_OF_SERVICE]
            await self.client.request(
                "PATCH",
                f"/api/v1/nodes/{LOST_NODE}",
                body={"spec": {"taints": taints}},
                content_type="application/merge-patch+json",
            )
            await wait_for(f"{LOST_NODE}'s pods gone", partial(self.node_empty, LOST_NODE), timeout=120)
            entry["pods_gone_after_s"] = round(time.monotonic() - began, 1)

        self.background.append(asyncio.create_task(recover()))

    async def node_not_ready(self, name: str) -> bool:
        with contextlib.suppress(ApiError, aiohttp.ClientError, OSError, asyncio.TimeoutError):
            node = await self.client.request("GET", f"/api/v1/nodes/{name}")
            ready = [c for c in (node.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"]
            return bool(ready) and ready[0]["status"] != "True"
        return False

    async def node_empty(self, name: str) -> bool:
        with contextlib.suppress(ApiError, aiohttp.ClientError, OSError, asyncio.TimeoutError):
            listed = await self.client.request("GET", "/api/v1/pods", params={"fieldSelector": f"spec.nodeName={name}"})
            return not listed.get("items")
        return False

    async def watch_cut(self) -> None:
        self.deal("watch-cut", streams=await asyncio.to_thread(self.proxy.cut_watches))

    async def api_errors(self) -> None:
        seconds = round(self.rng.uniform(10.0, 20.0), 1)
        rates = Rates(throttle=0.1, error=0.05, conflict=0.2, reset=0.1)
        self.proxy.inject("reset", 2)  # the next two writes are done and their answers lost, whatever the draw
        self.proxy.storm(rates, seconds)
        self.deal("api-errors", seconds=seconds, rates=rates.__dict__, lost_answers=2)

    async def quota_cut(self) -> None:
        """Cut a tenant's GPU quota to nothing while its runs queue (what it lends to the cohort goes with it), then
        give it back: admitted runs go on, queued ones wait, and none may be lost."""
        tenant = self.rng.choice(TENANTS)
        cut = [q for q in tenant_queues(self.spaces, gpus=0) if q.cluster_queue == f"tenant-{tenant}"]
        restored = [q for q in tenant_queues(self.spaces) if q.cluster_queue == f"tenant-{tenant}"]
        seconds = round(self.rng.uniform(15.0, 30.0), 1)
        await asyncio.to_thread(set_up_queues, self.cluster, cut)
        try:
            await asyncio.sleep(seconds)
        finally:
            await asyncio.to_thread(set_up_queues, self.cluster, restored)
        self.deal("quota-cut", cluster_queue=f"tenant-{tenant}", seconds=seconds)

    async def run_faults(self, faults: Sequence[Fault]) -> None:
        """Deal each fault at its time, while the ones before it may still go on (a pod kill waiting for its moment,
        a lost node waiting for work on it)."""
        actions: dict[str, Callable[[], Awaitable[None]]] = {
            "operator-kill": self.operator_kill,
            "apiserver-restart": self.apiserver_restart,
            "etcd-pause": self.etcd_pause,
            "pod-kill-step": self.pod_kill_step,
            "pod-kill-checkpoint": self.pod_kill_checkpoint,
            "job-delete": self.job_delete,
            "node-loss": self.node_loss,
            "watch-cut": self.watch_cut,
            "api-errors": self.api_errors,
            "quota-cut": self.quota_cut,
        }
        # One of a kind at a time: two operator kills at once would leave two operators running.
        locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

        async def deal(kind: str) -> None:
            async with locks["control-plane" if kind in ("apiserver-restart", "etcd-pause", "quota-cut") else kind]:
                await actions[kind]()

        dealing = []
        for fault in faults:
            await asyncio.sleep(max(0.0, self.started + fault.at - time.monotonic()))
            dealing.append(asyncio.create_task(deal(fault.kind), name=f"chaos {fault.kind}"))
        await asyncio.gather(*dealing)


# --- one run ----------------------------------------------------------------------------------------------------------


def chaos_nodes() -> list[NodeSpec]:
    """The CPU node, and two GPU nodes of the chart's default pool with GPUS_PER_NODE GPUs each."""
    cpu, gpu = default_nodes()
    cpu = NodeSpec(CPU_NODE, {**cpu.capacity, "cpu": "4"}, cpu.labels, cpu.taints)
    labels = {**gpu.labels, "nvidia.com/gpu.count": GPUS_PER_NODE}
    return [
        cpu,
        *(NodeSpec(name, {**gpu.capacity, "nvidia.com/gpu": GPUS_PER_NODE}, labels, gpu.taints) for name in GPU_NODES),
    ]


async def set_up(
    cluster: RealCluster, client: RealClient, root: Path, folder: Path, spaces: Sequence[str]
) -> dict[str, Any]:
    """The CRDs, the tenants' namespaces with their claims, the chart's identity for the operator; returns the
    operator's configuration (the chart's ConfigMap rendered with the demo's values)."""
    crds = list(crdgen.build_crds().values())
    apply(cluster, crds)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
    for crd in crds:
        await wait_for(f"{crd['metadata']['name']} served", partial(served, client, crd["spec"]["names"]["plural"]))
    for name in (RELEASE_NAMESPACE, *spaces):
        labels = {TENANT_LABEL: tenant_of(name)} if name in spaces else {}
        await client.create("namespaces", {"metadata": {"name": name, "labels": labels}})
    for namespace in spaces:
        await asyncio.to_thread(real_e2e.bind_claims, cluster, namespace, root)
    rendered = chart_objects(cluster, folder, real_e2e.chart_values(root), CHART_KINDS | {"ConfigMap"})
    (configmap,) = [doc for doc in rendered if doc["kind"] == "ConfigMap"]
    apply(cluster, [doc for doc in rendered if doc["kind"] != "ConfigMap"])
    config: dict[str, Any] = yaml.safe_load(configmap["data"]["operator.yaml"])
    config["metricsPort"] = free_port()
    # Long enough to be killed between checkpoints (three of them, every 30 steps), still seconds on the tiny klein.
    config["trainingLimits"]["maxSteps"] = TRAINING_STEPS
    return config


async def chaos(size: Size, seed: int, folder: Path, *, with_kueue: bool = True) -> dict[str, Any]:
    """One run: set up, create, deal the faults, wait until every resource settles, then count."""
    planned = plan(size.resources, size.namespaces)
    kueue = with_kueue and find_kueue() is not None
    faults = schedule(seed, size, kueue)
    spaces = namespaces(size.namespaces)
    began = time.monotonic()
    crds = list(crdgen.build_crds().values())
    kinds = KindRegistry([*builtin_kinds(), *(kind for crd in crds for kind in kinds_from_crd(crd))])
    cluster = AuditedCluster(node_loss_seconds=NODE_GRACE_S)
    root = folder / "node"
    with (
        cluster,
        NodeAgent(cluster, root, nodes=chaos_nodes(), heartbeat=HEARTBEAT_S) as agent,
        FaultProxy(cluster, seed=seed) as proxy,
        contextlib.ExitStack() as layers_on,
    ):
        client = RealClient(cluster, kinds)
        h: Harness | None = None
        try:
            volumes = asyncio.create_task(asyncio.to_thread(real_e2e.lay_out_volumes, root))
            config = await set_up(cluster, client, root, folder, spaces)
            if kueue:  # before the operator starts: it asks once whether Kueue is there
                layers_on.enter_context(RealKueue(cluster))
                await asyncio.to_thread(set_up_queues, cluster, tenant_queues(spaces))
                config["defaultQueueName"] = LOCAL_QUEUE
            kubeconfig = await operator_kubeconfig(client, proxy.url, cluster.ca_file, folder)
            await volumes
            h = Harness(size, seed, folder, cluster, agent, proxy, client, kubeconfig, config, random.Random(seed))
            h.spaces, h.kueue = spaces, kueue
            if find_prometheus() is not None:
                target = [f"127.0.0.1:{config['metricsPort']}"]
                h.prometheus = layers_on.enter_context(Prometheus(target, scrape_interval=PROMETHEUS_SCRAPE))
            h.start_operator()
            set_up_s = time.monotonic() - began
            settled_s = await h.run(planned, faults)
        finally:
            if h is not None and h.operator is not None and h.operator.poll() is None:
                h.operator.kill()  # a run that failed must not leave an operator behind, retrying a gone server
                h.operator.wait()
            await client.close()
        events = await asyncio.to_thread(list_events, cluster)
        audit = cluster.audited()
    assert h is not None
    return summarise(h, planned, faults, audit, events, set_up_s, settled_s, time.monotonic() - began)


def _restarting(h: Harness) -> bool:
    """Whether the operator is down on purpose (an operator-kill between its kill and its start)."""
    return h.operator is not None and h.operator.returncode == -signal.SIGKILL


def list_events(cluster: RealCluster) -> list[dict[str, Any]]:
    status, listed = cluster.api("GET", "/api/v1/events")
    return list(listed.get("items") or []) if status == 200 else []


def events_per_tenant(events: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """The operator's Events in each tenant's namespaces, by type (counting repeats)."""
    found: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for event in events:
        namespace = event["metadata"]["namespace"]
        if (event.get("source") or {}).get("component") == "kleinstyle-operator" and tenant_of(namespace) in TENANTS:
            found[tenant_of(namespace)][event.get("type") or "?"] += int(event.get("count") or 1)
    return {tenant: dict(sorted(counts.items())) for tenant, counts in sorted(found.items())}


def summarise(
    h: Harness,
    planned: Sequence[Planned],
    faults: Sequence[Fault],
    audit: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    set_up_s: float,
    settled_s: float,
    wall_s: float,
) -> dict[str, Any]:
    final = h.resources
    created = job_creates(audit)
    duplicates = duplicate_jobs(created, h.deleted_jobs)
    replanned = runs_per_owner(created)
    logs = h.root / "logs"
    traces = [
        trace_pod(r.name, (logs / r.namespace / f"{r.name}.log").read_text(encoding="utf-8", errors="replace"))
        for r in h.pods.values()
        if r.step == "train" and (logs / r.namespace / f"{r.name}.log").is_file()
    ]
    lost = checkpoint_losses(traces)
    expected = [
        Path(local) / name
        for obj in final.values()
        if phase_of(obj) == "Succeeded"
        and (local := local_artifact(h.root, CommonStatus.read(obj.get("status")).artifact_uri))
        for name in PUBLISHED[obj["kind"]]
    ]
    broken, checked = artifact_problems(h.volume, expected)
    outcomes = outcome_problems(planned, final)
    dealt = Counter(d["kind"] for d in h.dealt if "missed" not in d)
    missed = [d for d in h.dealt if "missed" in d]
    pods_gpu = pod_seconds(h.pods.values())
    gpu_off = gpu_disagreements(h.operator_gpu, pods_gpu)
    invariants = {
        "settled within the size's timeout, nothing stuck": not h.timed_out,
        "the operator never exited on its own": not h.crashes,
        "every resource where it must end": not outcomes,
        "no duplicate Jobs": not duplicates,
        "no run planned twice": not replanned,
        "no checkpoint lost": not lost,
        "no half-written artifact": not broken,
        "every fault dealt": not missed and sum(dealt.values()) == len(faults) + 1,
        "GPU-seconds counted as the pods held them": not gpu_off,
    }
    return {
        "seed": h.seed,
        "resources": len(planned),
        "namespaces": h.size.namespaces,
        "tenants": list(TENANTS),
        "planted_bad": sum(item.bad_field is not None for item in planned),
        "faults": dict(sorted(dealt.items())),
        "faults_missed": missed,
        "stalled": h.stalled,
        "operator_crashes": h.crashes,
        "api_faults_dealt": dict(h.proxy.injected),
        "phases": dict(Counter(phase_of(o) or "none" for o in final.values())),
        "final": {key: phase_of(obj) for key, obj in sorted(final.items())},
        "not_where_they_must_end": outcomes,
        "jobs_created": sum(created.values()),
        "jobs_deleted_by_hand": sum(h.deleted_jobs.values()),
        "duplicate_jobs": sum(duplicates.values()),
        "duplicates": duplicates,
        "runs_planned_twice": replanned,
        "training_pods": len(traces),
        "resumed_pods": resumes(traces),
        "checkpoints_lost": sum(item["saved"] - item["resumed_at"] for item in lost),
        "checkpoint_losses": lost,
        "artifact_files_checked": checked,
        "half_written_artifacts": len(broken),
        "artifact_problems": broken[:20],
        "events_per_tenant": events_per_tenant(events),
        "gpu_seconds_operator": h.operator_gpu,
        "gpu_seconds_operator_scraped_by": h.gpu_counted_by,
        "gpu_seconds_pods": {tenant: least for tenant, (least, _) in pods_gpu.items()},
        "gpu_seconds_pods_until_gone": {tenant: most for tenant, (_, most) in pods_gpu.items()},
        "gpu_disagreements": gpu_off,
        "gpu_pods_disagreeing": pods_of_tenants(h.pods.values(), gpu_off),
        "pods": len(h.pods),
        "dealt": h.dealt,
        "layers": layers(h.kueue),
        "invariants": invariants,
        "ok": all(invariants.values()),
        "set_up_seconds": round(set_up_s, 1),
        "seconds_to_settle": round(settled_s, 1),
        "wall_seconds": round(wall_s, 1),
        "folder": str(h.folder),
    }


def layers(kueue: bool) -> dict[str, str]:
    """The optional layers, and whether this run had them: real Kueue (each tenant a ClusterQueue in one cohort, a
    quota cut while runs queue) and a real Prometheus scraping the operator."""
    return {
        "kueue": "on" if kueue else "off: not built by `make controlplane`, or --no-kueue",
        "prometheus": "on" if find_prometheus() is not None else "off: hack/prometheus/fetch.sh has not run",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--resources", type=int, help="override the size's resources")
    parser.add_argument("--namespaces", type=int, help="override the size's namespaces")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (logs, artifacts)")
    parser.add_argument("--no-kueue", action="store_true", help="leave real Kueue out even where it is built")
    args = parser.parse_args()
    size = SIZES[args.size]
    if args.resources or args.namespaces:
        size = Size(
            args.resources or size.resources, args.namespaces or size.namespaces, size.window, size.faults, size.timeout
        )
    folder = Path(tempfile.mkdtemp(prefix="kleinstyle-chaos-"))
    try:
        summary = asyncio.run(chaos(size, args.seed, folder, with_kueue=not args.no_kueue))
    except BaseException:
        print(f"chaos: the run broke off; its folder (logs, artifacts) is kept: {folder}", file=sys.stderr)
        raise
    if not args.keep and summary["ok"]:
        shutil.rmtree(folder, ignore_errors=True)  # a failed run's folder stays, to look into
    if args.json:
        print(json.dumps(summary))
    else:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("final", "dealt")}, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
