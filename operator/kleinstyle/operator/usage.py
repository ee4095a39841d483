"""What one reconcile's status change means for the platform team's metrics: pure functions of the status before
and after it (and the owner's Jobs), so each fact is counted once, on the transition that makes it true.

A resource's GPU time is counted per stretch a pod ran: from the Job's `startTime` to its completion, or to the
moment Kueue evicted it (the Job's `startTime` restarts when it is readmitted), or to now when the run is replaced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kleinstyle.contract.early_stop import stop_cause

from .conditions import condition
from .kueue import QUEUE_REASONS
from .naming import NODE_POOL
from .reconcile import TERMINAL


@dataclass(frozen=True)
class Change:
    kind: str
    namespace: str
    name: str
    before: Mapping[str, Any]  # status before the reconcile
    after: Mapping[str, Any]  # status after it
    jobs: Mapping[str, Mapping[str, Any]]  # the owner's Jobs, by name
    now: datetime

    @property
    def same_run(self) -> bool:
        return self.before.get("runHash") == self.after.get("runHash")

    def job(self, status: Mapping[str, Any]) -> Mapping[str, Any] | None:
        return self.jobs.get(status.get("jobName") or "")


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None


def _seconds(start: Any, end: datetime | None) -> float | None:
    begun = parse_time(start)
    return max(0.0, (end - begun).total_seconds()) if begun and end else None


def ready_reason(status: Mapping[str, Any]) -> str:
    reason: str = (condition({"status": status}, "Ready") or {}).get("reason", "")
    return reason


def gpus_of(job: Mapping[str, Any] | None) -> tuple[int, str]:
    """(GPUs the Job's pod requests, its node pool)."""
    if job is None:
        return 0, ""
    containers = (((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []
    gpus = sum(int(((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0)) for c in containers)
    return gpus, ((job.get("metadata") or {}).get("labels") or {}).get(NODE_POOL, "")


def _running(status: Mapping[str, Any]) -> bool:
    """A pod of the run may be running: started, not finished, not suspended by Kueue."""
    return (
        bool(status.get("startTime"))
        and status.get("phase") in ("Pending", "Running")
        and (ready_reason(status) not in QUEUE_REASONS)
    )


def gpu_seconds(change: Change) -> tuple[float, str] | None:
    """(GPU-seconds of a stretch that ended with this change, node pool), or None."""
    before, after = change.before, change.after
    if _running(before):
        stopped = (
            after.get("phase") in TERMINAL
            or not change.same_run
            or after.get("startTime") != before.get("startTime")
            or ready_reason(after) in QUEUE_REASONS
        )
        if not stopped:
            return None
        status, start = before, before.get("startTime")
    elif after.get("phase") in TERMINAL and before.get("phase") not in TERMINAL and after.get("startTime"):
        status, start = after, after.get("startTime")  # started and finished between two reconciles
    else:
        return None
    end = change.now
    if change.same_run and after.get("completionTime"):
        end = parse_time(after["completionTime"]) or end
    elif ready_reason(after) in QUEUE_REASONS:
        end = parse_time((after.get("queue") or {}).get("lastEvictionTime")) or end
    gpus, pool = gpus_of(change.job(status))
    seconds = _seconds(start, end)
    return (gpus * seconds, pool) if gpus and seconds is not None else None


def queue_wait(change: Change) -> float | None:
    """Seconds from the Job's creation (or its last eviction) to its start, when it has just started."""
    after = change.after
    start = parse_time(after.get("startTime"))
    if start is None or (change.same_run and change.before.get("startTime") == after.get("startTime")):
        return None
    job = change.job(after)
    if job is None:
        return None
    since = [
        parse_time((job.get("metadata") or {}).get("creationTimestamp")),
        parse_time((after.get("queue") or {}).get("lastEvictionTime")),
    ]
    waited_from = max((t for t in since if t is not None and t <= start), default=None)
    return (start - waited_from).total_seconds() if waited_from else None


def finished_run(change: Change) -> tuple[str, float | None] | None:
    """(outcome, seconds the run's pods ran) when the run has just finished."""
    after = change.after
    if after.get("phase") not in TERMINAL or (change.same_run and change.before.get("phase") in TERMINAL):
        return None
    if not after.get("jobName"):
        return None  # an invalid spec: no run
    end = parse_time(after.get("completionTime")) or change.now
    return after["phase"], _seconds(after.get("startTime"), end)


def _scored_steps(status: Mapping[str, Any]) -> set[int]:
    return {c["step"] for c in status.get("checkpoints") or [] if c.get("score") is not None and "step" in c}


def checkpoints_scored(change: Change) -> int:
    earlier = _scored_steps(change.before) if change.same_run else set()
    return len(_scored_steps(change.after) - earlier)


def early_stop(change: Change) -> str | None:
    """Why a StyleLoRA stopped before its planned steps, when its run has just finished."""
    done = finished_run(change)
    reason = change.after.get("stopReason")
    if done is None or done[0] != "Succeeded" or not reason:
        return None
    cause = stop_cause(reason)
    return None if cause == "completed" else cause


def images_rendered(change: Change) -> int:
    earlier = int(change.before.get("imagesDone") or 0) if change.same_run else 0
    return max(0, int(change.after.get("imagesDone") or 0) - earlier)


def fusion_seconds(change: Change) -> float | None:
    seconds = change.after.get("durationSeconds")
    if seconds is None or (change.same_run and change.before.get("durationSeconds") == seconds):
        return None
    return float(seconds)


def training(change: Change) -> dict[str, float] | None:
    """Step, total steps, loss and ETA of a StyleLoRA while it trains; None otherwise."""
    after = change.after
    if change.kind != "StyleLoRA" or after.get("phase") != "Running" or after.get("step") is None:
        return None
    values = {"step": after.get("step"), "total_steps": after.get("totalSteps"), "loss": after.get("loss")}
    report = after.get("progress") or {}
    if report.get("runHash") == after.get("runHash"):
        values["eta_seconds"] = (report.get("progress") or {}).get("etaSeconds")
    return {key: float(value) for key, value in values.items() if isinstance(value, int | float)}


def queued_since(change: Change) -> float | None:
    """Unix time since when the run has waited for Kueue (its Job's creation or last eviction); None when not."""
    after = change.after
    if ready_reason(after) not in QUEUE_REASONS:
        return None
    job = change.job(after)
    since = parse_time((after.get("queue") or {}).get("lastEvictionTime")) or parse_time(
        ((job or {}).get("metadata") or {}).get("creationTimestamp")
    )
    return since.timestamp() if since else None
