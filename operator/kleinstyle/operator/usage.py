"""What one reconcile's status change means for the platform team's metrics: pure functions of the status before
and after it (and the owner's Jobs), so each fact is counted once, on the transition that makes it true.

A resource's GPU time is counted per stretch a pod ran: from the Job's `startTime` to its completion, or to the
moment Kueue evicted it (the Job's `startTime` restarts when it is readmitted), or to now when the run is replaced;
a pod that died before (killed, its node lost) counts until it ended, never through the wait for its replacement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kleinstyle.contract.early_stop import stop_cause
from kleinstyle.contract.reports import TrainReport, read_report

from . import pods
from .api import BY_KIND
from .api.common import CommonStatus
from .api.generationjob import GenerationJobStatus
from .api.lorafusion import LoRAFusionStatus
from .api.stylelora import StyleLoRAStatus
from .kueue import QUEUE_REASONS
from .naming import NODE_POOL
from .reconcile import TERMINAL


@dataclass(frozen=True)
class Change:
    kind: str
    namespace: str
    name: str
    before: CommonStatus  # status before the reconcile (the kind's status model)
    after: CommonStatus  # status after it
    jobs: Mapping[str, Mapping[str, Any]]  # the owner's Jobs, by name
    now: datetime
    pods: Sequence[Mapping[str, Any]] = ()  # the current run's pods, as the reconcile saw them: when each ended

    @classmethod
    def of(
        cls,
        kind: str,
        namespace: str,
        name: str,
        before: Mapping[str, Any],
        after: Mapping[str, Any],
        jobs: Mapping[str, Mapping[str, Any]],
        now: datetime,
        pods: Sequence[Mapping[str, Any]] = (),
    ) -> Change:
        """The change between two statuses as the API holds them, read with the kind's status model."""
        model = BY_KIND[kind].status
        return cls(kind, namespace, name, model.read(before), model.read(after), jobs, now, pods)

    @property
    def same_run(self) -> bool:
        return self.before.run_hash == self.after.run_hash

    def job(self, status: CommonStatus) -> Mapping[str, Any] | None:
        return self.jobs.get(status.job_name or "")


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


def ready_reason(status: CommonStatus) -> str:
    ready = status.condition("Ready")
    return ready.reason if ready else ""


def jobs_by_name(
    children: Sequence[Mapping[str, Any]], created: Sequence[Mapping[str, Any]]
) -> dict[str, Mapping[str, Any]]:
    """The run's Jobs by name, with one a reconcile makes again under its name (the old one deleted by hand, say):
    the stretch of the deleted Job's pod is counted by its GPUs and pool, and the new one has the same spec. Without
    it that stretch was lost (bench/chaos.py: a Job deleted after its pod's node was lost)."""
    return {c["metadata"]["name"]: c for c in [*created, *children] if c["kind"] == "Job"}


