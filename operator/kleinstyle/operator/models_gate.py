"""The models gate: a run that reads the model cache waits for the namespace's `kleinstyle models pull` Job.

The chart runs one Job per watched namespace that fills the model-cache claim (`templates/models.yaml`, labelled
`app.kubernetes.io/component: models-pull`); its pod writes the pull's one-line JSON summary to its termination
message (`--summary`: `{"complete": {name: folder}, "missing": {name: folder}, "error": ...}`). Decided here, from the
Job and its pods only (written by the Job controller and the kubelet, never a kleinstyle status):

    no pull Job in the namespace     no gate: runs start as they always did (the cache is filled some other way)
    the newest one is running        hold (ModelsPulling); a failed attempt it retries after is named
    the newest one failed            hold (ModelsPullFailed), naming the missing models' folders and the error
    the newest one completed         go

Only a run whose Job mounts the model cache is held (train and generate; prepare and fuse never read it), and only
before its Job is created: a run already started goes on whatever a later pull does. The operator never mounts the
claim: the pod's summary is all it knows of what is in it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .conditions import true_condition

COMPONENT_LABEL = "app.kubernetes.io/component"
MODELS_PULL = "models-pull"  # the value of COMPONENT_LABEL on the pull Job and on its pods
CONDITION = "ModelsReady"
PULLING = "ModelsPulling"
PULL_FAILED = "ModelsPullFailed"
PULLED = "ModelsPulled"
NO_PULL = "NoModelsPull"
# The labels the Job controller puts on a Job's pods (the older names first, the batch.kubernetes.io ones since 1.27).
_JOB_UID_LABELS = ("controller-uid", "batch.kubernetes.io/controller-uid")
_JOB_NAME_LABELS = ("job-name", "batch.kubernetes.io/job-name")


@dataclass(frozen=True)
class Summary:
    """The pull's summary (`kleinstyle models pull --summary`), as its pod's termination message holds it."""

    complete: Mapping[str, str]
    missing: Mapping[str, str]
    error: str | None = None

    def missing_text(self) -> str:
        return ", ".join(f"{name} ({folder}/)" for name, folder in sorted(self.missing.items()))


@dataclass(frozen=True)
class Gate:
    """What the namespace's pull Job says of the model cache: `hold` (with its reason and message) or not."""

    job: str
    hold: bool
    reason: str
    message: str

    @property
    def failed(self) -> bool:
        return self.reason == PULL_FAILED


def read_summary(message: str | None) -> Summary | None:
    """The summary in a termination message, or None when there is none or it is not one (a crash's traceback, a
    message cut at Kubernetes' 4096 bytes)."""
    if not message:
        return None
    try:
        document = json.loads(message.strip())
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    complete, missing, error = document.get("complete"), document.get("missing"), document.get("error")
    if not isinstance(complete, dict) or not isinstance(missing, dict):
        return None
    return Summary(
        complete={str(k): str(v) for k, v in complete.items()},
        missing={str(k): str(v) for k, v in missing.items()},
        error=str(error) if error is not None else None,
    )


def pods_of(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The pods of `job`: controlled by it (its uid), or, where the uid is not known, labelled with its name."""
    meta = job["metadata"]
    uid, name = meta.get("uid"), meta["name"]
    found = []
    for pod in pods:
        pod_meta = pod.get("metadata") or {}
        if pod_meta.get("namespace", meta.get("namespace")) != meta.get("namespace"):
            continue
        labels = pod_meta.get("labels") or {}
        owners = [o.get("uid") for o in pod_meta.get("ownerReferences") or [] if o.get("kind") == "Job"]
        if uid:
            mine = uid in owners or any(labels.get(key) == uid for key in _JOB_UID_LABELS)
        else:
            mine = any(labels.get(key) == name for key in _JOB_NAME_LABELS)
        if mine:
            found.append(pod)
    return found


def last_summary(pods: Sequence[Mapping[str, Any]]) -> Summary | None:
    """The summary the latest attempt of the pull wrote (a container's terminated state, or its last one when the
    kubelet restarted it), by when it finished."""
    ended: list[tuple[str, str]] = []
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            for state in (container.get("state"), container.get("lastState")):
                terminated = (state or {}).get("terminated")
                if terminated and terminated.get("message"):
                    ended.append((terminated.get("finishedAt") or "", terminated["message"]))
    for _, message in sorted(ended, reverse=True):
        if (summary := read_summary(message)) is not None:
            return summary
    return None


def current_pull(jobs: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The namespace's pull Job that decides: the newest (a changed setting makes a new Job; the chart deletes the
    old one, but its deletion may not have reached the watch yet)."""
    live = [job for job in jobs if not (job.get("metadata") or {}).get("deletionTimestamp")]
    if not live:
        return None
    return max(live, key=lambda job: (job["metadata"].get("creationTimestamp") or "", job["metadata"]["name"]))


def models_gate(jobs: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]]) -> Gate | None:
    """What the pull Jobs of a namespace (and their pods) say of its model cache; None when there is no pull Job."""
    job = current_pull(jobs)
    if job is None:
        return None
    name = job["metadata"]["name"]
    summary = last_summary(pods_of(job, pods))
    if true_condition(job, "Complete") or true_condition(job, "SuccessCriteriaMet"):
        return Gate(name, False, PULLED, f"models-pull Job {name} completed")
    failed = true_condition(job, "Failed") or true_condition(job, "FailureTarget")
    if failed:
        why = failed.get("reason") or "Failed"
        if summary is None:
            detail = "its pod left no summary (it is gone, or it crashed before writing one): see its logs"
        else:
            detail = f"missing {summary.missing_text() or 'nothing'}"
            if summary.error:
                detail += f": {summary.error}"
        message = (
            f"models-pull Job {name} failed ({why}): {detail}; runs that read the model cache wait until a pull "
            f"completes (fix it and run the pull again, or delete the Job to run without it)"
        )
        return Gate(name, True, PULL_FAILED, message)
    message = f"models-pull Job {name} is filling the model cache; runs that read it start once it completes"
    if summary is not None and summary.error:
        # An attempt failed and the Job retries: what is missing so far, and why.
        message += f" (an attempt failed, missing {summary.missing_text() or 'nothing'}: {summary.error})"
    return Gate(name, True, PULLING, message)


def mounts_model_cache(job: Mapping[str, Any], claim: str) -> bool:
    """Whether the pod of `job` (a Job a run would create) mounts the model-cache claim `claim`."""
    volumes = ((((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get("volumes")) or []
    return any((v.get("persistentVolumeClaim") or {}).get("claimName") == claim for v in volumes)
