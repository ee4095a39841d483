"""A Job counts a Pending pod as active: the run says Running only once its pod runs, and a pod that cannot be
scheduled or cannot pull its image shows in status (phase Pending, the cause as the reason, one Warning Event)."""

from __future__ import annotations

import copy

from kleinstyle.operator.reconcile import Decision, reconcile

from tests.support.records import observed

from .test_reconcile import CFG, NOW, job_of, lora, ready_board, with_status

DEPS = {("StyleBoard", "bd9"): ready_board()}
CREATED = "2026-12-06T10:00:00Z"
RUNNING_SINCE = "2026-12-06T10:07:30Z"


def started_lora() -> tuple[dict, dict]:
    """A StyleLoRA whose Job was just created, and that Job as the Job controller shows it: one active pod."""
    body = lora()
    first = reconcile(observed(body=body, dependencies=DEPS), CFG, NOW)
    job = copy.deepcopy(job_of(first))
    job["metadata"].update(uid="job-uid", creationTimestamp=CREATED)
    job["status"] = {"startTime": CREATED, "active": 1, "ready": 0}
    return with_status(body, first), job


def pod(job: dict, status: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job['metadata']['name']}-x7k2p",
            "creationTimestamp": CREATED,
            "ownerReferences": [{"kind": "Job", "name": job["metadata"]["name"], "uid": "job-uid", "controller": True}],
        },
        "status": status,
    }


def unschedulable(job: dict) -> dict:
    message = "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."
    scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
    return pod(job, {"phase": "Pending", "conditions": [scheduled]})


def running(job: dict) -> dict:
    state = {"running": {"startedAt": RUNNING_SINCE}}
    return pod(job, {"phase": "Running", "containerStatuses": [{"name": "train", "state": state}]})


def decide(body: dict, job: dict, *pods: dict) -> Decision:
    return reconcile(observed(body=body, dependencies=DEPS, children=[job], pods=list(pods)), CFG, NOW)


def ready(status: dict) -> dict:
    return next(c for c in status["conditions"] if c["type"] == "Ready")


def test_an_unschedulable_pod_keeps_the_run_pending_and_says_why_once() -> None:
    body, job = started_lora()
    decision = decide(body, job, unschedulable(job))
    assert decision.status["phase"] == "Pending"
    assert ready(decision.status)["reason"] == "Unschedulable"
    assert "cannot be scheduled: 0/3 nodes are available" in decision.status["message"]
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", "Unschedulable")]
    again = decide(with_status(body, decision), job, unschedulable(job))
    assert again.events == [] and again.status["phase"] == "Pending"  # told once, not at every reconcile
    # GPU time counts from when a pod runs: none has yet, whatever the Job's own startTime says.
    assert decision.status["startTime"] is None


def test_an_image_that_cannot_be_pulled_is_the_reason() -> None:
    body, job = started_lora()
    waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "ghcr.io/kleinstyle/runtime:0.1.0"'}
    stuck = pod(job, {"phase": "Pending", "containerStatuses": [{"name": "train", "state": {"waiting": waiting}}]})
    decision = decide(body, job, stuck)
    assert (decision.status["phase"], ready(decision.status)["reason"]) == ("Pending", "ImagePullBackOff")
    assert "Back-off pulling image" in decision.status["message"]
    assert decision.events[0].type == "Warning"


def test_a_pod_being_created_is_pending_without_a_warning() -> None:
    body, job = started_lora()
    waiting = {"reason": "ContainerCreating"}
    creating = pod(job, {"phase": "Pending", "containerStatuses": [{"name": "train", "state": {"waiting": waiting}}]})
    decision = decide(body, job, creating)
    assert (decision.status["phase"], ready(decision.status)["reason"]) == ("Pending", "PodStarting")
    assert all(e.type == "Normal" for e in decision.events)


def test_the_run_is_running_once_its_pod_runs_and_started_then() -> None:
    body, job = started_lora()
    stuck = decide(body, job, unschedulable(job))
    decision = decide(with_status(body, stuck), job, running(job))
    assert decision.status["phase"] == "Running" and ready(decision.status)["reason"] == "JobRunning"
    assert decision.status["startTime"] == RUNNING_SINCE  # not the Job's creation, 7.5 minutes earlier
    # Without any pod seen (the watch has not brought it yet), the Job's own word stands for the phase; the start
    # waits for the pod, so that it is written once.
    job["status"]["ready"] = 1
    unseen = decide(body, job)
    assert unseen.status["phase"] == "Running" and unseen.status["startTime"] is None
