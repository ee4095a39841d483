"""The in-memory indexes kopf fills from its watches, and their names.

Reconcile reads the world from these, never by polling the API: every child of every resource by its owner's uid,
every kleinstyle object by namespace and name, and Kueue's Workloads by their Job's uid and, by namespace, with the
name of the Job they were made for. kopf fills them before any daemon starts, so a restarted operator sees every
child it made and creates none twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from . import kueue
from .kube import PLURALS
from .naming import OWNER_UID

CHILD_KINDS = ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job")  # what a run creates, in that order
WORKLOADS_INDEX = "kueue_workloads"
JOB_WORKLOADS_INDEX = "kueue_workloads_by_namespace"  # (Job name, Job uid) of each Workload, by its namespace
PODS_INDEX = "run_pods"  # the pods of every run's Job, by the owner's uid (why a run waits or failed)

Indexer = Callable[..., dict[Any, dict[str, Any]]]


def children_index(kind: str) -> str:
    return f"children_{PLURALS[kind][1]}"


def objects_index(kind: str) -> str:
    return f"objects_{PLURALS[kind][1]}"


def one(store: Any) -> Any:
    """The object an index keeps under a key (one per key here), or None."""
    return next(iter(store), None) if store is not None else None


def child_indexer(kind: str) -> Indexer:
    api_version = PLURALS[kind][0]

    def index_child(body: Any, labels: Mapping[str, str], **_: Any) -> dict[str, dict[str, Any]]:
        """A child by its owner's uid, with the apiVersion and kind reconcile compares by."""
        return {labels[OWNER_UID]: {**dict(body), "apiVersion": api_version, "kind": kind}}

    return index_child


def index_object(body: Any, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    meta = body["metadata"]
    return {(meta["namespace"], meta["name"]): dict(body)}


def index_pod(body: Any, labels: Mapping[str, str], **_: Any) -> dict[str, dict[str, Any]]:
    """A run's pod by its owner's uid (the Job's pod template carries the owner's labels)."""
    return {labels[OWNER_UID]: {**dict(body), "apiVersion": "v1", "kind": "Pod"}}


def index_workload(labels: Mapping[str, str], body: Any, **_: Any) -> dict[str, dict[str, Any]]:
    return {labels[kueue.JOB_UID_LABEL]: dict(body)}


def index_job_workload(labels: Mapping[str, str], body: Any, **_: Any) -> dict[str, tuple[str, str]]:
    """(Job name, Job uid) of a Workload, by namespace: Kueue matches a Job to a Workload by the Job's name, so a
    Workload of a deleted Job, not yet removed, would be taken for the Workload of a new Job of that name."""
    meta = body["metadata"]
    names = [o["name"] for o in meta.get("ownerReferences") or [] if o.get("kind") == "Job" and o.get("controller")]
    return {meta["namespace"]: (names[0], labels[kueue.JOB_UID_LABEL])} if names else {}