def gpus_of(job: Mapping[str, Any] | None) -> tuple[int, str]:
    """(GPUs the Job's pod requests, its node pool)."""
    if job is None:
        return 0, ""
    containers = (((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []
    gpus = sum(int(((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0)) for c in containers)
    return gpus, ((job.get("metadata") or {}).get("labels") or {}).get(NODE_POOL, "")


def _running(status: CommonStatus) -> bool:
    """A pod of the run may be running: started, not finished, not suspended by Kueue."""
    return (
        bool(status.start_time) and status.phase in ("Pending", "Running") and ready_reason(status) not in QUEUE_REASONS
    )


def _evicted_at(status: CommonStatus) -> datetime | None:
    return parse_time(status.queue.last_eviction_time if status.queue else None)


def gpu_seconds(change: Change) -> tuple[float, str] | None:
    """(GPU-seconds of a stretch that ended with this change, node pool), or None."""
    before, after = change.before, change.after
    if _running(before):
        stopped = (
            after.phase in TERMINAL
            or not change.same_run
            or after.start_time != before.start_time
            or ready_reason(after) in QUEUE_REASONS
        )
        if not stopped:
            return None
        status, start = before, before.start_time
    elif after.phase in TERMINAL and before.phase not in TERMINAL and after.start_time:
        status, start = after, after.start_time  # started and finished between two reconciles
    else:
        return None
    end = change.now
    if change.same_run and after.completion_time:
        end = parse_time(after.completion_time) or end
    elif ready_reason(after) in QUEUE_REASONS:
        end = _evicted_at(after) or end
    # The pod that started the stretch may have ended before it was seen to (killed, failed, its node lost): it held
    # its GPUs until it ended, not while its Job waited to replace it; where nobody reported its end (a lost node),
    # the next pod's start bounds it, so that no second is counted twice.
    if (ended := parse_time(pods.finished(change.pods, start))) is not None:
        end = min(end, ended)
    if change.same_run and after.start_time != start and (following := parse_time(after.start_time)) is not None:
        end = min(end, max(following, parse_time(start) or following))
    gpus, pool = gpus_of(change.job(status))
    seconds = _seconds(start, end)
    return (gpus * seconds, pool) if gpus and seconds is not None else None


def queue_wait(change: Change) -> float | None:
    """Seconds from the Job's creation (or its last eviction) to its start, when it has just started."""
    after = change.after
    start = parse_time(after.start_time)
    if start is None or (change.same_run and change.before.start_time == after.start_time):
        return None
    job = change.job(after)
    if job is None:
        return None
    since = [parse_time((job.get("metadata") or {}).get("creationTimestamp")), _evicted_at(after)]
    waited_from = max((t for t in since if t is not None and t <= start), default=None)
    return (start - waited_from).total_seconds() if waited_from else None


def finished_run(change: Change) -> tuple[str, float | None] | None:
    """(outcome, seconds the run's pods ran) when the run has just finished."""
    after = change.after
    if after.phase not in TERMINAL or (change.same_run and change.before.phase in TERMINAL):
        return None
    if not after.job_name:
        return None  # an invalid spec: no run
    end = parse_time(after.completion_time) or change.now
    return after.phase, _seconds(after.start_time, end)


def _scored_steps(status: CommonStatus) -> set[int]:
    checkpoints = status.checkpoints if isinstance(status, StyleLoRAStatus) else []
    return {c.step for c in checkpoints if c.score is not None}


def checkpoints_scored(change: Change) -> int:
    earlier = _scored_steps(change.before) if change.same_run else set()
    return len(_scored_steps(change.after) - earlier)


def early_stop(change: Change) -> str | None:
    """Why a StyleLoRA stopped before its planned steps, when its run has just finished."""
    done = finished_run(change)
    reason = change.after.stop_reason if isinstance(change.after, StyleLoRAStatus) else None
    if done is None or done[0] != "Succeeded" or not reason:
        return None
    cause = stop_cause(reason)
    return None if cause == "completed" else cause


def images_rendered(change: Change) -> int:
    before, after = change.before, change.after
    if not isinstance(after, GenerationJobStatus):
        return 0
    earlier = (before.images_done or 0) if change.same_run and isinstance(before, GenerationJobStatus) else 0
    return max(0, (after.images_done or 0) - earlier)


def fusion_seconds(change: Change) -> float | None:
    before, after = change.before, change.after
    seconds = after.duration_seconds if isinstance(after, LoRAFusionStatus) else None
    if seconds is None or (
        change.same_run and isinstance(before, LoRAFusionStatus) and before.duration_seconds == seconds
    ):
        return None
    return float(seconds)


def training(change: Change) -> dict[str, float] | None:
    """Step, total steps, loss and ETA of a StyleLoRA while it trains; None otherwise."""
    after = change.after
    if not isinstance(after, StyleLoRAStatus) or after.phase != "Running" or after.step is None:
        return None
    values = {"step": after.step, "total_steps": after.total_steps, "loss": after.loss}
    values["eta_seconds"] = _eta(after)
    return {key: float(value) for key, value in values.items() if value is not None}


def _eta(status: StyleLoRAStatus) -> float | None:
    """The ETA the current run last reported (a report of another run, or a malformed one, has none)."""
    try:
        report = read_report(status.progress)
    except ValueError:
        return None
    if not isinstance(report, TrainReport) or report.run_hash != status.run_hash or report.progress is None:
        return None
    return report.progress.eta_seconds


def queued_since(change: Change) -> float | None:
    """Unix time since when the run has waited for Kueue (its Job's creation or last eviction); None when not."""
    after = change.after
    if ready_reason(after) not in QUEUE_REASONS:
        return None
    job = change.job(after)
    since = _evicted_at(after) or parse_time(((job or {}).get("metadata") or {}).get("creationTimestamp"))
    return since.timestamp() if since else None
