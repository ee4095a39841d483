"""Kueue's support, against real Kueue: what tests/operator/test_kueue_e2e.py shows with FakeKueue making Kueue's
moves, shown with Kueue's own manager (devcluster/kueue_real.py) deciding them on a real control plane.

The world: Kueue v0.17.0 built from its module, the chart installed by helm with the demo's configuration and
`defaultQueueName: gpu`, its operator as the chart's ServiceAccount (OperatorProcess), the node agent running the
runs' pods (the GPU node has 8 GPUs; Kueue's quota is what limits). In the namespace, two LocalQueues: `team-a-gpu`
(ClusterQueue team-a: 1 GPU, may borrow 1) and `gpu` (ClusterQueue spare: 1 GPU, never borrows), one cohort, and
the WorkloadPriorityClasses low and high. One timeline, in three stages (module fixtures), each test reading what it
recorded:

1. `queued`: a low-priority run of 2 GPUs in team-a-gpu is admitted by borrowing the spare GPU; a run naming no
   queue lands in `gpu` and waits there, for quota its cohort lent.
2. `preempted`: a high-priority run of 1 GPU in team-a-gpu preempts the low one, whose pod is stopped (SIGTERM: a
   checkpoint); the GPUs it freed admit the high one and the waiting one.
3. `resumed`: both finish; the evicted run is admitted again, its next pod resumes from its checkpoint, it is
   stopped and Succeeds, counting one eviction.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from kleinstyle.contract.pod import STOP_ANNOTATION
from kleinstyle.devcluster import real_e2e
from kleinstyle.devcluster.controlplane import RealCluster
from kleinstyle.devcluster.kueue_real import (
    API,
    FLAVOR,
    GPU,
    KUEUE_VERSION,
    RealKueue,
    TeamQueue,
    find_kueue,
    kueue_dir,
    set_up_queues,
)
from kleinstyle.devcluster.node_agent import NodeAgent
from kleinstyle.operator.kueue import JOB_UID_LABEL, QUEUE_LABEL

from tests.operator.test_operator_e2e import BOARD

from .conftest import CHART, CRDS, REPO, started_cluster
from .rbac import OperatorProcess, ensure_namespace, install_chart, service_account, wait_for

NS = "team-a"
OTHER_NS = "team-b"  # a namespace with a LocalQueue named `default`: Kueue's own default queue
TEAM_QUEUE, DEFAULT_QUEUE = "team-a-gpu", "gpu"
TEAM_CQ, SPARE_CQ = "team-a", "spare"
KLEINSTYLE = "/apis/kleinstyle.dev/v1alpha1/namespaces"
LORAS = f"{KLEINSTYLE}/{NS}/styleloras"
NO_QUOTA = f"insufficient unused quota for {GPU} in flavor {FLAVOR}"
BOARD_NAME: str = cast(dict[str, Any], BOARD)["metadata"]["name"]
RUN_TIMEOUT = 120.0  # a pod's start and a hundred steps of the tiny klein on a shared 2-core machine


def lora(name: str, *, steps: int, gpus: int, queue: str | None = None, priority: str | None = None) -> dict[str, Any]:
    """A StyleLoRA of the builtin backend, a checkpoint every 50 steps, no early stop; `queue` and `priority` are
    the Kueue LocalQueue and WorkloadPriorityClass it names (None: it names none)."""
    scheduling: dict[str, Any] = {"gpus": gpus}
    if queue:
        scheduling["queueName"] = queue
    if priority:
        scheduling["priorityClassName"] = priority
    return {
        "apiVersion": "kleinstyle.dev/v1alpha1",
        "kind": "StyleLoRA",
        "metadata": {"name": name},
        "spec": {
            "boardRef": {"name": BOARD_NAME},
            "backend": "builtin",
            "training": {"steps": steps, "checkpointEvery": 50},
            "earlyStopping": {"enabled": False},
            "scheduling": scheduling,
        },
    }


# --- reading the cluster ----------------------------------------------------------------------------------------------


def get(cluster: RealCluster, path: str) -> dict[str, Any]:
    status, body = cluster.api("GET", path)
    assert status == 200, f"GET {path}: {status} {body}"
    return dict(body)


def create(cluster: RealCluster, path: str, obj: dict[str, Any]) -> None:
    status, body = cluster.api("POST", path, obj)
    assert status == 201, f"POST {path}: {status} {body}"


def ready_reason(obj: dict[str, Any]) -> str | None:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c.get("reason") for c in conditions if c["type"] == "Ready"), None)


def lora_when(cluster: RealCluster, name: str, what: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The StyleLoRA `name` once `check` holds for it."""
    return when(cluster, f"{LORAS}/{name}", what, check)


