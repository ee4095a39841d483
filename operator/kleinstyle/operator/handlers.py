"""The kopf handlers: thin I/O shells around `reconcile`. Read the world from memory, decide (pure), write the decision.

Watch, don't poll. kopf keeps one watch per resource kind and fills in-memory indexes from it: every child of every
resource (by the owner's uid), and every kleinstyle object (by namespace and name). Each resource has a daemon that
reconciles from those indexes, then sleeps until something it depends on changes: an event on the resource
itself, on one of its children (a Job that starts, completes or fails), or on an object it waits for (its board,
its LoRAs) wakes it at once. A resource that waits costs the API server nothing; a slow resync (`resyncSeconds`) is
the safety net. The API is written to only to change something: create or delete a child, patch status, post an
Event; and read only to learn why a Job failed (its pods).

kopf fills the indexes before any daemon starts, so a restarted operator sees every child it made and creates none
twice. A child created here is remembered until its own watch event reaches the index, so a reconcile woken in
between does not try to create it again. Deletion removes the children (and the artifacts when the spec says Delete).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import kopf
from kleinstyle.contract.layout import owner_folder
from kubernetes.client.rest import ApiException

from . import kueue, metrics, usage
from .api import GROUP, KINDS, VERSION
from .config import OperatorConfig
from .kinds import KIND_RUNS, Dependency, find_cycle
from .kinds.base import owner_of
from .kube import PLURALS, Kube
from .naming import OWNER_UID, selector
from .reconcile import (
    Decision,
    Observed,
    blocked,
    failed_reconcile,
    foreign_child,
    job_failed,
    reconcile,
    settled,
)

CHILD_KINDS = ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job")
WORKLOADS_INDEX = "kueue_workloads"
ERROR_BACKOFF_S = 5.0  # after an API refusal or a bug: try again this soon, not at the next slow resync
MAX_ERROR_BACKOFF_S = 300.0  # ... twice as long each time the same error repeats, up to this
WARNING_INTERVAL_S = 600.0  # one Warning Event per object and reason this often at most, however often it fails
ERROR_TEXT_LIMIT = 500  # characters of an exception's text in status and Events (the log has it all)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Wakers:
    """Who to wake on which event, in this process's memory (rebuilt by the first reconcile after a restart)."""

    events: dict[str, asyncio.Event] = field(default_factory=dict)  # resource uid -> its daemon's wake-up
    waiting_on: dict[tuple[str, str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    # Children this process created or deleted whose watch event has not reached the index yet, by owner uid.
    created: dict[str, dict[tuple[str, str], dict]] = field(default_factory=lambda: defaultdict(dict))
    deleted: dict[str, set[tuple[str, str]]] = field(default_factory=lambda: defaultdict(set))
    # The status this process last wrote, with the resourceVersion the write made, until the watch brings it back:
    # a reconcile woken in between compares with it, so it neither writes the same patch nor posts the same Event
    # twice.
    written: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    job_owner: dict[str, str] = field(default_factory=dict)  # a Job's uid -> its owner's uid (Workload events)
    # Reconciles that failed, by uid: the last error and how many times in a row it came (each retry waits longer),
    # and when a Warning Event of each reason was last posted (time.monotonic()).
    failures: dict[str, tuple[str, int]] = field(default_factory=dict)
    warned: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))

    def event(self, uid: str) -> asyncio.Event:
        return self.events.setdefault(uid, asyncio.Event())

    def wake(self, uid: str) -> None:
        if uid in self.events:
            self.events[uid].set()

    def current(self, body: Any) -> dict[str, Any]:
        """`body`, with the status this process last wrote when the watch has not brought that write back yet."""
        uid, seen = body["metadata"]["uid"], body["metadata"].get("resourceVersion") or ""
        if uid not in self.written:
            return dict(body)
        version, status = self.written[uid]
        if _not_older(seen, version):
            del self.written[uid]
            return dict(body)
        return {**body, "status": {**(body.get("status") or {}), **status}}

    def failed(self, uid: str, error: str) -> float:
        """Count a failed reconcile; the seconds until the next try: ERROR_BACKOFF_S, doubled each time the same
        `error` comes again, up to MAX_ERROR_BACKOFF_S (a different error starts over)."""
        last, times = self.failures.get(uid, ("", 0))
        times = times + 1 if last == error else 1
        self.failures[uid] = (error, times)
        return min(ERROR_BACKOFF_S * 2 ** min(times - 1, 30), MAX_ERROR_BACKOFF_S)

    def succeeded(self, uid: str) -> None:
        self.failures.pop(uid, None)

    def may_warn(self, uid: str, reason: str, now: float) -> bool:
        """Whether a Warning Event with `reason` about `uid` may be posted at `now` (and, if so, that it was): one
        per WARNING_INTERVAL_S, so a failure retried for hours is one Event every few minutes, not one per try."""
        last = self.warned[uid].get(reason)
        if last is not None and now - last < WARNING_INTERVAL_S:
            return False
        self.warned[uid][reason] = now
        return True

    def forget(self, uid: str) -> None:
        for table in (self.events, self.created, self.deleted, self.written, self.failures, self.warned):
            table.pop(uid, None)
        for job_uid in [job for job, owner in self.job_owner.items() if owner == uid]:
            del self.job_owner[job_uid]


