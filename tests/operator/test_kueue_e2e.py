"""Kueue on the embedded cluster: the operator watches Workloads (the cluster serves Kueue's API) and mirrors them
into status; an eviction suspends the Job, its pod saves a checkpoint on SIGTERM, and the readmitted Job's next pod
resumes from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from kleinstyle.contract.pod import STOP_ANNOTATION
from kleinstyle.devcluster.demo import cluster_for, dev_config, write_model_cache
from kleinstyle.devcluster.kueue import NO_QUOTA, FakeKueue
from kleinstyle.operator.config import TrainingLimits

from .test_gitops import argo_health
from .test_operator_e2e import BOARD, NS, phase_is

pytestmark = pytest.mark.emulator

LORA = {
    "apiVersion": "kleinstyle.dev/v1alpha1",
    "kind": "StyleLoRA",
    "metadata": {"name": "bd9-queued"},
    "spec": {
        "boardRef": {"name": "bd9"},
        "backend": "builtin",
        "training": {"steps": 2000, "checkpointEvery": 50},
        "earlyStopping": {"enabled": False},
        "scheduling": {"queueName": "team-a-gpu"},
    },
}


def reason_is(cluster, name: str, reason: str):
    async def check():
        obj = await cluster.get("styleloras", NS, name)
        conds = {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions") or []}
        return obj if conds.get("Ready", {}).get("reason") == reason else None

    return check


async def test_an_evicted_job_shows_preempted_and_its_next_pod_resumes(root: Path):
    write_model_cache(root)
    limits = TrainingLimits(maxSteps=2000, maxResolution=64)
    config = dev_config(root).model_copy(update={"training_limits": limits, "resync_seconds": 3600.0})
    async with cluster_for(root, NS, config=config, kueue=True) as cluster:
        kueue = FakeKueue(cluster.client, NS)
        await cluster.apply([BOARD, LORA])
        queued = await cluster.wait_for(reason_is(cluster, "bd9-queued", "Queued"), timeout=60)
        job = queued["status"]["jobName"]
        await kueue.queue(job)  # Kueue makes the Workload: no quota yet, and says so
        waiting = await cluster.wait_for(lambda: _with_queue(cluster, "Pending", says=NO_QUOTA), timeout=10)
        assert NO_QUOTA in waiting["status"]["message"] and waiting["status"]["queue"]["localQueue"] == "team-a-gpu"

        await kueue.admit(job)
        running = await cluster.wait_for(phase_is(cluster, "styleloras", "bd9-queued", "Running"), timeout=30)
        assert running["status"]["queue"]["clusterQueue"] == "h200-cq"
        first = await cluster.wait_for(lambda: _checkpointed(cluster), timeout=120, interval=0.1)
        before = max(c["step"] for c in first["status"]["checkpoints"])

        await kueue.evict(job)
        preempted = await cluster.wait_for(reason_is(cluster, "bd9-queued", "Preempted"), timeout=30)
        status = preempted["status"]
        assert status["phase"] == "Pending" and status["queue"]["requeueCount"] == 1
        assert "InClusterQueue" in status["message"] and "resumes from the last checkpoint" in status["message"]
        assert status["queue"]["lastEvictionReason"].startswith("Preempted (InClusterQueue)")
        assert argo_health(preempted)[0] == "Suspended"  # Argo CD shows it waiting in the queue again

        await kueue.admit(job)
        await cluster.wait_for(phase_is(cluster, "styleloras", "bd9-queued", "Running"), timeout=30)
        pod_logs = root / "logs" / NS
        resumed = await cluster.wait_for(lambda: _resumed_step(pod_logs, job), timeout=120, interval=0.2)
        assert resumed >= before  # the next pod went on from a checkpoint, not from step 0
        stop = {STOP_ANNOTATION: f"{running['status']['runHash']}: enough"}  # what README's kubectl annotate sets
        await cluster.client.patch("styleloras", NS, "bd9-queued", {"metadata": {"annotations": stop}})
        done = await cluster.wait_for(phase_is(cluster, "styleloras", "bd9-queued", "Succeeded"), timeout=120)
        assert done["status"]["queue"]["requeueCount"] == 1
        assert done["status"]["stopReason"] == "stop requested: enough"
        assert [c["step"] for c in done["status"]["checkpoints"]][:1] == [50]


async def _with_queue(cluster, state: str, says: str = ""):
    """The run once status.queue is in `state` and its message says `says`: Kueue writes a Workload, then its
    conditions, and the operator may see the Workload in between (Pending, nothing said yet)."""
    obj = await cluster.get("styleloras", NS, "bd9-queued")
    queue = ((obj or {}).get("status") or {}).get("queue") or {}
    return obj if queue.get("state") == state and says in (queue.get("message") or "") else None


async def _checkpointed(cluster):
    obj = await cluster.get("styleloras", NS, "bd9-queued")
    return obj if ((obj or {}).get("status") or {}).get("checkpoints") else None


def _resumed_step(logs: Path, job: str) -> int | None:
    for log in sorted(logs.glob(f"{job}-*.log")):
        found = re.search(r"resuming from .* \(step (\d+) of \d+\)", log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
    return None
