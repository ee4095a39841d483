"""Kueue's part on the dev cluster: its Workload API and the moves its controllers make, driven by the caller.

Real Kueue decides when quota allows; here the test (or the demo) decides, and `FakeKueue` makes the moves over the
API as Kueue does: a Workload per queued Job (labelled with the Job's uid, owned by the Job, waiting with Kueue's
message), admission (QuotaReserved and Admitted, the ClusterQueue and flavor, the Job unsuspended), and eviction
(Evicted with its reason, Preempted with by whom, the Job suspended again, so its pod gets SIGTERM).

The conditions, their reasons and messages and the order of the moves are those real Kueue v0.17 writes
(tests/cluster/test_kueue_real.py runs it, kueue_real.py): an eviction is marked while the quota is still held,
and released (QuotaReserved False with the eviction's message, Admitted False, Requeued) once the Job is suspended.
"""

from __future__ import annotations

from typing import Any

from kleinstyle.operator.kueue import GROUP, JOB_UID_LABEL, QUEUE_LABEL, VERSIONS

from .client import KubeClient
from .executor import now_rfc3339

VERSION = VERSIONS[0]
NO_QUOTA = (
    "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor h200, "
    "1 more needed"
)
PREEMPTED = (
    "Preempted to accommodate a workload (UID: 0f2e, JobUID: 9a7c) due to prioritization in the ClusterQueue; "
    "preemptor path: /gpus/h200-cq; preemptee path: /gpus/h200-cq"
)

WORKLOAD_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"workloads.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"kind": "Workload", "plural": "workloads", "singular": "workload", "listKind": "WorkloadList"},
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }
        ],
    },
}


def _condition(type_: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now_rfc3339(),
    }


def _with(conditions: list[dict[str, Any]], *changed: dict[str, Any]) -> list[dict[str, Any]]:
    """`conditions` with `changed` replacing those of the same type; a condition keeps its lastTransitionTime
    while its status stays the same, as Kubernetes conditions do."""
    by_type = {c["type"]: c for c in conditions}
    for cond in changed:
        old = by_type.get(cond["type"])
        if old is not None and old["status"] == cond["status"]:
            cond = {**cond, "lastTransitionTime": old["lastTransitionTime"]}
        by_type[cond["type"]] = cond
    return list(by_type.values())


class FakeKueue:
    def __init__(self, client: KubeClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    async def workload_of(self, job_name: str) -> dict[str, Any] | None:
        job = await self.client.get_or_none("jobs", self.namespace, job_name)
        if job is None:
            return None
        uid = job["metadata"]["uid"]
        found = await self.client.list("workloads", self.namespace, label_selector=f"{JOB_UID_LABEL}={uid}")
        return found[0] if found else None

    async def queue(self, job_name: str, message: str = NO_QUOTA) -> dict[str, Any]:
        """The Workload Kueue creates for a queued Job, waiting for quota with `message`."""
        existing = await self.workload_of(job_name)
        if existing is not None:
            return existing
        job = await self.client.get("jobs", self.namespace, job_name)
        meta = job["metadata"]
        workload = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Workload",
            "metadata": {
                "name": f"job-{job_name}"[:63],
                "namespace": self.namespace,
                "labels": {JOB_UID_LABEL: meta["uid"]},
                "ownerReferences": [
                    {"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": meta["uid"], "controller": True}
                ],
            },
            "spec": {"queueName": (meta.get("labels") or {}).get(QUEUE_LABEL), "podSets": [{"name": "main"}]},
        }
        created = await self.client.create("workloads", workload, self.namespace)
        pending = [_condition("QuotaReserved", "False", "Pending", message)]
        return await self._status(created["metadata"]["name"], {"conditions": pending})

    async def admit(self, job_name: str, cluster_queue: str = "h200-cq", flavor: str = "h200") -> dict[str, Any]:
        workload = await self.queue(job_name)
        conditions = _with(
            (workload.get("status") or {}).get("conditions") or [],
            _condition("QuotaReserved", "True", "QuotaReserved", f"Quota reserved in ClusterQueue {cluster_queue}"),
            _condition("Admitted", "True", "Admitted", "The workload is admitted"),
            *[
                _condition(c["type"], "False", "QuotaReserved", f"Previously: {c.get('message', '')}")
                for c in (workload.get("status") or {}).get("conditions") or []
                if c["type"] in ("Evicted", "Preempted") and c["status"] == "True"
            ],
        )
        admission = {
            "clusterQueue": cluster_queue,
            "podSetAssignments": [{"name": "main", "flavors": {"nvidia.com/gpu": flavor}, "count": 1}],
        }
        admitted = await self._status(workload["metadata"]["name"], {"conditions": conditions, "admission": admission})
        await self.client.patch("jobs", self.namespace, job_name, {"spec": {"suspend": False}})
        return admitted

    async def evict(
        self,
        job_name: str,
        reason: str = "Preempted",
        preempted_by: str = "InClusterQueue",
        message: str = PREEMPTED,
    ) -> dict[str, Any]:
        """Kueue's two moves: the Workload marked Evicted (and Preempted) while it still holds its quota, the Job
        suspended; then the quota released and the Workload requeued."""
        workload = await self.workload_of(job_name)
        assert workload is not None, f"Job {job_name} has no Workload"
        name = workload["metadata"]["name"]
        marked = [_condition("Evicted", "True", reason, message)]
        if reason == "Preempted":
            marked.append(_condition("Preempted", "True", preempted_by, message))
        conditions = _with((workload.get("status") or {}).get("conditions") or [], *marked)
        evicting = await self._status(name, {"conditions": conditions})
        await self.client.patch("jobs", self.namespace, job_name, {"spec": {"suspend": True}})
        released = _with(
            (evicting.get("status") or {}).get("conditions") or [],
            _condition("QuotaReserved", "False", "Pending", message),
            _condition("Admitted", "False", "NoReservation", "The workload has no reservation"),
            _condition("Requeued", "True", reason, message),
        )
        return await self._status(name, {"conditions": released, "admission": None})

    async def _status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return await self.client.patch("workloads", self.namespace, name, {"status": status}, subresource="status")
