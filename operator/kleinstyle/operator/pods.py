"""What a run's pods say, as pure functions: why the run waits for one (it cannot be scheduled, its image cannot be
pulled), when it started running (GPU time counts from there, not from the Job's creation), and why it failed.

A Job counts a Pending pod as active, so the Job alone cannot tell a run that computes from one that waits for a GPU
node, a PersistentVolumeClaim or an image: the pods can (their index is filled from the operator's watch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Pod = Mapping[str, Any]

# Waiting reasons that no wait mends by itself (the image name, the registry's credentials, a missing Secret or
# ConfigMap): shown as the run's reason, with a Warning. The scheduler's Unschedulable is one too, until the cluster
# gains a node that fits (an autoscaler) or the spec asks for less.
STUCK_REASONS = frozenset(
    {
        "Unschedulable",
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)


def of_job(pods: Sequence[Pod], job_name: str) -> list[Pod]:
    """The pods `job_name` controls, newest first."""
    mine = [
        pod
        for pod in pods
        if any(
            ref.get("kind") == "Job" and ref.get("name") == job_name and ref.get("controller")
            for ref in (pod.get("metadata") or {}).get("ownerReferences") or []
        )
    ]
    return sorted(mine, key=lambda pod: pod["metadata"].get("creationTimestamp") or "", reverse=True)


def _container_states(pod: Pod) -> list[Mapping[str, Any]]:
    return [cs.get("state") or {} for cs in (pod.get("status") or {}).get("containerStatuses") or []]


def starting(pod: Pod) -> bool:
    """Not running yet: Pending (bound or not) with no container running. A pod that ran and ended is not."""
    phase = (pod.get("status") or {}).get("phase") or "Pending"
    return phase == "Pending" and not any("running" in state for state in _container_states(pod))


def started(pods: Sequence[Pod]) -> str | None:
    """When the newest pod that ran started running (a container's startedAt), or None while none has."""
    times = [
        (state.get("running") or state.get("terminated") or {}).get("startedAt")
        for pod in pods
        for state in _container_states(pod)
    ]
    return max((t for t in times if t), default=None)


def finished(pods: Sequence[Pod], started: str | None) -> str | None:
    """When the container that started running at `started` ended (its finishedAt), where its pod says it did."""
    for pod in pods:
        for state in _container_states(pod):
            ended = state.get("terminated") or {}
            if started is not None and ended.get("startedAt") == started:
                return ended.get("finishedAt")
    return None


def waiting(pod: Pod) -> tuple[str, str] | None:
    """(reason, message) when `pod` waits for something it will not get without help (`STUCK_REASONS`): the
    scheduler's verdict, or the reason its container waits. None when it runs, ended, or is merely starting."""
    status = pod.get("status") or {}
    name = pod["metadata"]["name"]
    if status.get("phase") not in (None, "Pending"):
        return None
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            reason = condition.get("reason") or "Unschedulable"
            return reason, f"pod {name} cannot be scheduled: {condition.get('message') or reason}"
    for state in _container_states(pod):
        wait = state.get("waiting") or {}
        if wait.get("reason") in STUCK_REASONS:
            return wait["reason"], f"pod {name} cannot start: {wait['reason']}: {wait.get('message') or ''}".strip()
    return None


def last_failure(pods: Sequence[Pod]) -> tuple[str, Mapping[str, Any]] | None:
    """(name, terminated state) of the newest failed container among `pods`, or None."""
    failed = []
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if term and term.get("exitCode", 0) != 0:
                failed.append((term.get("finishedAt") or "", pod["metadata"]["name"], term))
    if not failed:
        return None
    _, name, term = max(failed, key=lambda item: (item[0], item[1]))
    return name, term


def failure_text(last: tuple[str, Mapping[str, Any]]) -> str:
    """The failed pod's (`last_failure`) reason, exit code and termination message, for a Failed status."""
    name, term = last
    detail = (term.get("message") or "").strip().splitlines()
    tail = f": {detail[-1]}" if detail else ""
    return f"pod {name}: {term.get('reason') or 'Error'} (exit code {term.get('exitCode')}){tail}"
