"""GPU-seconds of a run whose pod died and was replaced (a SIGKILL, a lost node): what each pod held, not the wait
between them. bench/chaos.py found the operator charging a tenant 2.7 times what its pods ran: a stretch ended only
when the next pod's start was seen, so the gap (the Job's back-off, a node's eviction) counted, and the new pod's
first seconds twice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kleinstyle.operator.usage import Change, gpu_seconds, jobs_by_name

pytestmark = pytest.mark.unit

T0 = datetime(2026, 12, 7, 19, 0, tzinfo=UTC)
JOB = {
    "metadata": {"name": "j1", "labels": {"kleinstyle.dev/node-pool": "h200"}},
    "spec": {"template": {"spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpu": 1}}}]}}},
}


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(phase: str, started: float, **fields: Any) -> dict[str, Any]:
    ready = {"type": "Ready", "status": "False", "reason": "JobRunning", "lastTransitionTime": at(0)}
    return {"phase": phase, "runHash": "r1", "jobName": "j1", "startTime": at(started), "conditions": [ready], **fields}


def pod(name: str, started: float, finished: float | None) -> dict[str, Any]:
    state = (
        {"terminated": {"startedAt": at(started), "finishedAt": at(finished), "exitCode": 137}}
        if finished is not None
        else {"running": {"startedAt": at(started)}}
    )
    owner = {"kind": "Job", "name": "j1", "controller": True}
    return {"metadata": {"name": name, "ownerReferences": [owner]}, "status": {"containerStatuses": [{"state": state}]}}


def change(before: dict[str, Any], after: dict[str, Any], now: float, pods: list[dict[str, Any]]) -> Change:
    return Change.of("StyleLoRA", "a-00", "l", before, after, {"j1": JOB}, T0 + timedelta(seconds=now), pods)


def test_a_killed_pod_counts_until_it_died_not_until_its_replacement_was_seen() -> None:
    first, second = pod("p1", 100, 130), pod("p2", 200, None)
    # The operator sees the second pod running at 230: the first ran 30 s, then the Job waited 70 s.
    assert gpu_seconds(change(status("Running", 100), status("Running", 200), 230, [second, first])) == (30.0, "h200")
    done = status("Succeeded", 200, completionTime=at(260))
    assert gpu_seconds(change(status("Running", 200), done, 270, [pod("p2", 200, 260), first])) == (60.0, "h200")


def test_a_pod_whose_end_nobody_reported_counts_until_the_next_one_started_at_most() -> None:
    lost, replacement = pod("p1", 100, None), pod("p2", 200, None)  # its node lost: it reads running for ever
    assert gpu_seconds(change(status("Running", 100), status("Running", 200), 230, [replacement, lost])) == (
        100.0,
        "h200",
    )


def test_a_job_deleted_by_hand_and_made_again_still_counts_the_stretch_of_its_pod() -> None:
    """The reconcile that makes the Job again sees no Job of that name; the one it creates carries the same GPUs."""
    running = status("Running", 0)
    replaced = status("Pending", 40)
    remade = {**JOB, "kind": "Job"}
    seen = Change.of("StyleLoRA", "a", "l", running, replaced, jobs_by_name([], [remade]), T0 + timedelta(seconds=41))
    assert gpu_seconds(seen) == (40.0, "h200")  # 0 -> 40 s, when the next pod started
    lost = Change.of("StyleLoRA", "a", "l", running, replaced, jobs_by_name([], []), T0 + timedelta(seconds=41))
    assert gpu_seconds(lost) is None  # what the operator counted before: nothing
