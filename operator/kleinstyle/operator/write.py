"""Write: carry out a reconcile's decision, changing only what differs.

The API is written to only to change something (create or delete a child, patch status, post an Event), and each
write is remembered in `Wakers` until the watch brings it back, so a reconcile woken in between repeats none.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from . import events, metrics
from .kube import Kube
from .reconcile import Decision, blocked, foreign_child
from .wakers import Wakers


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        await events.post(kube, body, event.type, event.reason, event.message)
    return decision


async def patch_status(kube: Kube, body: Any, desired: Mapping[str, Any], wakers: Wakers) -> None:
    """Patch what differs from `desired` in `body`'s status, and remember the write until the watch brings it."""
    changes = status_changes(body.get("status") or {}, desired)
    if changes:
        meta = body["metadata"]
        answer = await kube.patch_status(body["kind"], meta["namespace"], meta["name"], changes)
        version = ((answer or {}).get("metadata") or {}).get("resourceVersion")
        if version:
            _, before = wakers.written.get(meta["uid"], ("", {}))
            # What status now is (a nested object as desired, not the nulls that removed its old keys).
            wakers.written[meta["uid"]] = (str(version), {**before, **{key: desired[key] for key in changes}})