def when(cluster: RealCluster, path: str, what: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The object at `path` once `check` holds for it (its status for the current generation)."""

    last: dict[str, Any] = {}

    def probe() -> dict[str, Any] | None:
        obj = last["seen"] = get(cluster, path)
        current = (obj.get("status") or {}).get("observedGeneration") == obj["metadata"].get("generation")
        return obj if current and check(obj) else None

    try:
        found: dict[str, Any] = wait_for(f"{path} {what}", probe, timeout=RUN_TIMEOUT, interval=0.2)
    except AssertionError as failed:
        raise AssertionError(f"{failed}; its status: {json.dumps(last['seen'].get('status'))[:3000]}") from None
    return found


def phase_is(*phases: str) -> Callable[[dict[str, Any]], bool]:
    return lambda obj: (obj.get("status") or {}).get("phase") in phases


def finished(obj: dict[str, Any]) -> bool:
    """Succeeded, with the Workload Kueue marked Finished after the Job ended in status.queue."""
    status = obj.get("status") or {}
    return status.get("phase") == "Succeeded" and (status.get("queue") or {}).get("state") == "Finished"


def reason_is(reason: str) -> Callable[[dict[str, Any]], bool]:
    return lambda obj: ready_reason(obj) == reason


def job(cluster: RealCluster, obj: dict[str, Any]) -> dict[str, Any]:
    namespace = obj["metadata"]["namespace"]
    return get(cluster, f"/apis/batch/v1/namespaces/{namespace}/jobs/{obj['status']['jobName']}")


def workload(cluster: RealCluster, job_: dict[str, Any]) -> dict[str, Any]:
    """Kueue's Workload of a Job, found as the operator finds it: by the Job's uid label."""
    selector = f"{JOB_UID_LABEL}={job_['metadata']['uid']}"
    namespace = job_["metadata"]["namespace"]
    found = get(cluster, f"{API}/namespaces/{namespace}/workloads?labelSelector={selector}")["items"]
    assert len(found) == 1, f"Job {job_['metadata']['name']}: Workloads {[w['metadata']['name'] for w in found]}"
    return dict(found[0])


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def running_pods(cluster: RealCluster, job_name: str) -> list[dict[str, Any]]:
    pods = get(cluster, f"/api/v1/namespaces/{NS}/pods?labelSelector=job-name={job_name}")["items"]
    return [pod for pod in pods if (pod.get("status") or {}).get("phase") == "Running"]


def gpu_usage(cluster: RealCluster, cluster_queue: str) -> dict[str, Any]:
    """The ClusterQueue's GPU usage in the pool's flavor, as Kueue reports it (total, borrowed)."""
    status = get(cluster, f"{API}/clusterqueues/{cluster_queue}").get("status") or {}
    for flavor in status.get("flavorsUsage") or []:
        if flavor["name"] == FLAVOR:
            return next((r for r in flavor["resources"] if r["name"] == GPU), {})
    return {}


def used(usage: dict[str, Any]) -> dict[str, Any] | None:
    """`usage` where it counts something: a ClusterQueue reports 0 until its status catches up."""
    return usage if str(usage.get("total", "0")) != "0" else None


def resumed_step(logs: Path, job_name: str) -> int | None:
    """The step a pod of the Job resumed from, as the trainer logs it (test_kueue_e2e reads the same line)."""
    for log in sorted(logs.glob(f"{job_name}-*.log")):
        found = re.search(r"resuming from .* \(step (\d+) of \d+\)", log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
    return None


# --- the world --------------------------------------------------------------------------------------------------------


@dataclass
class World:
    cluster: RealCluster
    kueue: RealKueue
    agent: NodeAgent
    operator: OperatorProcess

    def failure_context(self) -> str:
        return f"{self.kueue.logs()}\n--- operator (tail):\n{self.operator.tail(20)}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RealCluster]:
    """A control plane of its own: the chart and Kueue are cluster-wide, and the node agent registers the nodes."""
    if find_kueue() is None:
        pytest.skip(
            f"no Kueue: `make controlplane` builds Kueue {KUEUE_VERSION} into {kueue_dir()} (docs/real-cluster.md)"
        )
    yield from started_cluster(helm=True)


@pytest.fixture(scope="module")
def world(cluster: RealCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Kueue and its queues, the claims, the node agent, the chart (defaultQueueName: gpu) and its operator, and
    the board Succeeded: everything the runs need."""
    root = tmp_path_factory.mktemp("node")
    with ThreadPoolExecutor(1) as pool:
        volumes = pool.submit(real_e2e.lay_out_volumes, root)  # the tiny klein takes seconds: meanwhile, Kueue
        with RealKueue(cluster) as kueue:
            ensure_namespace(cluster, NS)
            ensure_namespace(cluster, OTHER_NS)
            set_up_queues(
                cluster,
                [
                    TeamQueue(TEAM_CQ, gpus=1, local_queues=((NS, TEAM_QUEUE),), borrowing_limit=1),
                    TeamQueue(SPARE_CQ, gpus=1, local_queues=((NS, DEFAULT_QUEUE),), borrowing_limit=0),
                    TeamQueue(OTHER_NS, gpus=0, local_queues=((OTHER_NS, "default"),), borrowing_limit=0),
                ],
            )
            real_e2e.bind_claims(cluster, NS, root)
            volumes.result()
            with NodeAgent(cluster, root) as agent:
                operator = start_operator(cluster, root, tmp_path_factory.mktemp("operator"))
                try:
                    create(cluster, f"{KLEINSTYLE}/{NS}/styleboards", BOARD)
                    yield World(cluster, kueue, agent, operator)
                finally:
                    operator.stop()


def start_operator(cluster: RealCluster, root: Path, folder: Path) -> OperatorProcess:
    """The chart installed with the demo's values, Kueue's default queue and room for a long run; its operator
    started as the chart's ServiceAccount (after Kueue is installed: it looks for Kueue's API once, at start)."""
    values = real_e2e.chart_values(root)
    values["config"]["defaultQueueName"] = DEFAULT_QUEUE
    values["config"]["trainingLimits"] = {"maxSteps": 2000, "maxResolution": 64}
    # The operator runs here as an OperatorProcess (the Deployment's args, its ServiceAccount's token): the
    # Deployment's own pod must not run on the node agent beside it, so it matches no node.
    values["nodeSelector"] = {"kleinstyle.dev/no-such-node": "true"}
    release = install_chart(
        cluster, CHART, values, folder / "helm", name=real_e2e.RELEASE, namespace=real_e2e.RELEASE_NAMESPACE
    )
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRDS))
    account = service_account(cluster, release.namespace, release.fullname, folder)
    return OperatorProcess(release, account, folder).start()


