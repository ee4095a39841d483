"""The kopf handlers: thin I/O shells around `reconcile`. Read the world, decide (pure), write the decision.

One timer per resource drives everything: it runs at once when the operator sees the object (start-up included)
and then every `resyncSeconds`, following Jobs and dependencies. A resource that has finished for its current
generation costs no API calls. Deletion removes the children (and the artifacts when the spec says Delete).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kopf
from kleinstyle.contract.layout import owner_folder
from kubernetes.client.rest import ApiException

from . import metrics
from .api import GROUP, KINDS, VERSION
from .config import OperatorConfig
from .kinds import KIND_RUNS, NotReady, check_dependencies
from .kinds.base import owner_of
from .kube import Kube
from .naming import OWNER_UID, owner_labels, selector
from .reconcile import Observed, blocked, foreign_child, job_failed, reconcile

CHILD_KINDS = ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job")
TERMINAL = ("Succeeded", "Failed")


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def settled(body: Any) -> bool:
    """Finished for the current generation: nothing to poll until the spec changes."""
    status = body.get("status") or {}
    return status.get("phase") in TERMINAL and status.get("observedGeneration") == body["metadata"].get("generation")


async def observe(kube: Kube, body: Any) -> Observed:
    """Read what reconcile needs, and no more: children only once the dependencies are ready, pods only when a
    Job failed (for the pod's reason)."""
    meta = body["metadata"]
    namespace, kind = meta["namespace"], body["kind"]
    deps_wanted: list = []
    with contextlib.suppress(ValueError):  # an invalid spec is reported by reconcile
        deps_wanted = KIND_RUNS[kind].dependencies(KIND_RUNS[kind].kind.spec.model_validate(body.get("spec") or {}))
    found = await asyncio.gather(*(kube.get(d.kind, namespace, d.name) for d in deps_wanted))
    dependencies = {(d.kind, d.name): obj for d, obj in zip(deps_wanted, found, strict=True)}
    try:
        check_dependencies(deps_wanted, dependencies)
    except NotReady:
        return Observed(body=dict(body), dependencies=dependencies)
    labels = selector({OWNER_UID: meta["uid"]})
    groups = await asyncio.gather(*(kube.list(k, namespace, labels) for k in CHILD_KINDS))
    children = [child for group in groups for child in group]
    failed = any(c["kind"] == "Job" and job_failed(c) for c in children)
    pods = await kube.list("Pod", namespace, labels) if failed else []
    return Observed(body=dict(body), dependencies=dependencies, children=children, pods=pods)


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body or "{}").get("message") or ""
    except ValueError:
        return str(exc.body or "")[:300]


def status_changes(current: dict, desired: dict) -> dict:
    return {k: v for k, v in desired.items() if current.get(k) != v}


async def reconcile_resource(body: Any, patch: Any, memo: Any, logger: Any, **_: Any) -> None:
    kind, meta = body["kind"], body["metadata"]
    if settled(body):
        return
    cfg: OperatorConfig = memo.config
    kube: Kube = memo.kube
    started = time.perf_counter()
    outcome = "ok"
    try:
        decision = reconcile(await observe(kube, body), cfg, now_rfc3339())
        for child in decision.delete:
            await kube.delete(child["kind"], child["metadata"]["namespace"], child["metadata"]["name"])
        for child in decision.create:
            if await kube.create(child):
                metrics.CHILDREN_CREATED.labels(kind, child["kind"]).inc()
                logger.info(f"created {child['kind']} {child['metadata']['name']}")
                continue
            # 409: adopt it only if it is really ours; never create the rest (the Job) on top of a stranger.
            existing = await kube.get(child["kind"], meta["namespace"], child["metadata"]["name"])
            if conflict := foreign_child(child, existing):
                decision = blocked(body, "ChildConflict", conflict, now_rfc3339())
                break
        changes = status_changes(dict(body.get("status") or {}), decision.status)
        for key, value in changes.items():
            patch.status[key] = value
        metrics.count_tokens(kind, dict(body.get("status") or {}), decision.status)
        for event in decision.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        metrics.set_phase(meta["namespace"], kind, meta["name"], decision.status.get("phase"))
    except ApiException as exc:
        # Refused by the API (quota, a policy webhook, RBAC): say so in status, try again at the next resync.
        outcome = "error"
        message = f"the Kubernetes API refused a request: {exc.status} {exc.reason}: {_api_message(exc)}"
        decision = blocked(body, "ApiError", message, now_rfc3339())
        for key, value in status_changes(dict(body.get("status") or {}), decision.status).items():
            patch.status[key] = value
        kopf.warn(body, reason="ApiError", message=message)
    except Exception:
        outcome = "error"
        raise
    finally:
        metrics.RECONCILES.labels(kind, outcome).inc()
        metrics.RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)


async def delete_resource(body: Any, memo: Any, logger: Any, **_: Any) -> None:
    """Children go with their owner (explicitly, so no garbage collector is needed); artifacts stay unless asked."""
    meta = body["metadata"]
    kube: Kube = memo.kube
    labels = selector(owner_labels(body["kind"], meta["uid"]))
    for kind in reversed(CHILD_KINDS):
        for child in await kube.list(kind, meta["namespace"], labels):
            await kube.delete(kind, meta["namespace"], child["metadata"]["name"])
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


def register(registry: kopf.OperatorRegistry, resync_seconds: float) -> None:
    """Attach the handlers of all four kinds to `registry`, and log in as the kubernetes client does (kubeconfig
    or in-cluster ServiceAccount): a registry of our own starts without kopf's default login handlers."""
    kopf.on.login(registry=registry)(kopf.login_via_client)
    for kind in KINDS:
        resource = (GROUP, VERSION, kind.plural)
        kopf.timer(*resource, interval=resync_seconds, backoff=resync_seconds, registry=registry, id="reconcile")(
            reconcile_resource
        )
        kopf.on.delete(*resource, registry=registry, id="cleanup")(delete_resource)
