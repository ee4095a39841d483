"""Observe: what one reconcile needs, read from the indexes (and this process's writes still in flight).

Reading is kept apart from deciding (`reconcile`, pure) and writing (`write`) so that a reconcile costs the API
nothing: children, their pods and Kueue's Workloads all come from the watches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from functools import partial
from typing import Any

from .children import GPU_STEPS
from .indexes import (
    CHILD_KINDS,
    JOB_WORKLOADS_INDEX,
    PODS_INDEX,
    WORKLOADS_INDEX,
    children_index,
    objects_index,
    one,
)
from .kinds import KIND_RUNS, Dependency, find_cycle
from .reconcile import Observed, settled
from .wakers import ChildKey, Wakers


def observe(body: Any, indexes: Mapping[str, Any], wakers: Wakers) -> Observed:
    """What reconcile needs, from the indexes: no request to the API."""
    meta = body["metadata"]
    namespace, uid, kind = meta["namespace"], meta["uid"], body["kind"]
    deps_wanted: list[Dependency] = []
    with contextlib.suppress(ValueError):  # an invalid spec is reported by reconcile
        deps_wanted = KIND_RUNS[kind].dependencies(KIND_RUNS[kind].kind.spec.model_validate(body.get("spec") or {}))
    for waited in [key for key, uids in wakers.waiting_on.items() if uid in uids]:
        wakers.waiting_on[waited].discard(uid)
    dependencies = {}
    for dep in deps_wanted:
        wakers.waiting_on[(namespace, dep.kind, dep.name)].add(uid)
        dependencies[(dep.kind, dep.name)] = one(indexes[objects_index(dep.kind)].get((namespace, dep.name)))
    cycle = find_cycle((kind, meta["name"]), partial(dependencies_of, indexes, namespace)) if deps_wanted else None
    # The operator's record of each dependency's runs: the Jobs it created for it (status alone is never believed).
    jobs_index = indexes[children_index("Job")]
    dependency_jobs = {
        key: list(jobs_index.get(obj["metadata"]["uid"], ())) for key, obj in dependencies.items() if obj is not None
    }
    children: dict[ChildKey, dict[str, Any]] = {}
    gone = wakers.tombstones  # deleted while a watch was away (relists.py)
    for child_kind in CHILD_KINDS:
        for child in indexes[children_index(child_kind)].get(uid, ()):
            if child["metadata"].get("uid") not in gone:
                children[(child_kind, child["metadata"]["name"])] = child
    for key, child in list(wakers.created[uid].items()):
        if key in children:
            del wakers.created[uid][key]  # the index has it now
        else:
            children[key] = child
    for key in list(wakers.deleted[uid]):
        if key in children:
            del children[key]
        else:
            wakers.deleted[uid].discard(key)  # the index has forgotten it too
    listed = list(children.values())
    pods = [pod for pod in indexes.get(PODS_INDEX, {}).get(uid, ()) if pod["metadata"].get("uid") not in gone]
    workloads = {}
    for job in (c for c in listed if c["kind"] == "Job" and c["metadata"].get("uid")):
        wakers.job_owner[job["metadata"]["uid"]] = uid
        workload = one((indexes.get(WORKLOADS_INDEX) or {}).get(job["metadata"]["uid"]))
        if workload is not None and workload["metadata"].get("uid") not in gone:
            workloads[job["metadata"]["uid"]] = workload
    # Workloads of this object's Jobs by the Job's name, a deleted Job's among them until they go (its uid wakes this
    # object when they do).
    job_workloads: dict[str, list[str]] = {}
    for job_name, job_uid in (indexes.get(JOB_WORKLOADS_INDEX) or {}).get(namespace, ()):
        workload = one((indexes.get(WORKLOADS_INDEX) or {}).get(job_uid))
        if workload is not None and workload["metadata"].get("uid") in gone:
            continue
        if job_name.startswith(f"{meta['name']}-"):
            job_workloads.setdefault(job_name, []).append(job_uid)
            wakers.job_owner.setdefault(job_uid, uid)
    if KIND_RUNS[kind].step in GPU_STEPS and not settled(body):
        # Its Job would mount the model cache: it waits on the namespace's models-pull Job, listed by `pulls`.
        wakers.waiting_models[namespace].add(uid)
        if namespace not in wakers.pulls:
            wakers.pulls_wanted.set()
    elif namespace in wakers.waiting_models:
        wakers.waiting_models[namespace].discard(uid)
    listed_pulls = wakers.pulls.get(namespace)
    return Observed(
        body=dict(body),
        dependencies=dependencies,
        children=listed,
        pods=pods,
        workloads=workloads,
        job_workloads=job_workloads,
        cycle=cycle or (),
        dependency_jobs=dependency_jobs,
        models_pulls=listed_pulls[0] if listed_pulls is not None else None,
        models_pull_pods=listed_pulls[1] if listed_pulls is not None else (),
    )


def dependencies_of(indexes: Mapping[str, Any], namespace: str, node: tuple[str, str]) -> list[Dependency]:
    """What the object `node` (kind, name) in `namespace` depends on, from the index (none when missing or invalid)."""
    kind, name = node
    obj = one(indexes[objects_index(kind)].get((namespace, name)))
    if obj is None:
        return []
    try:
        return KIND_RUNS[kind].dependencies(KIND_RUNS[kind].kind.spec.model_validate(obj.get("spec") or {}))
    except ValueError:
        return []
