"""The kopf registration: which handler runs on which watch event, for all four kinds.

Everything here is a thin shell: indexes (`indexes`) fill from the watches, an event wakes the daemons it concerns
(`wakers`), and each resource's daemon (`daemon`) observes, decides (`reconcile`, pure) and writes; deletion runs
`cleanup`. Kept this small so that what reacts to which event can be read in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from . import kueue, pulls, relists
from .api import GROUP, KINDS, VERSION
from .cleanup import delete_resource
from .config import OperatorConfig
from .daemon import run_resource
from .indexes import (
    CHILD_KINDS,
    JOB_WORKLOADS_INDEX,
    PODS_INDEX,
    WORKLOADS_INDEX,
    child_indexer,
    children_index,
    index_job_workload,
    index_object,
    index_pod,
    index_workload,
    objects_index,
)
from .kube import PLURALS, login
from .naming import OWNER_UID
from .wakers import Wakers


def register(registry: kopf.OperatorRegistry, cfg: OperatorConfig, kueue_version: str | None = None) -> None:
    """Attach the indexes, wake-ups, daemons and cleanup of all four kinds to `registry` (and an index of Kueue's
    Workloads when the cluster serves `kueue_version`), and log in as the kubernetes client does (kubeconfig or
    in-cluster ServiceAccount): a registry of our own starts without kopf's default login handlers."""
    kopf.on.login(registry=registry)(login)
    owned = {OWNER_UID: kopf.PRESENT}
    for child_kind in CHILD_KINDS:
        api_version, plural = PLURALS[child_kind]
        group, _, version = api_version.rpartition("/")
        resource = (group, version, plural)
        kopf.index(*resource, labels=owned, registry=registry, id=children_index(child_kind))(child_indexer(child_kind))
        kopf.on.event(*resource, labels=owned, registry=registry, id=f"wake_{plural}")(_wake_owner)
    # The runs' pods: why a run waits (unschedulable, an image it cannot pull) or failed, and when it started.
    kopf.index("", "v1", "pods", labels=owned, registry=registry, id=PODS_INDEX)(index_pod)
    kopf.on.event("", "v1", "pods", labels=owned, registry=registry, id="wake_pods")(_wake_owner)
    for kind in KINDS:
        resource = (GROUP, VERSION, kind.plural)
        kopf.index(*resource, registry=registry, id=objects_index(kind.kind))(index_object)
        kopf.on.event(*resource, registry=registry, id=f"wake_{kind.plural}")(_wake_self_and_dependents)
        # A deleted resource's daemon that does not stop at once (mid-reconcile) is looked at again after
        # cancellation_polling: kopf's 60 s default could hold the finalizer, and `kubectl delete`, that long.
        kopf.daemon(*resource, registry=registry, id="reconcile", cancellation_timeout=5.0, cancellation_polling=0.5)(
            run_resource
        )
        kopf.on.delete(*resource, registry=registry, id="cleanup")(delete_resource)
    # The chart's models-pull Jobs and their pods, followed by one task of the operator's (the watches above select
    # only the operator's own children): runs that read the model cache wait for them (models_gate).
    kopf.on.startup(registry=registry, id="follow_models_pulls")(pulls.start)
    kopf.on.cleanup(registry=registry, id="stop_following_models_pulls")(pulls.stop)
    if kueue_version:
        resource = (kueue.GROUP, kueue_version, "workloads")
        by_job = {kueue.JOB_UID_LABEL: kopf.PRESENT}
        kopf.index(*resource, labels=by_job, registry=registry, id=WORKLOADS_INDEX)(index_workload)
        kopf.index(*resource, labels=by_job, registry=registry, id=JOB_WORKLOADS_INDEX)(index_job_workload)
        kopf.on.event(*resource, labels=by_job, registry=registry, id="wake_workloads")(_wake_job_owner)


# ---- wake-ups: an event wakes the daemons it concerns ----------------------------------------------------------
# Coroutines, so kopf runs them on its event loop (a plain function goes to a thread, and asyncio.Event is not
# thread-safe); each also notes a relist's listed events (relists.py).


async def _wake_owner(labels: Mapping[str, str], memo: Any, type: str | None, **indexes: Any) -> None:
    relists.note(memo.wakers, memo.kube, type, indexes)
    memo.wakers.wake(labels[OWNER_UID])


async def _wake_job_owner(labels: Mapping[str, str], memo: Any, type: str | None, **indexes: Any) -> None:
    relists.note(memo.wakers, memo.kube, type, indexes)
    if (owner := memo.wakers.job_owner.get(labels[kueue.JOB_UID_LABEL])) is not None:
        memo.wakers.wake(owner)


async def _wake_self_and_dependents(body: Any, memo: Any, type: str | None, **indexes: Any) -> None:
    relists.note(memo.wakers, memo.kube, type, indexes)
    meta = body["metadata"]
    wakers: Wakers = memo.wakers
    wakers.wake(meta["uid"])
    for uid in wakers.waiting_on.get((meta["namespace"], body["kind"], meta["name"]), set()).copy():
        wakers.wake(uid)