# --- the timeline -----------------------------------------------------------------------------------------------------


@dataclass
class Queued:
    borrower: dict[str, Any]  # the low-priority run of 2 GPUs, Running
    borrower_job: dict[str, Any]
    borrower_pods: list[dict[str, Any]]
    borrowed: dict[str, Any]  # its ClusterQueue's GPU usage meanwhile
    checkpoint: int  # the step of its first checkpoint
    waiting: dict[str, Any]  # the run naming no queue, waiting for quota
    waiting_job: dict[str, Any]
    waiting_workload: dict[str, Any]


@dataclass
class Preempted:
    evicted: dict[str, Any]  # the low-priority run, preempted
    evicted_job: dict[str, Any]
    evicted_workload: dict[str, Any]
    preemptor: dict[str, Any]  # the high-priority run, Running


@dataclass
class Resumed:
    preemptor: dict[str, Any]  # Succeeded
    waited: dict[str, Any]  # the run of the default queue, Succeeded
    resumed_from: int  # the step the evicted run's next pod resumed from
    done: dict[str, Any]  # the evicted run, stopped, Succeeded


def in_context(world: World, stage: Callable[[], Any]) -> Any:
    """Run a stage; a wait that fails says what Kueue and the operator logged."""
    try:
        return stage()
    except AssertionError as failed:
        raise AssertionError(f"{failed}\n{world.failure_context()}") from None


