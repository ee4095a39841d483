"""Kueue's view of a run, read from the Workload Kueue keeps for its Job: why it waits, where it was admitted, how
often it was evicted. Pure functions of the Workload (None where Kueue is not installed or has not caught up).

Kueue suspends a queued Job and unsuspends it on admission; to preempt, it marks the Workload Evicted (reason
Preempted, with a Preempted condition saying by whom) and suspends the Job again, whose pod gets SIGTERM and saves a
checkpoint; readmitted, the Job's next pod resumes from it. The eviction count lives in our status, so it survives
Kueue resetting the Evicted condition on readmission and an operator restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .api.common import QueueStatus
from .conditions import condition, true_condition

GROUP = "kueue.x-k8s.io"
VERSIONS = ("v1beta2", "v1beta1")  # newest first: the first one the cluster serves is watched
JOB_UID_LABEL = f"{GROUP}/job-uid"
# Ready reasons of a run whose Job Kueue holds suspended (no pod runs): `suspended_phase` gives these.
QUEUE_REASONS = frozenset({"Queued", "QuotaReserved", "Admitted", "Preempted", "Evicted"})
QUEUE_LABEL = f"{GROUP}/queue-name"
PRIORITY_LABEL = f"{GROUP}/priority-class"


def _cluster_queue(workload: Mapping[str, Any]) -> str | None:
    return ((workload.get("status") or {}).get("admission") or {}).get("clusterQueue")


def _flavors(workload: Mapping[str, Any]) -> list[str]:
    assignments = ((workload.get("status") or {}).get("admission") or {}).get("podSetAssignments") or []
    return sorted({flavor for a in assignments for flavor in (a.get("flavors") or {}).values()})


def state(workload: Mapping[str, Any]) -> str:
    """Pending, QuotaReserved, Admitted, Evicted (and not readmitted yet) or Finished.

    Evicted comes before the reservation: Kueue marks a preempted Workload Evicted while QuotaReserved and Admitted
    stay True until its suspended Job's pods are gone, and resets Evicted when it admits the Workload again."""
    if true_condition(workload, "Finished"):
        return "Finished"
    if true_condition(workload, "Evicted"):
        return "Evicted"
    if true_condition(workload, "Admitted"):
        return "Admitted"
    return "QuotaReserved" if true_condition(workload, "QuotaReserved") else "Pending"


def queue_status(workload: Mapping[str, Any], old: QueueStatus | None) -> QueueStatus:
    """`status.queue` from the Workload and the previous `status.queue` (for the eviction count)."""
    name = workload["metadata"]["name"]
    before = old if old is not None and old.workload == name else QueueStatus(workload=name, state="Pending")
    current = state(workload)
    shown = {
        "Pending": condition(workload, "QuotaReserved"),
        "QuotaReserved": condition(workload, "Admitted"),
        "Admitted": condition(workload, "Admitted"),
        "Evicted": condition(workload, "Evicted"),
        "Finished": condition(workload, "Finished"),
    }[current] or {}
    evictions = before.requeue_count
    last_time, last_reason = before.last_eviction_time, before.last_eviction_reason
    evicted = true_condition(workload, "Evicted")
    if evicted is not None and evicted.get("lastTransitionTime") != last_time:
        evictions += 1
        last_time, last_reason = evicted.get("lastTransitionTime"), _eviction_reason(workload)
    fields = {
        "workload": name,
        "local_queue": (workload.get("spec") or {}).get("queueName"),
        "cluster_queue": _cluster_queue(workload),
        "flavors": _flavors(workload) or None,
        "state": current,
        "reason": shown.get("reason"),
        "message": shown.get("message"),
        "requeue_count": evictions,
        "last_eviction_time": last_time,
        "last_eviction_reason": last_reason,
    }
    return QueueStatus.model_validate({key: value for key, value in fields.items() if value is not None})


def _eviction_reason(workload: Mapping[str, Any]) -> str:
    """'Preempted (InClusterQueue): message' from the Evicted and Preempted conditions."""
    evicted = condition(workload, "Evicted") or {}
    preempted = true_condition(workload, "Preempted")
    reason = evicted.get("reason") or "Evicted"
    if preempted is not None and preempted.get("reason"):
        reason = f"{reason} ({preempted['reason']})"
    message = (preempted or evicted).get("message") or evicted.get("message") or ""
    return f"{reason}: {message}" if message else reason


def suspended_phase(
    job_name: str, queue_name: str, workload: Mapping[str, Any] | None, queue: QueueStatus | None
) -> tuple[str, str]:
    """(reason, message) of a run whose Job is suspended: queued, preempted or evicted, quota reserved, admitted."""
    if workload is None:
        return "Queued", f"Job {job_name} is queued (suspended) in queue {queue_name or '-'}"
    current = state(workload)
    cluster_queue = _cluster_queue(workload) or "-"
    if current == "Evicted":
        evicted = condition(workload, "Evicted") or {}
        reason = "Preempted" if evicted.get("reason") == "Preempted" else "Evicted"
        count = (queue.requeue_count if queue else 0) or 1
        return reason, (
            f"Job {job_name} was {reason.lower()} by Kueue ({_eviction_reason(workload)}); requeued in "
            f"{queue_name or '-'} (eviction {count}), its next pod resumes from the last checkpoint"
        )
    if current == "QuotaReserved":
        waiting = (condition(workload, "Admitted") or {}).get("message")
        detail = f": {waiting}" if waiting else ""
        return "QuotaReserved", f"Job {job_name} has quota in ClusterQueue {cluster_queue}; admission checks{detail}"
    if current == "Admitted":
        return "Admitted", f"Job {job_name} was admitted to ClusterQueue {cluster_queue} and is starting"
    why = (condition(workload, "QuotaReserved") or {}).get("message") or "waiting for quota"
    return "Queued", f"Job {job_name} is queued in {queue_name or '-'}: {why}"
