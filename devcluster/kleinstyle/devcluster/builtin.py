"""What a real API server does to some built-in kinds, which kubectl relies on.

- Jobs are defaulted on create as the Job API does: a selector on the Job's uid and the matching pod-template labels
  (`kubectl logs job/X` and `kubectl describe job` find the Job's pods by that selector), one completion, one pod at
  a time, six retries.
- `events.k8s.io/v1` Events are the core Events seen through the newer API (one storage, two shapes), so `kubectl
  events` and any client of either API see the same Events, as on a real server.
"""

from __future__ import annotations

import copy
from typing import Any

JOB_UID_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid")
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
# events.k8s.io/v1 field -> core/v1 field, where only the name differs
EVENT_RENAMES = {
    "note": "message",
    "regarding": "involvedObject",
    "deprecatedSource": "source",
    "deprecatedFirstTimestamp": "firstTimestamp",
    "deprecatedLastTimestamp": "lastTimestamp",
    "deprecatedCount": "count",
    "reportingController": "reportingComponent",
}
EVENT_SHARED = ("metadata", "eventTime", "series", "reportingInstance", "action", "reason", "related", "type")


def default_job(job: dict[str, Any]) -> dict[str, Any]:
    """A just-created Job with the API's defaults (its metadata.uid is set already)."""
    job = copy.deepcopy(job)
    meta, spec = job["metadata"], job.setdefault("spec", {})
    uid, name = meta["uid"], meta["name"]
    if not spec.get("manualSelector"):
        spec["selector"] = {"matchLabels": {JOB_UID_LABELS[0]: uid}}
        labels = spec.setdefault("template", {}).setdefault("metadata", {}).setdefault("labels", {})
        labels.update({key: uid for key in JOB_UID_LABELS} | {key: name for key in JOB_NAME_LABELS})
    for key, value in (("completions", 1), ("parallelism", 1), ("backoffLimit", 6), ("suspend", False)):
        spec.setdefault(key, value)
    spec.setdefault("completionMode", "NonIndexed")
    return job


def event_v1(core: dict[str, Any], api_version: str) -> dict[str, Any]:
    """A stored core/v1 Event as events.k8s.io/v1 shows it."""
    out: dict[str, Any] = {"apiVersion": api_version, "kind": "Event"}
    out |= {key: core[key] for key in EVENT_SHARED if key in core}
    out |= {new: core[old] for new, old in EVENT_RENAMES.items() if old in core}
    if "reportingController" not in out and (core.get("source") or {}).get("component"):
        out["reportingController"] = core["source"]["component"]
    return out


def event_core(event: dict[str, Any]) -> dict[str, Any]:
    """An events.k8s.io/v1 Event as the core/v1 Event it is stored as."""
    out: dict[str, Any] = {key: event[key] for key in ("apiVersion", "kind", *EVENT_SHARED) if key in event}
    out |= {old: event[new] for new, old in EVENT_RENAMES.items() if new in event}
    return out