@pytest.fixture(scope="module")
def queued(world: World) -> Queued:
    def stage() -> Queued:
        cluster = world.cluster
        create(cluster, LORAS, lora("borrower", steps=2000, gpus=2, queue=TEAM_QUEUE, priority="low"))
        borrower = lora_when(cluster, "borrower", "Running", phase_is("Running"))
        # Kueue reports a ClusterQueue's usage a moment after the admission it counts.
        borrowed = wait_for(f"{TEAM_CQ}'s GPU usage reported", lambda: used(gpu_usage(cluster, TEAM_CQ)), RUN_TIMEOUT)
        borrower_job = job(cluster, borrower)
        pods = running_pods(cluster, borrower_job["metadata"]["name"])
        create(cluster, LORAS, lora("waiting", steps=100, gpus=1))
        waiting = lora_when(
            cluster, "waiting", "queued by Kueue", lambda o: bool((o["status"].get("queue") or {}).get("message"))
        )
        waiting_job = job(cluster, waiting)
        first = lora_when(cluster, "borrower", "checkpointed", lambda o: bool(o["status"].get("checkpoints")))
        checkpoint = min(c["step"] for c in first["status"]["checkpoints"])
        return Queued(
            borrower, borrower_job, pods, borrowed, checkpoint, waiting, waiting_job, workload(cluster, waiting_job)
        )

    result: Queued = in_context(world, stage)
    return result


@pytest.fixture(scope="module")
def preempted(world: World, queued: Queued) -> Preempted:
    def stage() -> Preempted:
        cluster = world.cluster
        create(cluster, LORAS, lora("preemptor", steps=100, gpus=1, queue=TEAM_QUEUE, priority="high"))
        evicted = lora_when(cluster, "borrower", "preempted", reason_is("Preempted"))
        evicted_job = job(cluster, evicted)
        preemptor = lora_when(cluster, "preemptor", "Running", phase_is("Running"))
        return Preempted(evicted, evicted_job, workload(cluster, evicted_job), preemptor)

    result: Preempted = in_context(world, stage)
    return result


@pytest.fixture(scope="module")
def resumed(world: World, preempted: Preempted) -> Resumed:
    def stage() -> Resumed:
        cluster = world.cluster
        preemptor = lora_when(cluster, "preemptor", "Succeeded and Finished", finished)
        waited = lora_when(cluster, "waiting", "Succeeded and Finished", finished)
        running = lora_when(cluster, "borrower", "Running again", phase_is("Running"))
        logs = world.agent.root / "logs" / NS
        job_name = running["status"]["jobName"]
        step = wait_for(f"Job {job_name}'s next pod resuming", lambda: resumed_step(logs, job_name), RUN_TIMEOUT)
        stop = f"{STOP_ANNOTATION}={running['status']['runHash']}: enough"  # README's kubectl annotate
        cluster.kubectl("annotate", "-n", NS, "stylelora", "borrower", stop)
        done = lora_when(cluster, "borrower", "Succeeded and Finished", finished)
        return Resumed(preemptor, waited, int(step), done)

    result: Resumed = in_context(world, stage)
    return result


# --- what each stage shows --------------------------------------------------------------------------------------------


def test_the_version_build_sh_builds_is_the_one_realkueue_runs() -> None:
    script = (REPO / "hack" / "kueue" / "build.sh").read_text(encoding="utf-8")
    assert re.search(r"^KUEUE_VERSION=(\S+)$", script, re.MULTILINE)[1] == KUEUE_VERSION  # type: ignore[index]


def test_a_run_waiting_for_quota_shows_kueues_workload_and_its_words(queued: Queued) -> None:
    """While the cohort's GPUs are taken, the run's Job stays suspended, and its status is the Workload Kueue made
    for the Job: its name, queue and state, and why it waits in Kueue's own words."""
    status, kueue_says = queued.waiting["status"], condition(queued.waiting_workload, "QuotaReserved")
    assert kueue_says["status"] == "False" and NO_QUOTA in kueue_says["message"], kueue_says
    assert (status["phase"], ready_reason(queued.waiting)) == ("Pending", "Queued")
    assert kueue_says["message"] in status["message"]
    queue = status["queue"]
    assert queue["workload"] == queued.waiting_workload["metadata"]["name"]
    assert (queue["localQueue"], queue["state"], queue["message"]) == (DEFAULT_QUEUE, "Pending", kueue_says["message"])
    assert queued.waiting_job["spec"]["suspend"] is True


