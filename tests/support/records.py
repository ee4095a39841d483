"""The operator's records of dependencies as tests build them: a dependency's status is believed only where a Job
the operator created for it completed the run its status names (`kinds.base.recorded_run`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kleinstyle.operator.naming import RUN_HASH, run_labels
from kleinstyle.operator.reconcile import Observed

Key = tuple[str, str]


def completed_job(obj: Mapping[str, Any], condition: str = "Complete") -> dict[str, Any]:
    """The Job of `obj`'s current run (`status.runHash`) as the operator's index holds it, ended with `condition`."""
    meta, run_id = obj["metadata"], obj["status"]["runHash"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": f"{meta['name']}-run-{run_id}",
            "namespace": meta["namespace"],
            "labels": {**run_labels(obj["kind"], meta["uid"], "run", run_id), RUN_HASH: run_id},
            "ownerReferences": [{"kind": obj["kind"], "name": meta["name"], "uid": meta["uid"], "controller": True}],
        },
        "status": {"conditions": [{"type": condition, "status": "True"}]},
    }


def records(dependencies: Mapping[Key, Mapping[str, Any] | None]) -> dict[Key, list[dict[str, Any]]]:
    """A completed Job for every dependency whose status names a run."""
    return {
        key: [completed_job(obj)]
        for key, obj in dependencies.items()
        if obj is not None and (obj.get("status") or {}).get("runHash")
    }


def observed(**fields: Any) -> Observed:
    """`Observed(**fields)` with the operator's record (a completed Job) of every dependency that names a run, unless
    `dependency_jobs` is given."""
    if "dependency_jobs" not in fields:
        fields["dependency_jobs"] = records(fields.get("dependencies") or {})
    return Observed(**fields)