def _not_older(seen: str, written: str) -> bool:
    """resourceVersions are opaque, but etcd's (and the emulator's) are increasing integers; otherwise equality."""
    if seen.isdigit() and written.isdigit():
        return int(seen) >= int(written)
    return seen == written


def _one(store: Any) -> Any:
    return next(iter(store), None) if store is not None else None


async def observe(kube: Kube, body: Any, indexes: Mapping[str, Any], wakers: Wakers) -> Observed:
    """What reconcile needs, from the indexes; pods (one LIST) only when a Job failed, for the pod's reason."""
    meta = body["metadata"]
    namespace, uid, kind = meta["namespace"], meta["uid"], body["kind"]
    deps_wanted: list = []
    with contextlib.suppress(ValueError):  # an invalid spec is reported by reconcile
        deps_wanted = KIND_RUNS[kind].dependencies(KIND_RUNS[kind].kind.spec.model_validate(body.get("spec") or {}))
    for waited in [key for key, uids in wakers.waiting_on.items() if uid in uids]:
        wakers.waiting_on[waited].discard(uid)
    dependencies = {}
    for dep in deps_wanted:
        wakers.waiting_on[(namespace, dep.kind, dep.name)].add(uid)
        dependencies[(dep.kind, dep.name)] = _one(indexes[_objects_index(dep.kind)].get((namespace, dep.name)))
    cycle = find_cycle((kind, meta["name"]), partial(_dependencies_of, indexes, namespace)) if deps_wanted else None
    # The operator's record of each dependency's runs: the Jobs it created for it (status alone is never believed).
    jobs_index = indexes[_children_index("Job")]
    dependency_jobs = {
        key: list(jobs_index.get(obj["metadata"]["uid"], ())) for key, obj in dependencies.items() if obj is not None
    }
    children = {}
    for child_kind in CHILD_KINDS:
        for child in indexes[_children_index(child_kind)].get(uid, ()):
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
    failed = any(c["kind"] == "Job" and job_failed(c) for c in listed)
    pods = await kube.list("Pod", namespace, selector({OWNER_UID: uid})) if failed else []
    workloads = {}
    for job in (c for c in listed if c["kind"] == "Job" and c["metadata"].get("uid")):
        wakers.job_owner[job["metadata"]["uid"]] = uid
        if (workload := _one((indexes.get(WORKLOADS_INDEX) or {}).get(job["metadata"]["uid"]))) is not None:
            workloads[job["metadata"]["uid"]] = workload
    return Observed(
        body=dict(body),
        dependencies=dependencies,
        children=listed,
        pods=pods,
        workloads=workloads,
        cycle=cycle or (),
        dependency_jobs=dependency_jobs,
    )


