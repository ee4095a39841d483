"""Kueue's part on the dev cluster: its Workload API and the moves its controllers make, driven by the caller.

Real Kueue decides when quota allows; here the test (or the demo) decides, and `FakeKueue` makes the moves over the
API as Kueue does: a Workload per queued Job (labelled with the Job's uid, owned by the Job, waiting with Kueue's
message), admission (QuotaReserved and Admitted, the ClusterQueue and flavor, the Job unsuspended), and eviction
(Evicted with its reason, Preempted with by whom, the Job suspended again, so its pod gets SIGTERM).
"""

from __future__ import annotations

from typing import Any

from kleinstyle.operator.kueue import GROUP, JOB_UID_LABEL, QUEUE_LABEL, VERSIONS

from .client import KubeClient
from .executor import now_rfc3339

VERSION = VERSIONS[0]
NO_QUOTA = "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor h200"

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
                _condition(type_, "False", "QuotaReserved", "Previously: evicted")
                for type_ in ("Evicted", "Preempted")
                if any(c["type"] == type_ for c in (workload.get("status") or {}).get("conditions") or [])
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
        message: str = "Preempted to accommodate a workload (UID: 0f2e) due to prioritization in the ClusterQueue",
    ) -> dict[str, Any]:
        workload = await self.workload_of(job_name)
        assert workload is not None, f"Job {job_name} has no Workload"
        changed = [
            _condition("Evicted", "True", reason, message),
            _condition("QuotaReserved", "False", "Pending", "evicted; waiting for quota again"),
            _condition("Admitted", "False", "NoReservation", "The workload has no reservation"),
        ]
        if reason == "Preempted":
            changed.append(_condition("Preempted", "True", preempted_by, message))
        conditions = _with((workload.get("status") or {}).get("conditions") or [], *changed)
        evicted = await self._status(workload["metadata"]["name"], {"conditions": conditions, "admission": None})
        await self.client.patch("jobs", self.namespace, job_name, {"spec": {"suspend": True}})
        return evicted

    async def _status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return await self.client.patch("workloads", self.namespace, name, {"status": status}, subresource="status")