def test_a_run_naming_no_queue_goes_to_the_default_local_queue(queued: Queued, resumed: Resumed) -> None:
    """defaultQueueName: a GPU run whose spec names no queue is labelled for the namespace's `gpu` LocalQueue, Kueue
    queues it there and, once quota frees, admits it through that queue's ClusterQueue."""
    assert "queueName" not in queued.waiting["spec"]["scheduling"]
    assert queued.waiting_job["metadata"]["labels"][QUEUE_LABEL] == DEFAULT_QUEUE
    assert queued.waiting_workload["spec"]["queueName"] == DEFAULT_QUEUE
    queue = resumed.waited["status"]["queue"]
    assert (queue["localQueue"], queue["clusterQueue"], queue["state"]) == (DEFAULT_QUEUE, SPARE_CQ, "Finished")


def test_kueue_admits_a_run_by_borrowing_from_the_cohort_and_it_runs_to_success(
    queued: Queued, resumed: Resumed
) -> None:
    """A run of 2 GPUs in a ClusterQueue of 1: Kueue admits it borrowing the spare queue's GPU, unsuspends its Job,
    whose pod runs on the pool's node; status says where it was admitted. It later Succeeds."""
    queue = queued.borrower["status"]["queue"]
    assert (queue["state"], queue["clusterQueue"], queue["flavors"]) == ("Admitted", TEAM_CQ, [FLAVOR])
    assert {key: str(value) for key, value in queued.borrowed.items()} == {"name": GPU, "total": "2", "borrowed": "1"}
    assert queued.borrower_job["spec"]["suspend"] is False
    assert [pod["spec"]["nodeName"] for pod in queued.borrower_pods] == ["kleinstyle-gpu"]
    assert resumed.done["status"]["phase"] == "Succeeded"


def test_a_higher_priority_run_preempts_and_the_evicted_one_resumes_from_its_checkpoint(
    world: World, queued: Queued, preempted: Preempted, resumed: Resumed
) -> None:
    """Kueue evicts the low-priority run for the high one (Preempted, InClusterQueue) and suspends its Job; status
    says so and counts it, and its Event says Preempted (Kueue marks the Workload Evicted while it still holds the
    quota: the operator read that as admitted and starting); readmitted, the Job's next pod resumes from the
    checkpoint the first one saved."""
    evicted, preempted_by = (
        condition(preempted.evicted_workload, "Evicted"),
        condition(preempted.evicted_workload, "Preempted"),
    )
    assert (evicted["reason"], preempted_by["reason"]) == ("Preempted", "InClusterQueue")
    assert preempted.evicted_job["spec"]["suspend"] is True
    status = preempted.evicted["status"]
    assert status["phase"] == "Pending" and status["queue"]["requeueCount"] == 1
    assert "InClusterQueue" in status["message"] and "resumes from the last checkpoint" in status["message"]
    assert status["queue"]["lastEvictionReason"] == f"Preempted (InClusterQueue): {preempted_by['message']}"
    assert preempted.preemptor["status"]["queue"]["clusterQueue"] == TEAM_CQ
    events = get(world.cluster, f"/api/v1/namespaces/{NS}/events?fieldSelector=involvedObject.name=borrower")
    reasons = [event["reason"] for event in sorted(events["items"], key=lambda e: e["metadata"]["creationTimestamp"])]
    assert "Preempted" in reasons and "Admitted" not in reasons, reasons
    assert resumed.preemptor["status"]["phase"] == "Succeeded"

    assert resumed.resumed_from >= queued.checkpoint  # the next pod went on from a checkpoint, not from step 0
    done = resumed.done["status"]
    assert done["queue"]["requeueCount"] == 1 and done["stopReason"] == "stop requested: enough"
    assert [c["step"] for c in done["checkpoints"]][:1] == [50]