def _dependencies_of(indexes: Mapping[str, Any], namespace: str, node: tuple[str, str]) -> list[Dependency]:
    """What the object `node` (kind, name) in `namespace` depends on, from the index (none when missing or invalid)."""
    kind, name = node
    obj = _one(indexes[_objects_index(kind)].get((namespace, name)))
    if obj is None:
        return []
    try:
        return KIND_RUNS[kind].dependencies(KIND_RUNS[kind].kind.spec.model_validate(obj.get("spec") or {}))
    except ValueError:
        return []


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body or "{}").get("message") or ""
    except ValueError:
        return str(exc.body or "")[:300]


def status_changes(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch from `current` to `desired` (top-level keys of `desired` only): a nested object is merged
    key by key, so a key it no longer has is sent as null (removed), not left behind."""
    changes: dict[str, Any] = {}
    for key, value in desired.items():
        old = current.get(key)
        if old == value:
            continue
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            value = {**{k: None for k in old if k not in value}, **value}
        changes[key] = value
    return changes


async def write_decision(kube: Kube, body: Any, decision: Decision, wakers: Wakers, logger: Any) -> Decision:
    """Delete and create the children, patch status (only what changed), post the Events; the decision as it ended
    (a stranger's object under a child's name blocks the run)."""
    kind, meta = body["kind"], body["metadata"]
    uid = meta["uid"]
    for child in decision.delete:
        key = (child["kind"], child["metadata"]["name"])
        await kube.delete(child["kind"], child["metadata"]["namespace"], child["metadata"]["name"])
        wakers.deleted[uid].add(key)
        wakers.created[uid].pop(key, None)
    for child in decision.create:
        key = (child["kind"], child["metadata"]["name"])
        if await kube.create(child):
            metrics.CHILDREN_CREATED.labels(kind, child["kind"]).inc()
            logger.info(f"created {child['kind']} {child['metadata']['name']}")
            wakers.created[uid][key] = child
            continue
        # 409: adopt it only if it is really ours; never create the rest (the Job) on top of a stranger.
        existing = await kube.get(child["kind"], meta["namespace"], child["metadata"]["name"])
        if conflict := foreign_child(child, existing):
            decision = blocked(body, "ChildConflict", conflict, now_rfc3339())
            break
        wakers.created[uid][key] = existing or child
    for child, marks in decision.annotate:
        await kube.annotate(child["kind"], child["metadata"]["namespace"], child["metadata"]["name"], marks)
    await patch_status(kube, body, decision.status, wakers)
    for event in decision.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    return decision


async def patch_status(kube: Kube, body: Any, desired: Mapping[str, Any], wakers: Wakers) -> None:
    changes = status_changes(body.get("status") or {}, desired)
    if changes:
        meta = body["metadata"]
        answer = await kube.patch_status(body["kind"], meta["namespace"], meta["name"], changes)
        version = ((answer or {}).get("metadata") or {}).get("resourceVersion")
        if version:
            _, before = wakers.written.get(meta["uid"], ("", {}))
            # What status now is (a nested object as desired, not the nulls that removed its old keys).
            wakers.written[meta["uid"]] = (str(version), {**before, **{key: desired[key] for key in changes}})


async def reconcile_once(body: Any, memo: Any, logger: Any, indexes: Mapping[str, Any]) -> float | None:
    """One reconcile of `body`; None when it succeeded, else the seconds until it should be tried again."""
    kind, meta = body["kind"], body["metadata"]
    cfg: OperatorConfig = memo.config
    kube: Kube = memo.kube
    started = time.perf_counter()
    outcome = "ok"
    body = memo.wakers.current(body)
    try:
        observed = await observe(kube, body, indexes, memo.wakers)
        decision = reconcile(observed, cfg, now_rfc3339())
        before = dict(body.get("status") or {})
        decision = await write_decision(kube, body, decision, memo.wakers, logger)
        jobs = {c["metadata"]["name"]: c for c in observed.children if c["kind"] == "Job"}
        after = {**before, **decision.status}
        now = datetime.now(UTC)
        metrics.record(usage.Change(kind, meta["namespace"], meta["name"], before, after, jobs, now))
        memo.wakers.succeeded(meta["uid"])
        return None
    except ApiException as exc:
        # Refused by the API (quota, a policy webhook, RBAC): the API's message says why; no traceback needed.
        outcome = "error"
        message = f"the Kubernetes API refused a request: {exc.status} {exc.reason}: {_api_message(exc)}"
        logger.error(message)
        return await report_failure(kube, body, memo.wakers, "ApiError", message)
    except Exception as exc:
        # A bug, or a configuration the code did not expect: the traceback goes to the log, the gist to the user.
        outcome = "error"
        message = (
            f"reconcile failed: {type(exc).__name__}: {str(exc)[:ERROR_TEXT_LIMIT]} "
            "(operator bug or configuration error; see the operator log)"
        )
        logger.exception(message)
        return await report_failure(kube, body, memo.wakers, "ReconcileError", message)
    finally:
        metrics.RECONCILES.labels(kind, outcome).inc()
        metrics.RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)


async def report_failure(kube: Kube, body: Any, wakers: Wakers, reason: str, message: str) -> float:
    """Say why a reconcile failed where its user looks: a `ReconcileError` condition with `reason` in status (the
    phase kept; patched only when that changes) and a Warning Event (one per WARNING_INTERVAL_S); the seconds until
    the next try."""
    uid = body["metadata"]["uid"]
    with contextlib.suppress(ApiException):  # the API may refuse this too: the log and the Event still say it
        await patch_status(kube, body, failed_reconcile(body, reason, message, now_rfc3339()).status, wakers)
    if wakers.may_warn(uid, reason, time.monotonic()):
        kopf.warn(body, reason=reason, message=message)
    return wakers.failed(uid, f"{reason}: {message}")


async def run_resource(body: Any, memo: Any, logger: Any, stopped: Any, **indexes: Any) -> None:
    """A resource's daemon: reconcile, then sleep until an event wakes it (or the slow resync, or a retry)."""
    cfg: OperatorConfig = memo.config
    wakers: Wakers = memo.wakers
    uid = body["metadata"]["uid"]
    wake = wakers.event(uid)
    try:
        while not stopped:
            wake.clear()
            retry = await reconcile_once(body, memo, logger, indexes)
            timeout = retry if retry is not None else None if settled(wakers.current(body)) else cfg.resyncSeconds
            await _sleep(wake, stopped, timeout)
    finally:
        wakers.forget(uid)


async def _sleep(wake: asyncio.Event, stopped: Any, timeout: float | None) -> None:
    woken = asyncio.ensure_future(wake.wait())
    stopping = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({woken, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        woken.cancel()
        stopping.cancel()


async def delete_resource(body: Any, memo: Any, logger: Any, **indexes: Any) -> None:
    """Children go with their owner (explicitly, so no garbage collector is needed); artifacts stay unless asked."""
    meta = body["metadata"]
    kube: Kube = memo.kube
    for child_kind in reversed(CHILD_KINDS):
        for child in list(indexes[_children_index(child_kind)].get(meta["uid"], ())):
            await kube.delete(child_kind, meta["namespace"], child["metadata"]["name"])
    metrics.forget(meta["namespace"], body["kind"], meta["name"])
    if (body.get("spec") or {}).get("artifactPolicy") != "Delete":
        return
    cfg: OperatorConfig = memo.config
    root = cfg.artifactsLocalPath
    if root is None or cfg.artifacts.uri:
        message = "artifactPolicy is Delete, but the operator has no access to the artifact store"
        kopf.warn(body, reason="ArtifactsKept", message=message)
        return
    folder = Path(root) / owner_folder(owner_of(KIND_RUNS[body["kind"]].kind, body))
    await asyncio.to_thread(shutil.rmtree, folder, True)
    if folder.exists():
        kopf.warn(body, reason="ArtifactsKept", message=f"could not delete all artifacts in {folder}")
    else:
        logger.info(f"deleted artifacts in {folder}")


# ---- indexes and wake-ups -----------------------------------------------------------------------------------------


def _children_index(kind: str) -> str:
    return f"children_{PLURALS[kind][1]}"


def _objects_index(kind: str) -> str:
    return f"objects_{PLURALS[kind][1]}"


def _child_indexer(kind: str) -> Any:
    api_version = PLURALS[kind][0]

    def index_child(body: Any, labels: Mapping[str, str], **_: Any) -> dict[str, dict]:
        """A child by its owner's uid, with the apiVersion and kind reconcile compares by."""
        return {labels[OWNER_UID]: {**dict(body), "apiVersion": api_version, "kind": kind}}

    return index_child


def _index_object(body: Any, **_: Any) -> dict[tuple[str, str], dict]:
    meta = body["metadata"]
    return {(meta["namespace"], meta["name"]): dict(body)}


def _wake_owner(labels: Mapping[str, str], memo: Any, **_: Any) -> None:
    memo.wakers.wake(labels[OWNER_UID])


def _index_workload(labels: Mapping[str, str], body: Any, **_: Any) -> dict[str, dict]:
    return {labels[kueue.JOB_UID_LABEL]: dict(body)}


def _wake_job_owner(labels: Mapping[str, str], memo: Any, **_: Any) -> None:
    if (owner := memo.wakers.job_owner.get(labels[kueue.JOB_UID_LABEL])) is not None:
        memo.wakers.wake(owner)


def _wake_self_and_dependents(body: Any, memo: Any, **_: Any) -> None:
    meta = body["metadata"]
    wakers: Wakers = memo.wakers
    wakers.wake(meta["uid"])
    for uid in wakers.waiting_on.get((meta["namespace"], body["kind"], meta["name"]), set()).copy():
        wakers.wake(uid)


def register(registry: kopf.OperatorRegistry, cfg: OperatorConfig, kueue_version: str | None = None) -> None:
    """Attach the indexes, wake-ups, daemons and cleanup of all four kinds to `registry` (and an index of Kueue's
    Workloads when the cluster serves `kueue_version`), and log in as the kubernetes client does (kubeconfig or
    in-cluster ServiceAccount): a registry of our own starts without kopf's default login handlers."""
    kopf.on.login(registry=registry)(kopf.login_via_client)
    owned = {OWNER_UID: kopf.PRESENT}
    for child_kind in CHILD_KINDS:
        api_version, plural = PLURALS[child_kind]
        group, _, version = api_version.rpartition("/")
        resource = (group, version, plural)
        kopf.index(*resource, labels=owned, registry=registry, id=_children_index(child_kind))(
            _child_indexer(child_kind)
        )
        kopf.on.event(*resource, labels=owned, registry=registry, id=f"wake_{plural}")(_wake_owner)
    for kind in KINDS:
        resource = (GROUP, VERSION, kind.plural)
        kopf.index(*resource, registry=registry, id=_objects_index(kind.kind))(_index_object)
        kopf.on.event(*resource, registry=registry, id=f"wake_{kind.plural}")(_wake_self_and_dependents)
        kopf.daemon(*resource, registry=registry, id="reconcile", cancellation_timeout=5.0)(run_resource)
        kopf.on.delete(*resource, registry=registry, id="cleanup")(delete_resource)
    if kueue_version:
        resource = (kueue.GROUP, kueue_version, "workloads")
        by_job = {kueue.JOB_UID_LABEL: kopf.PRESENT}
        kopf.index(*resource, labels=by_job, registry=registry, id=WORKLOADS_INDEX)(_index_workload)
        kopf.on.event(*resource, labels=by_job, registry=registry, id="wake_workloads")(_wake_job_owner)