def test_kueue_runs_as_its_own_service_account_and_the_operator_needs_no_more_than_the_chart(
    world: World, resumed: Resumed
) -> None:
    """Kueue's manager watched Workloads as its ServiceAccount (its own ClusterRole is all it holds) and was refused
    nothing; the chart's RBAC let the operator read every Workload it mirrored."""
    watchers = {e["user"]["username"] for e in world.cluster.audited() if "/workloads" in e.get("requestURI", "")}
    assert world.kueue.user in watchers
    assert "forbidden" not in world.kueue.log.read_text(encoding="utf-8", errors="replace")
    assert not world.operator.refusals()


HOLD = "kleinstyle.dev/test-hold"  # a finalizer of the test's: the deleted Job's Workload lingers while it is there


@dataclass
class Remade:
    first_job: dict[str, Any]  # the Job deleted by hand
    waiting: dict[str, Any]  # the run while the deleted Job's Workload lingered
    remade_meanwhile: int  # HTTP status of a GET of the Job's name while it lingered (404: not made again)
    running: dict[str, Any]  # the run, running again
    second_job: dict[str, Any]
    second_workload: dict[str, Any]
    done: dict[str, Any]


def set_finalizers(cluster: RealCluster, workload_: dict[str, Any], change: Callable[[list[str]], list[str]]) -> None:
    """Change a Workload's finalizers, at the version read (Kueue writes them too), again on a conflict."""
    path = f"{API}/namespaces/{NS}/workloads/{workload_['metadata']['name']}"

    def patched() -> bool:
        meta = get(cluster, path)["metadata"]
        finalizers = change(meta.get("finalizers") or [])
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}}
        done = cluster.kubectl(
            "patch",
            "-n",
            NS,
            "workloads.kueue.x-k8s.io",
            meta["name"],
            "--type=merge",
            "-p",
            json.dumps(patch),
            check=False,
        )
        return done.returncode == 0

    wait_for(f"{path}'s finalizers changed", patched, timeout=20.0, interval=0.5)


@pytest.fixture(scope="module")
def remade(world: World, resumed: Resumed) -> Remade:
    """A running run's Job deleted by hand while its Workload is held (as the garbage collector may be slow to
    remove it): the Job is made again under its name only once the Workload is gone."""

    def stage() -> Remade:
        cluster = world.cluster
        create(cluster, LORAS, lora("remade", steps=2000, gpus=1, queue=TEAM_QUEUE))
        running = lora_when(cluster, "remade", "Running", phase_is("Running"))
        first_job = job(cluster, running)
        first_workload = workload(cluster, first_job)
        set_finalizers(cluster, first_workload, lambda held: [*held, HOLD])
        name = first_job["metadata"]["name"]
        cluster.kubectl("delete", "-n", NS, "job", name, "--cascade=background", "--wait=false")
        waiting = lora_when(
            cluster, "remade", "waiting for the deleted Job's Workload", reason_is("OldWorkloadLingers")
        )
        time.sleep(2.0)  # a reconcile or two more: still no Job under the name
        remade_meanwhile, _ = cluster.api("GET", f"/apis/batch/v1/namespaces/{NS}/jobs/{name}")
        set_finalizers(cluster, first_workload, lambda held: [f for f in held if f != HOLD])
        again = lora_when(
            cluster,
            "remade",
            "Running again, under a new Job",
            lambda o: phase_is("Running")(o) and job(cluster, o)["metadata"]["uid"] != first_job["metadata"]["uid"],
        )
        second_job = job(cluster, again)
        second_workload = workload(cluster, second_job)
        lora_when(cluster, "remade", "checkpointed", lambda o: bool(o["status"].get("checkpoints")))
        stop = f"{STOP_ANNOTATION}={again['status']['runHash']}: enough"  # stopped with a checkpoint to promote
        cluster.kubectl("annotate", "-n", NS, "stylelora", "remade", stop)
        done = lora_when(cluster, "remade", "Succeeded and Finished", finished)
        return Remade(first_job, waiting, remade_meanwhile, again, second_job, second_workload, done)

    result: Remade = in_context(world, stage)
    return result


def test_a_job_deleted_by_hand_is_made_again_once_kueue_has_let_go_of_its_workload(remade: Remade) -> None:
    """Kueue v0.17 matches a Job to a Workload by the Job's name: a Job made again while the deleted one's Workload
    lingered was admitted as that Workload, then suspended for ever once it went ("Missing Workload; unable to
    restore pod templates"). The operator waits, says so, and the Job made afterwards gets a Workload of its own,
    is admitted, runs, and the run Succeeds."""
    status = remade.waiting["status"]
    assert status["phase"] == "Pending" and remade.first_job["metadata"]["name"] in status["message"]
    assert condition(remade.waiting, "JobCreated")["reason"] == "OldWorkloadLingers"
    assert remade.remade_meanwhile == 404
    assert remade.second_job["metadata"]["name"] == remade.first_job["metadata"]["name"]
    assert remade.second_job["spec"]["suspend"] is False
    assert remade.second_workload["metadata"]["labels"][JOB_UID_LABEL] == remade.second_job["metadata"]["uid"]
    assert condition(remade.second_workload, "Admitted")["status"] == "True"
    assert remade.done["status"]["queue"]["state"] == "Finished"


@pytest.fixture(scope="module")
def defaulted(world: World) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A StyleBoard in the namespace whose LocalQueue is named `default`, once its prepare Job waits: the board, the
    Job, its Workload."""

    def stage() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        cluster = world.cluster
        create(cluster, f"{KLEINSTYLE}/{OTHER_NS}/styleboards", BOARD)
        path = f"{KLEINSTYLE}/{OTHER_NS}/styleboards/{BOARD_NAME}"
        board = when(cluster, path, "queued by Kueue", reason_is("Queued"))
        board_job = job(cluster, board)

        def saying_why() -> dict[str, Any] | None:
            found = workload(cluster, board_job)
            return found if found and condition(found, "QuotaReserved").get("message") else None

        board_workload = wait_for("its Workload saying why it waits", saying_why, RUN_TIMEOUT)
        kueue_says = condition(board_workload, "QuotaReserved")["message"]
        # The board's status follows the Workload's a watch event later: wait for Kueue's words, not just the queue.
        board = when(
            cluster,
            path,
            "showing its Workload and Kueue's words",
            lambda o: bool(o["status"].get("queue")) and kueue_says in o["status"].get("message", ""),
        )
        return board, board_job, board_workload

    result: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] = in_context(world, stage)
    return result


def test_kueues_own_default_local_queue_takes_the_operators_cpu_jobs_too(
    defaulted: tuple[dict[str, Any], dict[str, Any], dict[str, Any]],
) -> None:
    """The chart's README: Kueue's own default LocalQueue (a LocalQueue named `default`) works as is; Kueue labels and
    suspends the Jobs that name no queue, and the operator reads the queue from the Job. It does so for every Job,
    the operator's CPU Jobs too (a board's prepare, which the operator never queues): they wait in that queue,
    and the board's status says why in Kueue's words, here a flavor of the GPU pool whose taint they do not
    tolerate."""
    board, board_job, board_workload = defaulted
    assert board_job["metadata"]["labels"][QUEUE_LABEL] == "default" and board_job["spec"]["suspend"] is True
    kueue_says = condition(board_workload, "QuotaReserved")["message"]
    assert "untolerated taint" in kueue_says, kueue_says
    status = board["status"]
    assert (status["phase"], status["queue"]["localQueue"]) == ("Pending", "default")
    assert "queued in default" in status["message"] and kueue_says in status["message"]


def test_the_charts_kueue_example_is_accepted_by_kueue(world: World) -> None:
    """The queues charts/kleinstyle/README.md shows a platform team (its ```yaml block under Kueue), created as a
    server-side dry run (each name prefixed, not to meet this world's own `h200` and `gpu`): the API server's
    schemas and Kueue's own webhooks accept every object."""
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Kueue", 1)[1].split("\n## ", 1)[0]
    docs = [doc for doc in yaml.safe_load_all(section.split("```yaml\n", 1)[1].split("```", 1)[0]) if doc]
    assert [doc["kind"] for doc in docs] == ["ResourceFlavor", "ClusterQueue", "LocalQueue"]
    for doc in docs:
        doc["metadata"]["name"] = "readme-" + doc["metadata"]["name"]
        spec = doc["spec"]
        for group in spec.get("resourceGroups") or []:
            for flavor in group["flavors"]:
                flavor["name"] = "readme-" + flavor["name"]
        if "clusterQueue" in spec:
            spec["clusterQueue"] = "readme-" + spec["clusterQueue"]
    created = world.cluster.kubectl(
        "create", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(docs), check=False
    )
    assert created.returncode == 0, created.stderr
